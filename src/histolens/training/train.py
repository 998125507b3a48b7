"""``histolens train nuclei``: the project's training recipe, the loop and what it needs.

It trains the whole default model (backbone + nuclei decoder) from random init on
MoNuSeg + CoNSeP + PanNuke at the model card's mpp, for a wall-time budget (``--minutes``), on
CPU with bf16 autocast. The run is deterministic given ``--seed``: the augmentation of step
``i`` draws from ``default_rng([seed, i])``, so ``--resume`` continues the same stream.
Everything goes to ``--out``: ``train.log`` (also stdout), ``checkpoint.safetensors`` (model +
optimizer, every ``--checkpoint-minutes``), ``checkpoint.json`` (step, schedule, elapsed time)
and ``final.safetensors`` (model weights). The options are a
:class:`~histolens.training.config.TrainNucleiConfig` (:mod:`histolens.training.cli` parses them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import (
    DEFAULT_VAL_CONSEP_TILES,
    DEFAULT_VAL_PATIENTS,
    SOURCE_WEIGHTS,
    TRAIN_PRECISIONS,
    TrainNucleiConfig,
)
from .datasets import NUCLEUS_TYPES, NucleiSample, load_consep, load_monuseg, load_pannuke, mosaic
from .targets import AugmentConfig, Example, make_example

__all__ = [
    "NucleiData",
    "create_trainable_model",
    "load_checkpoint",
    "setup_logging",
    "train_nuclei",
    "training_precision",
]

log = logging.getLogger("histolens.train")


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
    from histolens.models.precision import resolve_precision

    if precision not in TRAIN_PRECISIONS:
        msg = f"--precision {precision!r}: choose {', '.join(TRAIN_PRECISIONS)}"
        raise ValueError(msg)
    return resolve_precision("cpu", precision)


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
    cfg: TrainNucleiConfig, *, model: Any = None, data: NucleiData | None = None
) -> int:
    """The nuclei training loop; see the module docstring.

    ``model`` and ``data`` default to ``create_model(cfg.model)`` (random init) and
    :func:`load_nuclei_data` at the card's mpp; tests inject small ones.
    """
    import torch

    cfg.out.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.out / "train.log")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    trainer = _start(cfg, _prepare_model(cfg, model), data)
    step, elapsed = _loop(trainer)
    trainer.checkpoint(step, elapsed, finished=True)
    from safetensors.torch import save_file

    final = cfg.out / "final.safetensors"
    save_file(
        {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, str(final)
    )
    log.info("done: %d steps in %.1f min; weights %s", step, elapsed / 60, final)
    return 0


@dataclass
class _Trainer:
    """One nuclei run's moving parts: model, optimiser, data, losses and the checkpointed state."""

    cfg: TrainNucleiConfig
    model: Any
    optimizer: Any
    data: NucleiData
    augment: AugmentConfig
    sources: dict[str, float]
    loss_weights: Any
    val_batch: dict[str, Any] | None
    use_bf16: bool
    state: dict[str, Any]

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.out / "checkpoint.safetensors"

    def step(self, step: int, lr: float) -> dict[str, float]:
        """One optimiser step at learning rate ``lr`` on step ``step``'s batch; its loss terms."""
        import torch

        from .losses import nuclei_losses

        cfg, card = self.cfg, self.model.card
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([cfg.seed, step])
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        batch = make_batch(self.data, rng, cfg.batch_size, self.augment, self.sources)
        b = batch_tensors(batch, card.mean, card.std)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
            pred = self.model(b["x"])
        terms = nuclei_losses(
            pred, b["foreground"], b["hv"], b["hv_valid"], b["types"], weights=self.loss_weights
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def checkpoint(self, step: int, elapsed_s: float, **extra: Any) -> None:
        """Log the validation loss and save model, optimiser and state at ``step``."""
        self.state.update(step=step, elapsed_s=elapsed_s, **extra)
        _validate(self.model, self.val_batch, self.use_bf16, step)
        save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.state)


def _prepare_model(cfg: TrainNucleiConfig, model: Any) -> Any:
    """The model to train: given, or ``cfg.model`` (random or ``--init-weights``), plus ``--init-partial``."""
    if model is None:
        model = create_trainable_model(cfg.model, weights=cfg.init_weights)
    if cfg.init_partial is not None:
        copied, skipped = load_matching_weights(model, cfg.init_partial)
        log.info(
            "init from %s: %d tensors copied, %d kept fresh (absent or reshaped): %s",
            cfg.init_partial,
            copied,
            len(skipped),
            ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""),
        )
    card = model.card
    if len(card.nucleus_types) != len(NUCLEUS_TYPES):
        msg = f"model {cfg.model!r} has nucleus types {card.nucleus_types}; this recipe trains the CoNSeP 4 {NUCLEUS_TYPES}"
        raise ValueError(msg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: mpp %.3f um/px, %d params", cfg.model, float(card.mpp), n_params)
    return model


def _start(cfg: TrainNucleiConfig, model: Any, data: NucleiData | None) -> _Trainer:
    """Data, weights, optimiser and state (resumed from the run's checkpoint with ``--resume``)."""
    import torch

    from .losses import LossWeights

    card = model.card
    mpp = float(card.mpp)
    t0 = time.time()
    if data is None:
        data = load_nuclei_data(
            cfg.data, mpp=mpp, val_patients=cfg.val_patients, val_consep_tiles=cfg.val_consep_tiles
        )
    log.info("data at %.2f um/px loaded in %.0f s: %s", mpp, time.time() - t0, data.summary())
    sources = cfg.source_weight_map()
    loss_weights = LossWeights(**cfg.loss_weight_map())
    if not any(w > 0 and data.train.get(k) for k, w in sources.items()):
        msg = f"--source-weights {sources}: every source with training data has weight 0"
        raise ValueError(msg)
    log.info("sources %s; loss weights %s", sources, cfg.loss_weight_map())
    augment = cfg.augment()
    val_examples = _fixed_val_batch(data, augment, cfg.seed)
    val_batch = batch_tensors(val_examples, card.mean, card.std) if val_examples else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "seed": cfg.seed, "args": cfg.as_json()}
    ckpt_path = cfg.out / "checkpoint.safetensors"
    if cfg.resume and ckpt_path.exists():
        state.update(load_checkpoint(ckpt_path, model, optimizer))
        log.info(
            "resumed from %s at step %d (%.1f min trained)",
            ckpt_path,
            state["step"],
            state["elapsed_s"] / 60,
        )
    precision = training_precision(cfg.precision)
    state["precision"] = precision  # what "auto" became on this CPU, for the release's recipe
    log.info("precision %s (asked: %s); augmentation %s", precision, cfg.precision, augment)
    model.train()
    return _Trainer(
        cfg, model, optimizer, data, augment, sources, loss_weights, val_batch,
        precision == "bf16", state,
    )  # fmt: skip


def _loop(t: _Trainer) -> tuple[int, float]:
    """Steps until the time budget or ``--max-steps``, logging and checkpointing on the way;
    returns the last step and the training seconds (including earlier runs when resumed)."""
    cfg = t.cfg
    budget = cfg.minutes * 60.0
    last_ckpt = time.time()
    start_wall = time.time() - t.state["elapsed_s"]
    running: dict[str, float] = {}
    step = t.state["step"]
    while True:
        elapsed = time.time() - start_wall
        if elapsed >= budget or (cfg.max_steps and step >= cfg.max_steps):
            break
        # The cosine follows the *time* budget (a shared CPU's speed varies too much to fix a
        # step count in advance); with --max-steps it follows the steps instead. The data
        # stream stays deterministic per step either way.
        progress = step / cfg.max_steps if cfg.max_steps else elapsed / budget
        lr = _lr_at(step, progress, cfg.lr, cfg.warmup)
        for k, v in t.step(step, lr).items():
            running[k] = running.get(k, 0.0) + v
        step += 1
        if step % cfg.log_every == 0:
            msg = " ".join(f"{k} {v / cfg.log_every:.4f}" for k, v in running.items())
            minutes = (time.time() - start_wall) / 60
            log.info("step %d  %.1f min  lr %.2e  %s", step, minutes, lr, msg)
            running.clear()
        if time.time() - last_ckpt >= cfg.checkpoint_minutes * 60:
            t.checkpoint(step, time.time() - start_wall)
            log.info("checkpoint %s at step %d", t.checkpoint_path, step)
            last_ckpt = time.time()
    return step, time.time() - start_wall


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
