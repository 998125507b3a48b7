"""``histolens train nuclei|tiles|release`` and ``histolens evaluate nuclei``: options and dispatch.

Each task's options are declared here with their defaults taken from its config dataclass
(:mod:`.config`); ``run`` builds that config from the parsed namespace (which checks every
value) and hands it to the task's function, imported only then, so ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolens._args import mpp_value, positive_int

from .config import (
    SOURCE_WEIGHTS,
    TRAIN_PRECISIONS,
    EvaluateConfig,
    ReleaseConfig,
    TrainNucleiConfig,
    TrainTilesConfig,
    default_data_root,
)

__all__ = ["evaluate", "train"]


@dataclass(frozen=True)
class Command:
    """One ``histolens`` sub-command: its options and its runner (see :mod:`histolens.cli`)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class _Task:
    """A task under a sub-command: help, options, config class and ``module:function`` to run."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    config: Any
    target: str


def _names(text: str) -> tuple[str, ...]:
    """argparse ``type=``: comma-separated names as a tuple (blanks dropped)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


# ----------------------------------------------------------------------------- train nuclei


def _add_nuclei_io(p: Any) -> None:
    p.add_argument(
        "--data", type=Path, default=default_data_root(),
        help="shared data root (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, required=True, help="run folder: train.log, checkpoints, final weights"
    )
    p.add_argument("--model", default=TrainNucleiConfig.model, help="registered model to train")
    p.add_argument(
        "--init-weights", type=Path, default=None,
        help="start from these weights instead of random init",
    )  # fmt: skip
    p.add_argument(
        "--init-partial", type=Path, default=None,
        help="copy the tensors of this weights file that match by name and shape (e.g. a trained backbone under a new decoder)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument(
        "--val-patients", type=_names, default=TrainNucleiConfig.val_patients,
        help="held-out MoNuSeg patients (comma-separated)",
    )  # fmt: skip
    p.add_argument(
        "--val-consep-tiles", type=_names, default=TrainNucleiConfig.val_consep_tiles,
        help="held-out CoNSeP source tiles",
    )  # fmt: skip


def _add_nuclei_schedule(p: Any) -> None:
    c = TrainNucleiConfig
    p.add_argument(
        "--minutes", type=float, default=c.minutes,
        help="wall-time budget in minutes (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=c.batch_size)
    p.add_argument(
        "--crop", type=int, default=c.crop, help="training crop side in px at the model's mpp"
    )
    p.add_argument("--lr", type=float, default=c.lr)
    p.add_argument("--weight-decay", type=float, default=c.weight_decay)
    p.add_argument("--warmup", type=int, default=c.warmup, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=c.clip, help="gradient-norm clip")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--threads", type=int, default=c.threads, help="torch CPU threads")
    p.add_argument(
        "--precision", choices=TRAIN_PRECISIONS, default=c.precision,
        help="autocast dtype on CPU; auto = bf16 where the CPU runs it natively (AMX/AVX-512 BF16), else fp32",
    )  # fmt: skip
    p.add_argument(
        "--max-steps", type=int, default=None,
        help="stop (and end the cosine) at this step, if before the time budget",
    )  # fmt: skip
    p.add_argument("--checkpoint-minutes", type=float, default=c.checkpoint_minutes)
    p.add_argument("--log-every", type=int, default=c.log_every)


def _add_nuclei_recipe(p: Any) -> None:
    c = TrainNucleiConfig
    p.add_argument(
        "--hed-sigma", type=float, default=c.hed_sigma,
        help="stain jitter: haematoxylin/eosin/DAB optical densities scaled by 1 +- this (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--hed-bias", type=float, default=c.hed_bias,
        help="stain jitter: optical-density offset range +- this (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--source-weights", default=None,
        help=f"share of each data source per batch, e.g. monuseg=0.5,consep=0.25 (defaults: {SOURCE_WEIGHTS})",
    )  # fmt: skip
    p.add_argument(
        "--loss-weights", default=None,
        help="loss term weights, e.g. hv_mse=2,hv_msge=2 (default: all 1, as HoVer-Net)",
    )  # fmt: skip


def _add_train_nuclei(p: argparse.ArgumentParser) -> None:
    """Options of ``histolens train nuclei``."""
    _add_nuclei_io(p.add_argument_group("run, model and held-out data"))
    _add_nuclei_schedule(p.add_argument_group("optimiser and schedule"))
    _add_nuclei_recipe(p.add_argument_group("data mix, augmentation and losses"))


# ----------------------------------------------------------------------------- tiles, release


def _add_train_tiles(p: argparse.ArgumentParser) -> None:
    """Options of ``histolens train tiles``."""
    c = TrainTilesConfig
    p.add_argument(
        "--images", type=Path, required=True,
        help="folder of tiles: one sub-folder per class, or flat with --labels",
    )  # fmt: skip
    p.add_argument(
        "--labels", type=Path, default=None,
        help="CSV with columns image,label (image relative to --images)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, required=True,
        help="new weights file (.safetensors); its card is written beside it",
    )  # fmt: skip
    p.add_argument("--model", default=c.model, help="model whose backbone embeds the tiles")
    p.add_argument(
        "--weights", type=Path, default=None,
        help="weights of that model (default: its embedded weights)",
    )  # fmt: skip
    p.add_argument(
        "--mpp", type=float, default=None,
        help="um/px of the tiles; resampled to the model's mpp (default: used as is)",
    )  # fmt: skip
    p.add_argument(
        "--folds", type=int, default=c.folds, help="grouped cross-validation folds (0 = skip)"
    )
    p.add_argument("--l2", type=float, default=c.l2, help="L2 penalty of the logistic regression")
    p.add_argument("--threads", type=int, default=c.threads)


def _add_train_release(p: argparse.ArgumentParser) -> None:
    """Options of ``histolens train release``."""
    c = ReleaseConfig
    p.add_argument(
        "--run", type=Path, required=True,
        help="run folder of `histolens train nuclei` (final.safetensors)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, required=True,
        help="weights file to write (.safetensors); card beside it",
    )  # fmt: skip
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--model", default=c.model)
    p.add_argument(
        "--lc25000-tiles", type=int, default=c.lc25000_tiles,
        help="LC25000 tiles (whole dHash groups) used for the probe CV",
    )  # fmt: skip
    p.add_argument("--folds", type=int, default=c.folds)
    p.add_argument("--threads", type=int, default=c.threads)
    p.add_argument("--seed", type=int, default=c.seed)


# ----------------------------------------------------------------------------- evaluate nuclei


def _add_evaluate_nuclei(p: argparse.ArgumentParser) -> None:
    """Options of ``histolens evaluate nuclei``."""
    c = EvaluateConfig
    p.add_argument("--images", type=Path, required=True, help="folder of RGB images")
    p.add_argument(
        "--labels", type=Path, required=True,
        help="folder of instance labels (<stem>.png/.tif, 0 = background) or of MoNuSeg's Aperio XML outlines (<stem>.xml)",
    )  # fmt: skip
    p.add_argument("--mpp", type=mpp_value, required=True, help="um/px of the images")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--pred", type=Path, default=None,
        help="score these predictions (<stem>.tif) instead of running a model",
    )  # fmt: skip
    src.add_argument(
        "--baseline", action="store_true",
        help="score the classical baseline (H channel + Otsu + watershed)",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="registered model (default: histolens-default)")
    p.add_argument("--weights", type=Path, default=None, help="weights file for --model")
    p.add_argument(
        "--only", type=_names, default=None,
        help="comma-separated image stems or 12-char patient ids to score",
    )  # fmt: skip
    p.add_argument(
        "--json", type=Path, default=None, help="also write per-image and mean scores here"
    )
    p.add_argument("--threads", type=positive_int, default=c.threads)
    p.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=c.tta,
        help="when running the model: average 8 flips/transposes, as `histolens nuclei` does (default: %(default)s)",
    )  # fmt: skip


# ----------------------------------------------------------------------------- dispatch

TRAIN_TASKS = {
    "nuclei": _Task(
        "train backbone + nuclei heads (HoVer-style) from random init",
        _add_train_nuclei, TrainNucleiConfig, "histolens.training.train:train_nuclei",
    ),
    "tiles": _Task(
        "fit a tile-class head on your own labelled tiles; write new weights + card",
        _add_train_tiles, TrainTilesConfig, "histolens.training.probe:train_tiles",
    ),
    "release": _Task(
        "evaluate a finished nuclei run, fit the Kather tile head, write weights + card",
        _add_train_release, ReleaseConfig, "histolens.training.release:release",
    ),
}  # fmt: skip
EVALUATE_TASKS = {
    "nuclei": _Task(
        "Dice, AJI and PQ of nuclei instances against label images",
        _add_evaluate_nuclei, EvaluateConfig, "histolens.training.evaluate:evaluate_nuclei",
    ),
}  # fmt: skip


def _add_tasks(parser: argparse.ArgumentParser, tasks: dict[str, _Task]) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, task in tasks.items():
        p = sub.add_parser(name, help=task.help, description=task.help)
        task.add_arguments(p)
        p.set_defaults(_task=task)


def _run_task(args: argparse.Namespace) -> int:
    """Build the task's config (a bad value raises its one-line ValueError) and run it."""
    task: _Task = args._task
    config = task.config.from_args(args)
    module, _, function = task.target.partition(":")
    return int(getattr(importlib.import_module(module), function)(config) or 0)


train = Command(lambda p: _add_tasks(p, TRAIN_TASKS), _run_task)
evaluate = Command(lambda p: _add_tasks(p, EVALUATE_TASKS), _run_task)
