"""What each training command is asked to do: one frozen dataclass per command.

``histolens train nuclei|tiles|release`` and ``histolens evaluate nuclei`` are each built from
their argparse namespace in one place (:meth:`from_args`), and check their values when built,
so a bad one fails at once with one line naming the option and the fix (the ``histolens``
command prints it and exits 2), before any model or data is loaded. The dataclass defaults are
the command-line defaults (:mod:`histolens.training.cli` reads them from here). Importing
this module loads neither torch nor the data sets (checking ``--loss-weights`` imports the
losses, and so torch).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from histolens._args import MPP_RANGE
from histolens.models.precision import PRECISIONS
from histolens.models.tta import TTA_DEFAULT

from .targets import AugmentConfig

__all__ = [
    "DEFAULT_VAL_CONSEP_TILES",
    "DEFAULT_VAL_PATIENTS",
    "TRAIN_PRECISIONS",
    "SOURCE_WEIGHTS",
    "EvaluateConfig",
    "ReleaseConfig",
    "TrainNucleiConfig",
    "TrainTilesConfig",
    "default_data_root",
    "parse_weights",
]

#: Held-out MoNuSeg patients, one per organ: lung, kidney, breast (none of them has a tile in
#: the binary-mask set, so they are fully unseen).
DEFAULT_VAL_PATIENTS = ("TCGA-21-5786", "TCGA-B0-5710", "TCGA-E2-A1B5")
#: Held-out CoNSeP source tiles (16 patches each) for nucleus-type validation.
DEFAULT_VAL_CONSEP_TILES = ("train_3", "train_13", "train_22")
#: Share of each source in a training batch (sampled per example).
SOURCE_WEIGHTS = {"monuseg": 0.35, "monuseg-binary": 0.15, "consep": 0.38, "pannuke": 0.12}
#: CPU autocast choices of ``train nuclei``: the inference precisions but fp16, which CPU
#: autocast does not train in; ``auto`` = bf16 where the CPU runs it natively.
TRAIN_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp16")


def default_data_root() -> Path:
    """``$HISTOLENS_SHARED_DATA`` or ``../shared/data`` beside the repository (the checkout's parent)."""
    env = os.environ.get("HISTOLENS_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def parse_weights(text: str | None, defaults: Mapping[str, float], what: str) -> dict[str, float]:
    """``"a=0.5,b=2"`` over ``defaults``: names must be known, values finite and >= 0."""
    out = dict(defaults)
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            v = float(value) if sep else math.nan
        except ValueError:
            v = math.nan
        if name not in defaults or not math.isfinite(v) or v < 0:
            msg = f"bad {what} {item!r}: write NAME=VALUE with NAME one of {', '.join(defaults)} and VALUE >= 0"
            raise ValueError(msg)
        out[name] = v
    if not any(out.values()):
        msg = f"{what}: at least one weight must be > 0"
        raise ValueError(msg)
    return out


# ----------------------------------------------------------------------------- checks


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail(name: str, value: Any, rule: str) -> None:
    msg = f"{_option(name)} {value}: {rule}"
    raise ValueError(msg)


def _positive(cfg: Any, *names: str) -> None:
    """Each named value is a finite number > 0 (or None, where None means "not set")."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            _fail(name, v, "must be a positive finite number")


def _at_least(cfg: Any, least: int, *names: str) -> None:
    """Each named value is an integer >= ``least`` (or None, where None means "not set")."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < least:
            _fail(name, v, f"must be an integer >= {least}")


def _non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            _fail(name, v, "must be a finite number >= 0")


def _mpp(cfg: Any, name: str) -> None:
    lo, hi = MPP_RANGE
    v = getattr(cfg, name)
    if v is not None and not (math.isfinite(v) and lo <= v <= hi):
        _fail(name, v, f"um/px must be {lo:g} to {hi:g} (0.25 at 40x, 0.5 at 20x)")


def _weights_out(cfg: Any) -> None:
    if cfg.out.suffix != ".safetensors":
        _fail("out", cfg.out, "name a weights file ending in .safetensors")


def _existing_file(cfg: Any, *names: str) -> None:
    for name in names:
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_file():
            _fail(name, path, "no such file; pass a weights file (.safetensors) that exists")


_C = TypeVar("_C", bound="_FromArgs")


class _FromArgs:
    """``from_args``: the dataclass's fields read from an argparse namespace of the same names."""

    @classmethod
    def from_args(cls: type[_C], args: argparse.Namespace) -> _C:
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in fields(cls)})

    def as_json(self) -> dict[str, Any]:
        """The options as JSON values (paths as strings, tuples as lists), e.g. for a checkpoint."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class TrainNucleiConfig(_FromArgs):
    """``histolens train nuclei``: the whole model from random init (see :mod:`.train`).

    Field names are the options' (``--batch-size`` -> ``batch_size``); a checkpoint keeps
    them (:meth:`as_json`) so ``train release`` can write each phase's command into the card.
    """

    out: Path
    data: Path = field(default_factory=default_data_root)
    model: str = "histolens-default"
    init_weights: Path | None = None
    init_partial: Path | None = None
    minutes: float = 60.0
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 30
    clip: float = 5.0
    seed: int = 0
    threads: int = 2
    precision: str = "auto"
    hed_sigma: float = AugmentConfig.hed_sigma
    hed_bias: float = AugmentConfig.hed_bias
    max_steps: int | None = None
    source_weights: str | None = None
    loss_weights: str | None = None
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    resume: bool = False
    val_patients: tuple[str, ...] = DEFAULT_VAL_PATIENTS
    val_consep_tiles: tuple[str, ...] = DEFAULT_VAL_CONSEP_TILES

    def __post_init__(self) -> None:
        _positive(self, "minutes", "lr", "clip", "checkpoint_minutes")
        _non_negative(self, "weight_decay")
        _at_least(self, 1, "batch_size", "crop", "threads", "max_steps", "log_every")
        _at_least(self, 0, "warmup")
        if self.precision not in TRAIN_PRECISIONS:
            _fail("precision", self.precision, f"choose {', '.join(TRAIN_PRECISIONS)}")
        _existing_file(self, "init_weights", "init_partial")
        for name in ("val_patients", "val_consep_tiles"):
            if not getattr(self, name):
                _fail(name, "''", "name at least one (comma-separated)")
        self.augment()
        self.source_weight_map()
        self.loss_weight_map()

    def augment(self) -> AugmentConfig:
        """The augmentation of a training crop (checks the stain-jitter strengths)."""
        return AugmentConfig(size=self.crop, hed_sigma=self.hed_sigma, hed_bias=self.hed_bias)

    def source_weight_map(self) -> dict[str, float]:
        """``--source-weights`` over :data:`SOURCE_WEIGHTS`."""
        return parse_weights(self.source_weights, SOURCE_WEIGHTS, "--source-weights")

    def loss_weight_map(self) -> dict[str, float]:
        """``--loss-weights`` over :class:`~histolens.training.losses.LossWeights` (all 1)."""
        from dataclasses import asdict

        from .losses import LossWeights

        return parse_weights(self.loss_weights, asdict(LossWeights()), "--loss-weights")


@dataclass(frozen=True)
class TrainTilesConfig(_FromArgs):
    """``histolens train tiles``: a tile head fitted on the user's labelled tiles (:mod:`.probe`)."""

    images: Path
    out: Path
    labels: Path | None = None
    model: str = "histolens-default"
    weights: Path | None = None
    mpp: float | None = None
    folds: int = 5
    l2: float = 1e-2
    threads: int = 2

    def __post_init__(self) -> None:
        _mpp(self, "mpp")
        _weights_out(self)
        if self.folds < 0 or self.folds == 1:
            _fail("folds", self.folds, "use 0 (no cross-validation) or 2 and more folds")
        _non_negative(self, "l2")
        _at_least(self, 1, "threads")
        _existing_file(self, "weights")


@dataclass(frozen=True)
class ReleaseConfig(_FromArgs):
    """``histolens train release``: evaluate a finished run, fit the tile head, write weights."""

    run: Path
    out: Path
    data: Path = field(default_factory=default_data_root)
    model: str = "histolens-default"
    lc25000_tiles: int = 600
    folds: int = 5
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, 1, "lc25000_tiles", "threads")
        _at_least(self, 2, "folds")
        _weights_out(self)


@dataclass(frozen=True)
class EvaluateConfig(_FromArgs):
    """``histolens evaluate nuclei``: score predictions, the model or the baseline (:mod:`.evaluate`)."""

    images: Path
    labels: Path
    mpp: float
    pred: Path | None = None
    baseline: bool = False
    model: str | None = None
    weights: Path | None = None
    only: tuple[str, ...] | None = None
    json: Path | None = None
    threads: int = 2
    tta: bool = TTA_DEFAULT

    def __post_init__(self) -> None:
        if self.pred is not None and self.baseline:
            _fail("pred", self.pred, "score predictions or --baseline, not both")
        if self.pred is not None and not self.pred.is_dir():
            _fail("pred", self.pred, "is not a folder of <stem>.tif label images")
        if self.only is not None and not self.only:
            _fail("only", "''", "name image stems or 12-character patient ids, comma-separated")
        _at_least(self, 1, "threads")
        _mpp(self, "mpp")
        _existing_file(self, "weights")
