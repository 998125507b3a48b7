"""``histolens train nuclei|tiles``: the project's training recipe.

``train nuclei`` trains the whole default model (backbone + nuclei decoder) from random init on
MoNuSeg + CoNSeP + PanNuke at the model card's mpp, for a wall-time budget (``--minutes``), on
CPU with bf16 autocast. The run is deterministic given ``--seed``: the augmentation of step
``i`` draws from ``default_rng([seed, i])``, so ``--resume`` continues the same stream.
Everything goes to ``--out``: ``train.log`` (also stdout), ``checkpoint.safetensors`` (model +
optimizer, every ``--checkpoint-minutes``), ``checkpoint.json`` (step, schedule, elapsed time)
and ``final.safetensors`` (model weights).

``train tiles`` fits a new tile-class head on the backbone's tile embeddings of your own tiles
(folder-per-class, or ``--labels CSV`` with ``image,label``) and writes a new weights file and
card; see :mod:`histolens.training.probe`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import NUCLEUS_TYPES, NucleiSample, load_consep, load_monuseg, load_pannuke, mosaic
from .targets import AugmentConfig, Example, make_example

__all__ = [
    "DEFAULT_VAL_CONSEP_TILES",
    "DEFAULT_VAL_PATIENTS",
    "NucleiData",
    "add_arguments",
    "default_data_root",
    "load_nuclei_data",
    "run",
    "setup_logging",
    "training_precision",
]

log = logging.getLogger("histolens.train")

#: Held-out MoNuSeg patients, one per organ: lung, kidney, breast (none of them has a tile in
#: the binary-mask set, so they are fully unseen).
DEFAULT_VAL_PATIENTS = ("TCGA-21-5786", "TCGA-B0-5710", "TCGA-E2-A1B5")
#: Held-out CoNSeP source tiles (16 patches each) for nucleus-type validation.
DEFAULT_VAL_CONSEP_TILES = ("train_3", "train_13", "train_22")
#: Share of each source in a training batch (sampled per example).
SOURCE_WEIGHTS = {"monuseg": 0.35, "monuseg-binary": 0.15, "consep": 0.38, "pannuke": 0.12}


def default_data_root() -> Path:
    """``$HISTOLENS_SHARED_DATA`` or ``../shared/data`` beside the repository (the checkout's parent)."""
    env = os.environ.get("HISTOLENS_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def setup_logging(path: Path | None) -> None:
    """Log to stderr and, when given, to ``path`` (appending, so resumed runs keep one log)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="a"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


# ----------------------------------------------------------------------------- data


@dataclass
class NucleiData:
    """Training pools per source and the held-out validation samples, all at the model's mpp."""

    train: dict[str, list[NucleiSample]]
    consep_groups: dict[str, list[NucleiSample]] = field(default_factory=dict)
    val_monuseg: list[NucleiSample] = field(default_factory=list)
    val_consep: list[NucleiSample] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{k}: {len(v)}" for k, v in self.train.items()]
        parts.append(f"consep tiles: {len(self.consep_groups)}")
        parts.append(f"val monuseg: {[s.name for s in self.val_monuseg]}")
        parts.append(
            f"val consep patches: {len(self.val_consep)} ({sorted({s.group for s in self.val_consep})})"
        )
        return "; ".join(parts)


def load_nuclei_data(
    root: Path,
    *,
    mpp: float,
    val_patients: Sequence[str] = DEFAULT_VAL_PATIENTS,
    val_consep_tiles: Sequence[str] = DEFAULT_VAL_CONSEP_TILES,
) -> NucleiData:
    """Load every nuclei source at ``mpp`` and split by patient / source tile (never by image)."""
    monuseg = load_monuseg(root, mpp=mpp)
    consep = load_consep(root, mpp=mpp)
    pannuke = load_pannuke(root, mpp=mpp)
    val_p = set(val_patients)
    found = {s.group for s in monuseg}
    missing = val_p - found
    if missing:
        msg = (
            f"validation patients {sorted(missing)} are not in MoNuSeg; choose from {sorted(found)}"
        )
        raise ValueError(msg)
    val_t = set(val_consep_tiles)
    groups_found = {s.group for s in consep}
    if val_t - groups_found:
        msg = f"validation CoNSeP tiles {sorted(val_t - groups_found)} do not exist; choose from {sorted(groups_found)}"
        raise ValueError(msg)
    data = NucleiData(
        train={
            "monuseg": [s for s in monuseg if s.group not in val_p and s.instances is not None],
            "monuseg-binary": [s for s in monuseg if s.group not in val_p and s.instances is None],
            "consep": [],
            "pannuke": pannuke,
        },
        val_monuseg=[s for s in monuseg if s.group in val_p and s.instances is not None],
        val_consep=[s for s in consep if s.group in val_t],
    )
    for s in consep:
        if s.group not in val_t:
            data.consep_groups.setdefault(s.group, []).append(s)
    data.train["consep"] = [p for g in data.consep_groups.values() for p in g]
    return data


def _draw_sample(
    data: NucleiData,
    rng: np.random.Generator,
    min_size: int,
    source_weights: Mapping[str, float] = SOURCE_WEIGHTS,
) -> NucleiSample:
    names = [k for k in source_weights if source_weights[k] > 0 and data.train.get(k)]
    w = np.array([source_weights[k] for k in names])
    source = names[int(rng.choice(len(names), p=w / w.sum()))]
    if source == "consep":
        # 2 x 2 mosaic of patches from ONE source tile: a >= 256 px crop that never mixes tiles.
        group = sorted(data.consep_groups)[int(rng.integers(len(data.consep_groups)))]
        pool = data.consep_groups[group]
        return mosaic([pool[int(i)] for i in rng.integers(len(pool), size=4)])
    pool = data.train[source]
    s = pool[int(rng.integers(len(pool)))]
    if min(s.image.shape[:2]) < min_size and source == "pannuke":
        return mosaic([pool[int(i)] for i in rng.integers(len(pool), size=4)])
    return s


def make_batch(
    data: NucleiData,
    rng: np.random.Generator,
    batch_size: int,
    cfg: AugmentConfig,
    source_weights: Mapping[str, float] = SOURCE_WEIGHTS,
) -> list[Example]:
    """``batch_size`` augmented examples drawn across sources by ``source_weights``."""
    return [
        make_example(_draw_sample(data, rng, cfg.size, source_weights), rng, cfg)
        for _ in range(batch_size)
    ]


def parse_weights(text: str | None, defaults: Mapping[str, float], what: str) -> dict[str, float]:
    """``"a=0.5,b=2"`` over ``defaults``: names must be known, values finite and >= 0."""
    out = dict(defaults)
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            v = float(value) if sep else float("nan")
        except ValueError:
            v = float("nan")
        if name not in defaults or not np.isfinite(v) or v < 0:
            msg = f"bad {what} {item!r}: write NAME=VALUE with NAME one of {', '.join(defaults)} and VALUE >= 0"
            raise ValueError(msg)
        out[name] = v
    if not any(out.values()):
        msg = f"{what}: at least one weight must be > 0"
        raise ValueError(msg)
    return out


def _fixed_val_batch(data: NucleiData, cfg: AugmentConfig, seed: int, n: int = 8) -> list[Example]:
    """A fixed, un-augmented batch from the held-out samples, to log a validation loss."""
    rng = np.random.default_rng([seed, 10**9])
    pools: list[NucleiSample] = list(data.val_monuseg)
    by_group: dict[str, list[NucleiSample]] = {}
    for p in data.val_consep:
        by_group.setdefault(p.group, []).append(p)
    pools += [mosaic([g[int(j)] for j in rng.integers(len(g), size=4)]) for g in by_group.values()]
    if not pools:
        return []
    return [make_example(pools[i % len(pools)], rng, cfg, augment=False) for i in range(n)]


# ----------------------------------------------------------------------------- torch side


def training_precision(precision: str) -> str:
    """``"bf16"`` or ``"fp32"`` for CPU training; ``"auto"`` takes bf16 only where the CPU has it
    natively (AMX / AVX-512 BF16). Without it PyTorch emulates bf16 convolutions: measured on an
    AVX2-only AMD EPYC, a 3 x 3 convolution ran 137x slower in bf16 than in fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        msg = f"--precision {precision!r}: choose auto, bf16 or fp32"
        raise ValueError(msg)
    if precision != "auto":
        return precision
    from histolens.models.precision import resolve_precision

    return "bf16" if resolve_precision("cpu", "auto") == "bf16" else "fp32"


def batch_tensors(
    batch: Sequence[Example], mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """Stack examples into torch tensors; images normalised with the card's mean/std."""
    import torch

    img = torch.from_numpy(np.stack([e.image for e in batch])).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return {
        "x": (img - m) / s,
        "foreground": torch.from_numpy(np.stack([e.foreground for e in batch])),
        "hv": torch.from_numpy(np.stack([e.hv for e in batch])),
        "hv_valid": torch.tensor([e.hv_valid for e in batch]),
        "types": torch.from_numpy(np.stack([e.types for e in batch])),
    }


def _lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 5 % of ``base`` over ``progress`` in [0, 1]."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(path: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Model + AdamW state as safetensors (no pickle), schedule state as JSON beside it; atomic."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{pid}.{k}"] = t.detach().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    meta = dict(
        state,
        param_groups=[{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
    )
    jtmp = path.with_suffix(".json.tmp")
    jtmp.write_text(json.dumps(meta, indent=1))
    os.replace(jtmp, path.with_suffix(".json"))


def load_checkpoint(path: Path, model: Any, optimizer: Any | None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    meta = json.loads(path.with_suffix(".json").read_text())
    if optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        sd = optimizer.state_dict()
        for g, saved in zip(sd["param_groups"], meta["param_groups"], strict=True):
            g.update({k: v for k, v in saved.items() if k in g})
        sd["state"] = state
        optimizer.load_state_dict(sd)
    return meta


def create_trainable_model(name: str, *, weights: Path | None = None) -> Any:
    """The named model, random-initialised (or loaded from ``weights``), in training mode."""
    from histolens.models import create_model

    model = (
        create_model(name, pretrained=False)
        if weights is None
        else create_model(name, weights=weights)
    )
    return model.train()


def load_matching_weights(model: Any, path: Path) -> tuple[int, list[str]]:
    """Copy the tensors of a safetensors file whose name and shape match ``model``'s.

    For warm starts across architecture changes (e.g. a trained backbone under a new decoder).
    Returns the number of tensors copied and the model keys left at their initial values.
    """
    from safetensors.torch import load_file

    from histolens.models import WeightsError

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        msg = f"{path}: cannot read it as safetensors ({exc}); pass a weights file written by histolens"
        raise WeightsError(msg) from exc
    state = model.state_dict()
    usable = {k: v for k, v in tensors.items() if k in state and state[k].shape == v.shape}
    if not usable:
        msg = f"{path}: no tensor matches model {model.card.name!r} by name and shape; is it a weights file of this family?"
        raise WeightsError(msg)
    model.load_state_dict(usable, strict=False)
    return len(usable), sorted(k for k in state if k not in usable)


def train_nuclei(
    args: argparse.Namespace, *, model: Any = None, data: NucleiData | None = None
) -> int:
    """The nuclei training loop; see the module docstring.

    ``model`` and ``data`` default to ``create_model(args.model)`` (random init) and
    :func:`load_nuclei_data` at the card's mpp; tests inject small ones.
    """
    import torch

    from .losses import LossWeights, nuclei_losses

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "train.log")
    # Built first so a bad option fails before minutes of model and data loading.
    cfg = AugmentConfig(
        size=args.crop,
        hed_sigma=getattr(args, "hed_sigma", AugmentConfig.hed_sigma),
        hed_bias=getattr(args, "hed_bias", AugmentConfig.hed_bias),
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ckpt_path = out / "checkpoint.safetensors"

    if model is None:
        model = create_trainable_model(args.model, weights=args.init_weights)
    if getattr(args, "init_partial", None) is not None:
        copied, skipped = load_matching_weights(model, args.init_partial)
        log.info(
            "init from %s: %d tensors copied, %d kept fresh (absent or reshaped): %s",
            args.init_partial,
            copied,
            len(skipped),
            ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""),
        )
    card = model.card
    if len(card.nucleus_types) != len(NUCLEUS_TYPES):
        msg = f"model {args.model!r} has nucleus types {card.nucleus_types}; this recipe trains the CoNSeP 4 {NUCLEUS_TYPES}"
        raise ValueError(msg)
    mpp = float(card.mpp)
    log.info(
        "model %s: mpp %.3f um/px, %d params",
        args.model,
        mpp,
        sum(p.numel() for p in model.parameters()),
    )
    t0 = time.time()
    if data is None:
        data = load_nuclei_data(
            args.data,
            mpp=mpp,
            val_patients=args.val_patients.split(","),
            val_consep_tiles=args.val_consep_tiles.split(","),
        )
    log.info("data at %.2f um/px loaded in %.0f s: %s", mpp, time.time() - t0, data.summary())
    source_weights = parse_weights(
        getattr(args, "source_weights", None), SOURCE_WEIGHTS, "--source-weights"
    )
    loss_weights = LossWeights(
        **parse_weights(
            getattr(args, "loss_weights", None), asdict(LossWeights()), "--loss-weights"
        )
    )
    if not any(w > 0 and data.train.get(k) for k, w in source_weights.items()):
        msg = f"--source-weights {source_weights}: every source with training data has weight 0"
        raise ValueError(msg)
    log.info("sources %s; loss weights %s", source_weights, asdict(loss_weights))
    val_examples = _fixed_val_batch(data, cfg, args.seed)
    val_batch = batch_tensors(val_examples, card.mean, card.std) if val_examples else None

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state: dict[str, Any] = {
        "step": 0,
        "elapsed_s": 0.0,
        "seed": args.seed,
        "args": _jsonable(vars(args)),
    }
    if args.resume and ckpt_path.exists():
        state.update(load_checkpoint(ckpt_path, model, optimizer))
        log.info(
            "resumed from %s at step %d (%.1f min trained)",
            ckpt_path,
            state["step"],
            state["elapsed_s"] / 60,
        )
    budget = args.minutes * 60.0
    precision = training_precision(args.precision)
    use_bf16 = precision == "bf16"
    state["precision"] = precision  # what "auto" became on this CPU, for the release's recipe
    log.info("precision %s (asked: %s); augmentation %s", precision, args.precision, cfg)
    model.train()
    last_ckpt = time.time()
    start_wall = time.time() - state["elapsed_s"]
    running: dict[str, float] = {}
    step = state["step"]
    while True:
        elapsed = time.time() - start_wall
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        # The cosine follows the *time* budget (a shared CPU's speed varies too much to fix a
        # step count in advance); with --max-steps it follows the steps instead. The data
        # stream stays deterministic per step either way.
        progress = step / args.max_steps if args.max_steps else elapsed / budget
        lr = _lr_at(step, progress, args.lr, args.warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, step])
        torch.manual_seed(args.seed * 1_000_003 + step)
        batch = make_batch(data, rng, args.batch_size, cfg, source_weights)
        b = batch_tensors(batch, card.mean, card.std)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(b["x"])
        terms = nuclei_losses(
            pred, b["foreground"], b["hv"], b["hv_valid"], b["types"], weights=loss_weights
        )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        step += 1
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if step % args.log_every == 0:
            msg = " ".join(f"{k} {v / args.log_every:.4f}" for k, v in running.items())
            log.info(
                "step %d  %.1f min  lr %.2e  %s", step, (time.time() - start_wall) / 60, lr, msg
            )
            running.clear()
        if time.time() - last_ckpt >= args.checkpoint_minutes * 60:
            state.update(step=step, elapsed_s=time.time() - start_wall)
            _validate(model, val_batch, use_bf16, step)
            save_checkpoint(ckpt_path, model, optimizer, state)
            log.info("checkpoint %s at step %d", ckpt_path, step)
            last_ckpt = time.time()
    state.update(step=step, elapsed_s=time.time() - start_wall, finished=True)
    _validate(model, val_batch, use_bf16, step)
    save_checkpoint(ckpt_path, model, optimizer, state)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(out / "final.safetensors"),
    )
    log.info(
        "done: %d steps in %.1f min; weights %s",
        step,
        state["elapsed_s"] / 60,
        out / "final.safetensors",
    )
    return 0


def _validate(model: Any, b: dict[str, Any] | None, use_bf16: bool, step: int) -> None:
    import torch

    if b is None:
        return
    from .losses import nuclei_losses

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        pred = model(b["x"])
    terms = nuclei_losses(pred, b["foreground"], b["hv"], b["hv_valid"], b["types"])
    model.train()
    log.info("val step %d  %s", step, " ".join(f"{k} {float(v):.4f}" for k, v in terms.items()))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in d.items()
        if not callable(v) and not k.startswith("_")
    }


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``histolens train nuclei`` and ``histolens train tiles``."""
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    n = sub.add_parser(
        "nuclei", help="train backbone + nuclei heads (HoVer-style) from random init"
    )
    n.add_argument(
        "--data",
        type=Path,
        default=default_data_root(),
        help="shared data root (default: %(default)s)",
    )
    n.add_argument(
        "--out", type=Path, required=True, help="run folder: train.log, checkpoints, final weights"
    )
    n.add_argument("--model", default="histolens-default", help="registered model to train")
    n.add_argument(
        "--init-weights",
        type=Path,
        default=None,
        help="start from these weights instead of random init",
    )
    n.add_argument(
        "--init-partial",
        type=Path,
        default=None,
        help="copy the tensors of this weights file that match by name and shape (e.g. a trained backbone under a new decoder)",
    )
    n.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="wall-time budget in minutes (default %(default)s)",
    )
    n.add_argument("--batch-size", type=int, default=8)
    n.add_argument(
        "--crop", type=int, default=256, help="training crop side in px at the model's mpp"
    )
    n.add_argument("--lr", type=float, default=1e-3)
    n.add_argument("--weight-decay", type=float, default=1e-4)
    n.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    n.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    n.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast dtype on CPU; auto = bf16 where the CPU runs it natively (AMX/AVX-512 BF16), else fp32",
    )
    n.add_argument(
        "--hed-sigma",
        type=float,
        default=AugmentConfig.hed_sigma,
        help="stain jitter: haematoxylin/eosin/DAB optical densities scaled by 1 +- this (default %(default)s)",
    )
    n.add_argument(
        "--hed-bias",
        type=float,
        default=AugmentConfig.hed_bias,
        help="stain jitter: optical-density offset range +- this (default %(default)s)",
    )
    n.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop (and end the cosine) at this step, if before the time budget",
    )
    n.add_argument(
        "--source-weights",
        default=None,
        help=f"share of each data source per batch, e.g. monuseg=0.5,consep=0.25 (defaults: {SOURCE_WEIGHTS})",
    )
    n.add_argument(
        "--loss-weights",
        default=None,
        help="loss term weights, e.g. hv_mse=2,hv_msge=2 (default: all 1, as HoVer-Net)",
    )
    n.add_argument("--checkpoint-minutes", type=float, default=5.0)
    n.add_argument("--log-every", type=int, default=10)
    n.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    n.add_argument(
        "--val-patients",
        default=",".join(DEFAULT_VAL_PATIENTS),
        help="held-out MoNuSeg patients (comma-separated)",
    )
    n.add_argument(
        "--val-consep-tiles",
        default=",".join(DEFAULT_VAL_CONSEP_TILES),
        help="held-out CoNSeP source tiles",
    )
    n.set_defaults(_task=train_nuclei)
    t = sub.add_parser(
        "tiles", help="fit a tile-class head on your own labelled tiles; write new weights + card"
    )
    from .probe import add_tile_arguments, train_tiles

    add_tile_arguments(t)
    t.set_defaults(_task=train_tiles)
    r = sub.add_parser(
        "release",
        help="evaluate a finished nuclei run, fit the Kather tile head, write weights + card",
    )
    from .release import add_release_arguments, release

    add_release_arguments(r)
    r.set_defaults(_task=release)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen training task."""
    return int(args._task(args) or 0)
