"""What a batch run is asked to do: :class:`BatchOptions`, checked once when it is made."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from histolens.region import Region

__all__ = ["DEFAULT_SHARD_PX", "BatchOptions"]

#: Side of a shard in analysis pixels (rounded to whole blocks): big enough that a task's
#: scheduling overhead is small next to its model time, small enough to balance 2+ workers.
DEFAULT_SHARD_PX = 1024


@dataclass(frozen=True)
class BatchOptions:
    """How :func:`histolens.batch.run_batch` analyses slides (``histolens analyze``'s options).

    Every value is checked when the object is made; a bad one raises ``ValueError`` naming the
    field, the value and what is allowed. Sequences are stored as tuples and ``region`` may be
    given as ``"y0,x0,y1,x1"`` text. Change a few fields of a copy with :meth:`replace`.

    Attributes:
        model: a registered model name, None for the embedded default, or a model object.
        tasks: among ``"nuclei"``, ``"tiles"``, ``"attention"``.
        region: a level-0 box (y, x, half-open) analysed on every slide; None: whole slides.
        mpp: level-0 um/px for slides that record none (it also overrides one they record).
        workers: 0 runs in this process; N starts a loopback dask ``LocalCluster`` of N
            single-threaded worker processes.
        scheduler: address of a running dask scheduler (``tcp://host:8786``) instead.
        tissue_mask: drop the tiles where the slide's tissue mask finds only glass, unread.
        shard_px: side of a shard (the blocks one task runs) in analysis px.
        tile_size: the engine's tile side in analysis px (None: the model card's).
        batch_size: blocks per model call.
        precision: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        skip_background: skip the model on tiles whose pixels are nearly all glass.
        formats: files to write (None: :data:`histolens.export.DEFAULT_FORMATS`).
        png: also render ``overview.png`` per slide.
        progress: print progress (a bar on a terminal, timestamped lines otherwise).
        tile_classifier: a taught :class:`histolens.teach.TileClassifier` (or its file) whose
            tile classes replace the model's.
    """

    model: Any = None
    tasks: tuple[str, ...] = ("nuclei", "tiles")
    region: Region | None = None
    mpp: float | None = None
    workers: int = 0
    scheduler: str | None = None
    tissue_mask: bool = True
    shard_px: int = DEFAULT_SHARD_PX
    tile_size: int | None = None
    batch_size: int = 4
    precision: str = "auto"
    skip_background: bool = True
    formats: tuple[str, ...] | None = None
    png: bool = False
    progress: bool = True
    tile_classifier: Any = None

    def __post_init__(self) -> None:
        for name, value in _checked(self).items():
            object.__setattr__(self, name, value)

    @property
    def distributed(self) -> bool:
        """Whether the work runs on dask (local workers or a scheduler), not in this process."""
        return bool(self.workers) or self.scheduler is not None

    def replace(self, **changes: Any) -> BatchOptions:
        """A copy with ``changes`` (checked like a new object)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            msg = f"BatchOptions has no option(s) {unknown}; see help(BatchOptions)"
            raise TypeError(msg)
        return replace(self, **changes)


def _checked(o: BatchOptions) -> dict[str, Any]:
    """Every field of ``o`` checked, and normalised where a field accepts several forms."""
    from histolens.models import ALL_TASKS
    from histolens.models.precision import PRECISIONS

    tasks = _names("tasks", o.tasks, ALL_TASKS)
    if not tasks:
        _fail("tasks", o.tasks, f"at least one of {', '.join(ALL_TASKS)}")
    formats = None
    if o.formats is not None:
        from histolens.export._write import WRITERS

        formats = _names("formats", o.formats, tuple(WRITERS))
    if o.workers and o.scheduler is not None:
        msg = (
            f"BatchOptions: give workers (got {o.workers}) or scheduler (got {o.scheduler!r}), "
            "not both: workers start a local cluster, scheduler joins a running one"
        )
        raise ValueError(msg)
    if str(o.precision).lower() not in PRECISIONS:
        _fail("precision", o.precision, f"one of {', '.join(PRECISIONS)}")
    return {
        "tasks": tasks,
        "formats": formats,
        "region": _region(o.region),
        "mpp": _mpp(o.mpp),
        "workers": _int("workers", o.workers, least=0),
        "shard_px": _int("shard_px", o.shard_px, least=1),
        "batch_size": _int("batch_size", o.batch_size, least=1),
        "tile_size": None if o.tile_size is None else _int("tile_size", o.tile_size, least=1),
        "scheduler": None if o.scheduler is None else str(o.scheduler),
        "precision": str(o.precision).lower(),
        "tile_classifier": (
            Path(o.tile_classifier) if isinstance(o.tile_classifier, str) else o.tile_classifier
        ),
    }


def _fail(name: str, value: Any, allowed: str) -> None:
    msg = f"BatchOptions.{name} must be {allowed}, got {value!r}"
    raise ValueError(msg)


def _names(name: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    unknown = [v for v in items if v not in allowed]
    if unknown:
        _fail(name, value, f"among {', '.join(allowed)} (unknown: {', '.join(map(str, unknown))})")
    return tuple(dict.fromkeys(items))


def _int(name: str, value: Any, *, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        _fail(name, value, f"an integer >= {least}")
    return int(value)


def _mpp(value: Any) -> float | None:
    from histolens._args import MPP_RANGE

    if value is None:
        return None
    lo, hi = MPP_RANGE
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        _fail("mpp", value, f"a level-0 um/px from {lo:g} to {hi:g} (0.25 at 40x, 0.5 at 20x)")
    return mpp


def _region(value: Any) -> Region | None:
    if value is None or isinstance(value, Region):
        return value
    if isinstance(value, str):
        return Region.from_string(value)
    _fail("region", value, "a histolens.Region, 'y0,x0,y1,x1' text or None")
    return None
