"""Region -> tiles -> model -> aligned :class:`~histolens.result.RegionResult`.

:func:`analyze` is a generator: it yields a partial result (``complete=False``) each time a
batch of tiles finishes, so a GUI can show progress, paint overlays as they arrive and cancel,
and it ends with the full result (also its return value). :func:`analyze_region` drains it.

Pipeline per region: choose the pyramid level by the model's mpp, lay the global tile grid
(:mod:`histolens.tiles`) over the region in *analysis pixels*, look tiles up in a
byte-bounded LRU cache (:class:`TileCache`), read the missing ones in a background thread
(prefetching the next batch while the model runs the current one), skip glass by a cheap
tissue test, run the model in batches (halving the batch on an out-of-memory error),
post-process nuclei per block and keep the instances whose centroid a tile owns, and paste
everything into region-sized canvases. The steps live in the private engine
(``histolens._engine``), shared with the batch runner; this module is the loop that pastes
and reports. Nothing here imports torch at module level; the model object hides it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ._engine import (
    BlockRunner,
    PreparedRun,
    ResultAssembly,
    TileCache,
    TileModel,
    TileOutput,
    batch_blocks,
    order_blocks,
    prepare_run,
)
from .models.card import ALL_TASKS
from .region import Region
from .result import Provenance, RegionResult
from .tiles import Tile

__all__ = ["ALL_TASKS", "TileCache", "TileModel", "analyze", "analyze_region"]


class _RegionProgress:
    """One :func:`analyze` call's canvases, provenance and stage timings, as tiles land."""

    def __init__(self, run: PreparedRun, t_start: float) -> None:
        self.run, self.t_start = run, t_start
        self.asm = ResultAssembly(run.plan, run.settings.card, run.settings.tasks)
        self.prov = run.provenance
        stages = ("read", "preprocess", "model", "postprocess", "stitch")
        self.timings = dict.fromkeys((*stages, "model_input_px", "decoded_px"), 0.0)
        self.prov.timings = self.timings

    def paste(self, items: Sequence[tuple[Tile, TileOutput]]) -> None:
        t0 = time.perf_counter()
        for tile, out in items:
            self.asm.paste(tile, out)
            self.prov.tiles_done += 1
            self.prov.tiles_skipped += int(out.skipped)
        self.timings["stitch"] += time.perf_counter() - t0

    @property
    def unfinished(self) -> bool:
        return self.prov.tiles_done < len(self.run.tiles)

    def snapshot(self, *, complete: bool) -> RegionResult:
        """The result so far: copies of the canvases while more tiles may land."""
        self.prov.seconds = time.perf_counter() - self.t_start
        p = Provenance(**{**self.prov.__dict__, "timings": dict(self.timings)})
        return self.asm.build(p, complete=complete, copy=not complete)

    def partial(self) -> RegionResult:
        self.timings.setdefault("first_partial", time.perf_counter() - self.t_start)
        return self.snapshot(complete=False)


def _cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def analyze(
    slide: Any,
    region: Region,
    *,
    model: str | TileModel | None = None,
    tasks: Sequence[str] = ALL_TASKS,
    mpp: float | None = None,
    device: str | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    precision: str = "auto",
    batch_size: int = 4,
    tile_size: int | None = None,
    cache: TileCache | bool | None = None,
    skip_background: bool = True,
    crop_decoder: bool = True,
) -> Generator[RegionResult, None, RegionResult]:
    """Analyse ``region`` (level-0 px) of ``slide``; yield partial results, return the full one.

    Parameters
    ----------
    model
        A registered name, a model object (``.card`` + ``.predict_tiles``), or None for the
        default model.
    mpp
        Level-0 um/px overriding the slide's (required when the slide has none).
    cancel
        A ``threading.Event`` or a callable; checked between model calls (after each
        partial result). A cancelled run ends with the tiles that finished,
        ``complete=False`` and ``provenance.cancelled``.
    precision
        ``"auto"`` (mixed precision where the device runs it natively), ``"bf16"``,
        ``"fp16"`` or ``"fp32"``.
    batch_size
        Tiles per model call (halved automatically on out-of-memory).
    tile_size
        Owned tile side in analysis pixels, each tile run alone. Default: a third of the
        card's owned size, uncached neighbours run together in blocks of up to 3 x 3.
    cache
        A :class:`TileCache`, None for the process-wide one, False for none.
    skip_background
        Skip tiles whose owned area is mostly glass (counted in ``tiles_skipped``).
    crop_decoder
        Decode and post-process nuclei only over the part of each model input's owned area
        inside the region, plus ``histolens._engine.NUCLEI_MARGIN_UM`` (models with
        ``supports_nuclei_box``); the halo beyond it feeds only the backbone. A tile at the
        region's edge is then cached with its nuclei for that part only and recomputed when
        a later region needs more of it. False decodes every whole input (the engine before
        issue 15, kept for benchmarks).
    """
    t_start = time.perf_counter()
    run = prepare_run(
        slide, region, model=model, tasks=tasks, mpp=mpp, device=device, precision=precision,
        batch_size=batch_size, tile_size=tile_size, cache=cache,
    )  # fmt: skip
    progress = _RegionProgress(run, t_start)
    if not run.tiles:
        result = progress.snapshot(complete=True)
        yield result
        return result
    return (yield from _run_tiles(run, progress, cancel, batch_size, skip_background, crop_decoder))


def _run_tiles(
    run: PreparedRun,
    progress: _RegionProgress,
    cancel: Any,
    batch_size: int,
    skip_background: bool,
    crop_decoder: bool,
) -> Generator[RegionResult, None, RegionResult]:
    """Paste the cached tiles, then compute the others centre first, yielding as they land."""
    cached, todo = run.lookup()
    prov, plan, settings = progress.prov, run.plan, run.settings
    runner = BlockRunner(
        run.slide, plan, settings.model, settings.tasks, precision=settings.precision,
        batch_size=batch_size, skip_background=skip_background, crop_decoder=crop_decoder,
        # Nuclei are decoded only where this view needs them (tiles at its edge partly).
        view=plan.box if crop_decoder else None, timings=progress.timings,
    )  # fmt: skip
    batches = batch_blocks(order_blocks(todo, plan), batch_size)
    # Work planned, for the time-left estimate (progress.seconds_left).
    progress.timings["planned_input_px"] = float(sum(b.outer.area for bb in batches for b in bb))
    # Cached tiles first: panning back paints the known part at once.
    progress.paste(cached)
    prov.tiles_cached = len(cached)
    if cached and batches:
        yield progress.partial()
    computed = runner.run(batches, prefetch=True)
    try:
        if _cancelled(cancel):
            prov.cancelled = True
        else:
            for done in computed:
                progress.paste(run.store(done))
                if progress.unfinished:
                    yield progress.partial()
                # Checked after the consumer had the partial result, before the next batch runs.
                if _cancelled(cancel):
                    prov.cancelled = progress.unfinished
                    break
    finally:
        computed.close()
    progress.timings["oom_retries"] = float(runner.oom_retries)
    result = progress.snapshot(complete=not prov.cancelled)
    yield result
    return result


def analyze_region(slide: Any, region: Region, **kwargs: Any) -> RegionResult:
    """Run :func:`analyze` to the end and return its last (full or cancelled) result."""
    result = None
    for result in analyze(slide, region, **kwargs):  # noqa: B007 (the last one is returned)
        pass
    assert result is not None  # analyze always yields at least once
    return result
