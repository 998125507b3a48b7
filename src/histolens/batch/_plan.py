"""Each slide of a batch opened, planned on the engine's grid and cut into shards."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histolens.progress import ProgressPrinter
from histolens.region import Region

from ._options import DEFAULT_SHARD_PX, BatchOptions
from ._tissue import tiles_in_mask, tissue_mask

__all__ = ["MAX_ANALYSIS_PX", "SlideJob", "SlideOutcome", "plan_slides", "shard_blocks"]

#: Most pixels one slide may have on the model's grid (a 200k x 200k px slide at 0.25 um/px
#: is 1e10): more means a wrong mpp, and its plan alone would not fit in memory.
MAX_ANALYSIS_PX = 2**36


def shard_blocks(blocks: Sequence[Any], shard_px: int = DEFAULT_SHARD_PX) -> list[list[Any]]:
    """The engine's model blocks dealt into square shards of ``shard_px`` analysis pixels.

    A model block (:class:`histolens.tiles.Block`, adjacent tiles run as one input) goes to
    the shard holding its top-left corner, so no block is split and every tile is computed
    exactly as the engine computes it. Shards are listed row-major, blocks in given order.
    """
    w = max(1, int(shard_px))
    shards: dict[tuple[int, int], list[Any]] = {}
    for b in blocks:
        shards.setdefault((b.inner.y0 // w, b.inner.x0 // w), []).append(b)
    return [shards[key] for key in sorted(shards)]


@dataclass
class SlideOutcome:
    """What happened to one slide of a batch: its output folder and files, or the error."""

    path: str
    out_dir: Path | None
    files: dict[str, Path]
    error: str | None
    seconds: float
    nuclei: int = 0
    tiles_run: int = 0
    tiles_total: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, path: str, out_dir: Path | None, error: str, started: float) -> SlideOutcome:
        """A slide that failed with ``error``, ``started`` at that ``time.perf_counter()``."""
        return cls(path, out_dir, {}, error, time.perf_counter() - started)


@dataclass
class SlideJob:
    """One slide being analysed: its plan, its shards and the tile outputs received so far."""

    path: str
    slide: Any
    out_dir: Path
    plan: Any
    tiles: list[Any]
    run_mask: np.ndarray  # per tile: run it (tissue) or not
    model_blocks: list[Any]  # the engine's blocks of the tiles to run, in the engine's order
    shards: list[list[Any]]  # lists of model blocks, one task each
    provenance: Any
    t_start: float
    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    pending: int = 0  # shards not yet received
    error: str | None = None


def plan_slides(
    paths: Sequence[str],
    out_root: Path,
    options: BatchOptions,
    settings: Any,
    outcomes: dict[str, SlideOutcome],
    progress: ProgressPrinter,
) -> dict[int, SlideJob]:
    """Open and plan every slide; a slide that fails here gets its outcome and no job."""
    from histolens.slide._open import slide_name

    jobs: dict[int, SlideJob] = {}
    used: set[str] = set()
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            out_dir = _output_dir(out_root, slide_name(Path(path)), used)
            job = jobs[i] = _plan_slide(path, out_dir, options, settings)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            outcomes[path] = SlideOutcome.failed(path, None, error, t0)
            progress.log(f"FAILED {path}: {error} (skipped; the other slides go on)")
            continue
        progress.log(
            f"{Path(path).name}: {len(job.tiles)} tiles, {int(job.run_mask.sum())} with tissue, "
            f"{len(job.shards)} shards, analysis {job.plan.analysis_mpp:.3g} um/px "
            f"(level {job.plan.level.level})"
        )
    return jobs


def _output_dir(out: Path, name: str, used: set[str]) -> Path:
    base, k = name, 1
    while name in used:  # two slides with the same stem in one batch keep both outputs
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return out / name


def _plan_slide(path: str, out_dir: Path, options: BatchOptions, settings: Any) -> SlideJob:
    from histolens._engine import order_blocks, plan_analysis, run_provenance
    from histolens.slide import open_slide

    slide = open_slide(path, mpp=options.mpp)
    try:
        slide_mpp, reg = _checked_slide(path, slide, options)
        card = settings.card
        plan = plan_analysis(reg, slide_mpp, slide.downsamples, card, tile_size=options.tile_size)
        if plan.box.height * plan.box.width > MAX_ANALYSIS_PX:
            msg = (
                f"{path}: at {slide_mpp:g} um/px the region is {plan.box.height} x "
                f"{plan.box.width} px on the model's {card.mpp:g} um/px grid, more than "
                f"{MAX_ANALYSIS_PX:.3g}; check --mpp"
            )
            raise ValueError(msg)
        tiles = plan.grid.tiles(plan.box)
        run_mask = np.ones(len(tiles), bool)
        if options.tissue_mask:
            run_mask = tiles_in_mask(tiles, plan.f, *tissue_mask(slide))
        prov = run_provenance(
            slide, reg, plan, settings, slide_mpp=slide_mpp, tiles_total=len(tiles),
            mpp_source="user" if options.mpp is not None else str(slide.mpp_source),
            slide_path=str(getattr(slide, "path", path) or path),
        )  # fmt: skip
    except BaseException:
        slide.close()
        raise
    # Grouped and ordered exactly as analyze() runs a fresh region (its blocks are the model
    # inputs, its order the paste order), then dealt out in shards.
    blocks = order_blocks([t for t, keep in zip(tiles, run_mask, strict=True) if keep], plan)
    shards = shard_blocks(blocks, options.shard_px)
    return SlideJob(
        path, slide, out_dir, plan, tiles, run_mask, blocks, shards, prov, time.perf_counter()
    )


def _checked_slide(path: str, slide: Any, options: BatchOptions) -> tuple[float, Region]:
    """The level-0 mpp the slide is analysed at and the region of it (clipped to the slide)."""
    from histolens._engine import level0_mpp
    from histolens.slide import SlideError

    try:
        slide_mpp = level0_mpp(slide, options.mpp)
    except ValueError:  # said here with the command line's flag, and naming the file
        raise SlideError(
            path,
            "the slide records no pixel size (mpp)",
            "rerun with --mpp <um per level-0 px>, e.g. --mpp 0.25 for 40x or 0.5 for 20x",
        ) from None
    shape = tuple(int(v) for v in slide.shape[:2])
    region = options.region
    reg = Region.full(shape) if region is None else region.clip(shape)
    if reg.is_empty:
        msg = (
            f"{path}: region {region.as_tuple() if region else None} is outside the slide "
            f"{shape} (level-0 px); give y0,x0,y1,x1 inside (0, 0, {shape[0]}, {shape[1]})"
        )
        raise ValueError(msg)
    return slide_mpp, reg
