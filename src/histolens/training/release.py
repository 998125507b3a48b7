"""``histolens train release``: evaluate a finished nuclei run, fit the tile head, ship the weights.

From a run folder of ``histolens train nuclei`` (``final.safetensors``, ``checkpoint.json``):

1. nuclei on the held-out MoNuSeg patients (native 0.25 um/px tiles through the same
   :func:`~histolens.nuclei.segment_nuclei` path users run), model *and* classical
   baseline, scored by :func:`~histolens.training.evaluate.evaluate_images`;
2. nucleus types on the held-out CoNSeP source tiles (instance accuracy and per-type F1 over
   IoU > 0.5 matches);
3. tile probes on the trained backbone's embeddings with grouped CV on Kather 2016 and LC25000
   (and, for contrast, an ungrouped CV on LC25000 that leaks near-duplicates);
4. installs the Kather 8-class probe as the tile head and writes the weights + card (licence,
   data, recipe, metrics, sha256) with ``save_model_weights``; a JSON report goes to the run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_VAL_CONSEP_TILES, DEFAULT_VAL_PATIENTS, ReleaseConfig
from .targets import AugmentConfig
from .train import setup_logging

__all__ = ["KATHER_EFFECTIVE_MPP", "release"]

log = logging.getLogger("histolens.train")

#: Where a card's recipe turns from its phase commands to the shared description (see release()).
RECIPE_DETAILS = ". Phase 1 from random init"

#: Kather 2016 tiles: 150 px at 0.495 um/px upsampled to 224 px by the source -> 0.3315 um/px.
KATHER_EFFECTIVE_MPP = 0.495 * 150 / 224

LICENCE = (
    "weights: CC BY-NC-SA 4.0 (non-commercial, share-alike), inherited from the MoNuSeg and PanNuke "
    "training labels; also trained on CoNSeP (research use, cite HoVer-Net) and a Kather 2016 tile "
    "head (CC BY 4.0). Code: BSD-3-Clause."
)


def _load_run_model(run: Path, name: str) -> Any:
    from safetensors.torch import load_file

    from .train import create_trainable_model

    weights = run / "final.safetensors"
    if not weights.is_file():
        msg = f"{weights} is missing: finish `histolens train nuclei --out {run}` first"
        raise FileNotFoundError(msg)
    model = create_trainable_model(name)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def _nuclei_validation(
    model: Any, data: Path, report: dict[str, Any], metrics: dict[str, float]
) -> None:
    """MoNuSeg held-out patients through ``histolens nuclei``'s path, with and without TTA."""
    from histolens.nuclei import segment_nuclei

    from .evaluate import classical_nuclei, evaluate_images, find_pairs

    mon = data / "monuseg" / "train"
    pairs = [
        p
        for p in find_pairs(mon / "images", mon / "labels")
        if p[0].stem[:12] in DEFAULT_VAL_PATIENTS
    ]
    runs = {}
    for tag, tta in (("model", True), ("model_no_tta", False)):
        t0 = time.perf_counter()
        runs[tag] = evaluate_images(
            pairs,
            lambda img, stem, tta=tta: segment_nuclei(
                img, mpp=0.25, model=model, name=stem, tta=tta
            )[0],
        )
        suffix = "" if tta else "_no_tta"
        metrics[f"cpu_seconds_per_1000px_tile_0.25mpp{suffix}"] = round(
            (time.perf_counter() - t0) / len(pairs), 2
        )
    runs["baseline"] = evaluate_images(pairs, lambda img, _: classical_nuclei(img, mpp=0.25))
    prefixes = {
        "model": "monuseg_val",
        "model_no_tta": "monuseg_val_no_tta",
        "baseline": "baseline_monuseg_val",
    }
    for tag, df in runs.items():
        log.info(
            "MoNuSeg held-out patients, %s:\n%s",
            tag,
            df.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        )
        report[f"monuseg_val_{tag}"] = df.to_dict("records")
        for c in ("dice", "aji", "pq"):
            metrics[f"{prefixes[tag]}_{c}"] = round(float(df[c].mean()), 4)


def _absorb_fragments(labels: np.ndarray, prob: np.ndarray, min_px: int) -> np.ndarray:
    """Re-flood instances smaller than ``min_px`` from their larger neighbours (uphill in ``prob``)."""
    from skimage.segmentation import watershed

    area = np.bincount(labels.ravel())
    keep = area >= min_px
    keep[0] = False
    return watershed(-prob, markers=np.where(keep[labels], labels, 0), mask=labels > 0)


def _diagnostics(model: Any, data: Path, report: dict[str, Any], min_px: int = 20) -> None:
    """Held-out MoNuSeg diagnostics on the model grid (not the shipped path's figures).

    - where the instance score is lost (:func:`~histolens.training.evaluate.error_decomposition`:
      the true foreground or the true nucleus centres swapped in for the model's);
    - the scores if sub-5-um^2 fragments were merged into neighbours: ``min_px`` = 20 px at
      0.5 um/px was chosen on two *training* tiles (TCGA-21-5784, TCGA-AR-A1AK), never on these.
    """
    from histolens.models.postprocess import hover_instances

    from .datasets import load_monuseg, resample_labels
    from .evaluate import _read_labels, error_decomposition, score_pair

    mpp = float(model.card.mpp)
    merged, parts = [], []
    for s in load_monuseg(data, mpp=mpp, binary=False):
        if s.group not in DEFAULT_VAL_PATIENTS:
            continue
        h, w = s.image.shape[:2]
        m = int(model.card.input_multiple)
        img = np.pad(s.image, ((0, -h % m), (0, -w % m), (0, 0)), mode="reflect")
        out = model.predict_tiles(img[None], tasks=("nuclei",))
        prob, hv = out["nuclei_prob"][0][:h, :w], out["hv"][0][:, :h, :w]
        lab = _absorb_fragments(hover_instances(prob, hv, mpp=mpp)[0], prob, min_px)
        true = _read_labels(data / "monuseg" / "train" / "labels" / f"{s.name}.png").astype(
            np.int64
        )
        full = resample_labels(lab, 1.0, true.shape)
        merged.append({"image": s.name, **score_pair(true, full.astype(np.int64))})
        parts.append({"image": s.name, **error_decomposition(s.instances, prob, hv, mpp=mpp)})
    report["monuseg_val_model_fragments_merged_diagnostic"] = merged
    means = {c: float(np.mean([r[c] for r in merged])) for c in ("dice", "aji", "pq")}
    report["monuseg_val_model_fragments_merged_diagnostic_mean"] = means
    log.info("diagnostic, fragments < %d px merged (not the shipped path): %s", min_px, means)
    report["monuseg_val_error_decomposition"] = parts
    summary = {
        k: {c: round(float(np.mean([r[k][c] for r in parts])), 4) for c in ("dice", "aji", "pq")}
        for k in ("model", "true_foreground", "true_markers", "true_both")
    }
    report["monuseg_val_error_decomposition_mean"] = summary
    log.info("where held-out AJI is lost (model grid, %.2f um/px): %s", mpp, summary)


def _type_validation(
    model: Any, data: Path, report: dict[str, Any], metrics: dict[str, float]
) -> None:
    from histolens.nuclei import segment_nuclei

    from .datasets import NUCLEUS_TYPES, load_consep
    from .evaluate import classical_nuclei, evaluate_types
    from .metrics import panoptic_quality

    names = list(model.card.nucleus_types)
    samples = [s for s in load_consep(data, mpp=0.25) if s.group in DEFAULT_VAL_CONSEP_TILES]

    def predict(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels, table = segment_nuclei(img, mpp=0.25, model=model)
        types = np.full(int(labels.max()) + 1, -1)
        types[table["label"].to_numpy(int) - 1] = [names.index(t) for t in table["type"]]
        return labels, types

    res = evaluate_types(samples, predict, len(NUCLEUS_TYPES))
    # The baseline has no types: only its PQ on the same patches.
    base_pq = float(
        np.mean(
            [panoptic_quality(s.instances, classical_nuclei(s.image, mpp=0.25)).pq for s in samples]
        )
    )
    for k, name in enumerate(names):
        res[name] = res.pop(f"type{k}")
    report["consep_val_types"] = res
    report["consep_val_baseline_pq"] = base_pq
    log.info("CoNSeP held-out tiles %s: %s", DEFAULT_VAL_CONSEP_TILES, json.dumps(res, indent=1))
    metrics["consep_val_pq"] = round(res["pq_mean"], 4)
    metrics["baseline_consep_val_pq"] = round(base_pq, 4)
    metrics["consep_val_type_accuracy"] = round(res["accuracy"], 4)
    metrics["consep_val_type_macro_f1"] = round(res["macro_f1"], 4)
    for name in names:
        f1 = res[name]["f1"]
        if np.isfinite(f1):
            metrics[f"consep_val_f1_{name}"] = round(f1, 4)


def _probes(
    model: Any,
    data: Path,
    cfg: ReleaseConfig,
    report: dict[str, Any],
    metrics: dict[str, float],
) -> Any:
    from histolens.models.probe import cross_validate, fit_logistic

    from .datasets import load_kather, load_lc25000
    from .probe import tile_embeddings

    kather = load_kather(data)
    xk = tile_embeddings(model, kather.images, image_mpp=KATHER_EFFECTIVE_MPP)
    cv_k = cross_validate(
        xk, kather.labels, kather.groups, len(kather.classes), k=cfg.folds, seed=cfg.seed
    )
    report["kather_probe"] = cv_k
    metrics["kather_probe_grouped_cv_accuracy"] = round(cv_k["accuracy_mean"], 4)
    metrics["kather_probe_grouped_cv_balanced_accuracy"] = round(cv_k["balanced_accuracy_mean"], 4)
    log.info("Kather probe grouped %d-fold CV: %s", cfg.folds, cv_k)

    lc = load_lc25000(data)
    rng = np.random.default_rng(cfg.seed)
    groups = np.unique(lc.groups)
    rng.shuffle(groups)
    # Whole dHash families only, so the subsample keeps every near-duplicate with its family.
    chosen, n = [], 0
    for g in groups:
        if n >= cfg.lc25000_tiles:
            break
        chosen.append(g)
        n += int((lc.groups == g).sum())
    idx = np.nonzero(np.isin(lc.groups, chosen))[0]
    sizes = np.bincount(lc.groups)
    report["lc25000_grouping"] = {
        "tiles": len(lc.groups),
        "groups": int(len(groups)),
        "largest_group": int(sizes.max()),
        "mean_group_size": float(sizes.mean()),
        "probe_tiles": len(idx),
    }
    xl = tile_embeddings(model, lc.images[idx])  # mpp unknown: run at the tiles' own scale
    yl, gl = lc.labels[idx], lc.groups[idx]
    cv_l = cross_validate(xl, yl, gl, len(lc.classes), k=cfg.folds, seed=cfg.seed)
    leaky = cross_validate(xl, yl, np.arange(len(yl)), len(lc.classes), k=cfg.folds, seed=cfg.seed)
    report["lc25000_probe_grouped"] = cv_l
    report["lc25000_probe_ungrouped_leaky"] = leaky
    metrics["lc25000_probe_grouped_cv_accuracy"] = round(cv_l["accuracy_mean"], 4)
    metrics["lc25000_probe_ungrouped_cv_accuracy_leaky"] = round(leaky["accuracy_mean"], 4)
    log.info("LC25000 probe grouped CV: %s; ungrouped (leaky): %s", cv_l, leaky)
    return fit_logistic(xk, kather.labels, len(kather.classes)), kather


def _phases(run: Path) -> list[dict[str, Any]]:
    """Training phases, first to last, following ``--init-weights``/``--init-partial`` back to earlier runs."""
    out = []
    seen = set()
    while run is not None and run not in seen:
        seen.add(run)
        state = json.loads((run / "checkpoint.json").read_text())
        out.append(state)
        a = state.get("args", {})
        init = a.get("init_weights") or a.get("init_partial")
        run = Path(init).parent if init else None
        if run is not None and not (run / "checkpoint.json").is_file():
            break  # started from a weights file that is not a run of this recipe
    return out[::-1]


def _released_history(first_phase: dict[str, Any]) -> dict[str, Any] | None:
    """What a released weights file that the first phase started from had been through.

    A phase can start from shipped weights (``--init-weights .../histolens-default.safetensors``)
    rather than from a run folder; its card then holds the earlier phases' recipe, steps and
    minutes. None when the phase started elsewhere, or when the file no longer matches its
    card's sha256 (it was replaced since), so the history is never claimed for other weights.
    """
    from histolens.models._paths import card_path_for, file_sha256

    a = first_phase.get("args", {})
    init = a.get("init_weights") or a.get("init_partial")
    if not init:
        return None
    weights, card_file = Path(init), card_path_for(init)
    if not (weights.is_file() and card_file.is_file()):
        return None
    card = json.loads(card_file.read_text())
    metrics = card.get("metrics") or {}
    if card.get("weights_sha256") != file_sha256(weights) or "train_steps" not in metrics:
        log.warning(
            "%s does not match its card %s: earlier phases left out of the recipe",
            weights,
            card_file,
        )
        return None
    return {
        "recipe": str(card.get("recipe", "")).split(RECIPE_DETAILS)[0],
        "steps": int(metrics["train_steps"]),
        "minutes": float(metrics.get("train_minutes", 0.0)),
    }


def _phase_command(p: dict[str, Any]) -> str:
    """One training phase as the command that reproduces it, with its steps and minutes."""
    a = p["args"]
    init = " --init-weights <previous phase>" if a.get("init_weights") else ""
    if a.get("init_partial"):
        init = " --init-partial <previous phase> (backbone and matching decoder tensors)"
    for option in ("source_weights", "loss_weights"):
        if a.get(option):
            init += f" --{option.replace('_', '-')} {a[option]}"
    for option in ("hed_sigma", "hed_bias"):
        if a.get(option) not in (None, getattr(AugmentConfig, option)):
            init += f" --{option.replace('_', '-')} {a[option]}"
    precision = p.get("precision") or a.get("precision")
    if precision not in (None, "bf16"):  # phases before --precision auto trained in bf16
        init += f" --precision {precision}"
    return (
        f"histolens train nuclei --minutes {a.get('minutes')} --lr {a.get('lr')} --warmup {a.get('warmup')} "
        f"--batch-size {a.get('batch_size')} --crop {a.get('crop')} --seed {a.get('seed')} "
        f"--threads {a.get('threads')}{init} ({p['step']} steps, {p['elapsed_s'] / 60:.0f} min)"
    )


def _release_card(card: Any, run: Path, report: dict[str, Any], metrics: dict[str, float]) -> Any:
    """``card`` with the release's licence, data, recipe (every phase of ``run``) and metrics.

    Adds the training steps and minutes of all phases to ``metrics`` and the phases to ``report``.
    """
    phases = _phases(run)
    prior = _released_history(phases[0])
    total_steps = sum(p["step"] for p in phases) + (prior["steps"] if prior else 0)
    total_min = sum(p["elapsed_s"] for p in phases) / 60 + (prior["minutes"] if prior else 0.0)
    metrics["train_steps"] = total_steps
    metrics["train_minutes"] = round(total_min, 1)
    report["train_phases"] = [{k: p[k] for k in ("step", "elapsed_s", "args")} for p in phases]
    report["released_history"] = prior
    commands = "; then ".join(
        ([prior["recipe"]] if prior else []) + [_phase_command(p) for p in phases]
    )
    recipe = (
        f"{commands}{RECIPE_DETAILS}; AdamW (wd {phases[0]['args'].get('weight_decay')}), warm-up + "
        f"cosine, bf16 autocast on CPU where it runs natively (fp32 where the phase says so), {total_steps} steps / {total_min:.0f} min in all on a shared 2-core CPU; "
        "losses NP BCE+Dice, HV MSE+MSGE (nuclei pixels), NT CE+Dice (known types only); augmentation "
        "flips/rot90, HED stain jitter, brightness/contrast, scale jitter 0.8-1.25 around 0.5 um/px. Tile head: "
        "logistic regression on the tile embeddings of the 100 Kather 2016 tiles (CV figures: grouped 5-fold). "
        "`histolens train release` wrote this card."
    )
    training_data = (
        "MoNuSeg 2018 train (10 instance-labelled + 17 binary-mask tiles; patients "
        f"{', '.join(DEFAULT_VAL_PATIENTS)} held out), CoNSeP train (24 of 27 source tiles; "
        f"{', '.join(DEFAULT_VAL_CONSEP_TILES)} held out), 25 PanNuke breast patches (neoplastic -> epithelial), "
        "all resampled to 0.5 um/px; tile head: Kather 2016 100-tile sample."
    )
    card = card.replace(
        licence=LICENCE,
        training_data=training_data,
        recipe=recipe,
        metrics=metrics,
        description=card.description
        + f"; trained by the project's recipe (release {time.strftime('%Y-%m-%d')})",
    )
    return card


def release(cfg: ReleaseConfig) -> int:
    """See the module docstring."""
    import torch

    from histolens.models._model import save_model_weights
    from histolens.models.probe import install_linear_head

    torch.set_num_threads(cfg.threads)
    setup_logging(cfg.run / "release.log")
    t0 = time.time()
    model = _load_run_model(cfg.run, cfg.model)
    report: dict[str, Any] = {"run": str(cfg.run)}
    metrics: dict[str, float] = {}
    _nuclei_validation(model, cfg.data, report, metrics)
    _diagnostics(model, cfg.data, report)
    _type_validation(model, cfg.data, report, metrics)
    probe, kather = _probes(model, cfg.data, cfg, report, metrics)
    install_linear_head(model, probe, model.card.tissue_classes, model.card.tissue_colors)
    card = _release_card(model.card, cfg.run, report, metrics)
    card = save_model_weights(model, cfg.out, card=card)
    size_mb = cfg.out.stat().st_size / 1e6
    report.update(
        metrics=metrics,
        weights=str(cfg.out),
        weights_mb=size_mb,
        sha256=card.weights_sha256,
        release_minutes=(time.time() - t0) / 60,
    )
    (cfg.run / "release_report.json").write_text(json.dumps(report, indent=1, default=float))
    from histolens.models._zoo import DEFAULT_WEIGHTS_SHA256

    if card.name == "histolens-default" and card.weights_sha256 != DEFAULT_WEIGHTS_SHA256:
        log.warning(
            "new weights for histolens-default: set DEFAULT_WEIGHTS_SHA256 = %r in "
            "histolens/models/_zoo.py when shipping them (the registry pins the embedded hash)",
            card.weights_sha256,
        )
    log.info(
        "wrote %s (%.2f MB, sha256 %s) and its card; metrics %s",
        cfg.out,
        size_mb,
        card.weights_sha256,
        metrics,
    )
    return 0
