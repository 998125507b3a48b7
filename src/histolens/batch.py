"""Whole-slide and many-slide runs, here or on ``dask.distributed``: ``histolens analyze``.

A slide is analysed on the engine's global tile grid (:mod:`histolens.tiles`). Tiles are kept
where an Otsu tissue mask from a low pyramid level finds tissue, grouped into the engine's
model blocks (adjacent tiles run as one input, with the card's halo around the block), and
the blocks are cut into square work units of about ``block_px`` analysis pixels. Each unit
is read, run and post-processed where the work runs (this process, or a dask worker that
reopens the slide from its path). A tile keeps the nuclei whose centroid it owns, seen whole
thanks to the halo, so units need no overlap of their own; the main process then pastes
every tile's output in the engine's order with the engine's canvases. Nuclei labels and
tile classes are therefore the same however the units were spread over workers, and the same
as :func:`histolens.inference.analyze_region` on the whole region when the mask is off;
float outputs of a torch model agree to float32 rounding (~1e-7: BLAS sums depend on the
thread count and on which blocks share a model call).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .region import Region

__all__ = [
    "DEFAULT_BLOCK_PX",
    "SlideOutcome",
    "add_arguments",
    "group_work",
    "run",
    "run_batch",
    "tissue_mask",
    "tiles_in_mask",
]

#: Side of a work block in analysis pixels (rounded to whole tiles): big enough that a task's
#: scheduling overhead is small next to its model time, small enough to balance 2+ workers.
DEFAULT_BLOCK_PX = 1024
#: Most pixels one slide may have on the model's grid (a 200k x 200k px slide at 0.25 um/px
#: is 1e10): more means a wrong mpp, and its plan alone would not fit in memory.
MAX_ANALYSIS_PX = 2**36
#: Longest side of the low-resolution image the tissue mask is computed on.
MASK_MAX_SIDE = 2048


# --------------------------------------------------------------------------- tissue mask
def tissue_mask(
    slide: Any, *, max_side: int = MASK_MAX_SIDE
) -> tuple[np.ndarray, tuple[float, float]]:
    """Boolean tissue mask of the whole slide and level-0 px per mask pixel ``(y, x)``.

    Otsu's threshold on the stain saturation ``(max - min) / max`` separates glass from H&E;
    it is clamped to [0.04, 0.12] because a slide that is all tissue (or all glass) has no
    such split and a free Otsu would then cut the tissue in half. Dark pixels (folds, dense
    nuclei) count as tissue too. The mask is dilated by one pixel so tissue at a mask
    pixel's edge is never lost.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    h0, w0 = (int(v) for v in slide.shape[:2])
    downsamples = [float(d) for d in slide.downsamples]
    fits = [i for i, d in enumerate(downsamples) if max(h0, w0) / d <= max_side]
    level = min(fits, key=lambda i: downsamples[i]) if fits else int(np.argmax(downsamples))
    arr = slide.levels[level]
    stride = max(1, math.ceil(max(arr.shape[0], arr.shape[1]) / max_side))
    px = np.asarray(arr[::stride, ::stride])[..., :3].astype(np.int16)
    if px.size == 0:
        return np.zeros((0, 0), bool), (1.0, 1.0)
    mx, mn = px.max(axis=2), px.min(axis=2)
    sat = (mx - mn) / np.maximum(mx, 1)
    try:
        t = float(threshold_otsu(sat))
    except ValueError:  # a constant image
        t = 0.08
    t = min(max(t, 0.04), 0.12)
    mask = (sat > t) | (mx < 0.2 * 255)
    mask = ndimage.binary_dilation(mask, iterations=1)
    return mask, (h0 / mask.shape[0], w0 / mask.shape[1])


def tiles_in_mask(
    tiles: Sequence[Any], f: float, mask: np.ndarray, mask_scale: tuple[float, float]
) -> np.ndarray:
    """Per tile (inner box in analysis px of ``f`` level-0 px): does the mask have tissue there."""
    if mask.size == 0:
        return np.zeros(len(tiles), bool)
    # Summed-area table: any() over a box in O(1) per tile, for whole slides of 10^5 tiles.
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    sy, sx = mask_scale
    keep = np.zeros(len(tiles), bool)
    for i, t in enumerate(tiles):
        y0 = min(max(int(math.floor(t.inner.y0 * f / sy)), 0), mask.shape[0])
        x0 = min(max(int(math.floor(t.inner.x0 * f / sx)), 0), mask.shape[1])
        y1 = min(max(int(math.ceil(t.inner.y1 * f / sy)), y0), mask.shape[0])
        x1 = min(max(int(math.ceil(t.inner.x1 * f / sx)), x0), mask.shape[1])
        keep[i] = (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0
    return keep


def group_work(blocks: Sequence[Any], work_px: int = DEFAULT_BLOCK_PX) -> list[list[Any]]:
    """The engine's model blocks grouped into square work units of ``work_px`` analysis pixels.

    A model block (:class:`histolens.tiles.Block`, adjacent tiles run as one input) goes to
    the unit holding its top-left corner, so no block is split and every tile is computed
    exactly as the engine computes it. Units are listed row-major, blocks in given order.
    """
    w = max(1, int(work_px))
    units: dict[tuple[int, int], list[Any]] = {}
    for b in blocks:
        units.setdefault((b.inner.y0 // w, b.inner.x0 // w), []).append(b)
    return [units[key] for key in sorted(units)]


# --------------------------------------------------------------------------- work units
def _open_slide_ref(ref: Any) -> Any:
    """A slide from what a task received: a Slide (in process) or ``(path, mpp)`` (a worker)."""
    if isinstance(ref, tuple):
        return _cached_slide(*ref)
    return ref


_SLIDES: dict[tuple[str, float | None], Any] = {}


def _cached_slide(path: str, mpp: float | None) -> Any:
    # One open file per worker process and slide: blocks of a slide reuse its handles.
    key = (path, mpp)
    if key not in _SLIDES:
        from .slide import open_slide

        if len(_SLIDES) >= 8:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        _SLIDES[key] = open_slide(path, mpp=mpp)
    return _SLIDES[key]


def _run_block(
    slide_ref: Any,
    plan: Any,
    blocks: Sequence[Any],
    model: Any,
    tasks: tuple[str, ...],
    precision: str,
    batch_size: int,
    skip_background: bool,
    threads: int | None,
) -> tuple[list[list[Any]], dict[str, float]]:
    """Read, predict and post-process the model ``blocks`` of one work unit, as the engine does.

    Returns, per block, its tiles' outputs (owned instances, class cells, attention) in the
    block's tile order, and the seconds spent per stage.
    """
    import dask

    from ._engine import BlockRunner, batch_blocks
    from ._parcel import unpack_model

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    # Pixels are read inside this task: on a dask worker, a nested compute() would otherwise
    # go back to the distributed scheduler (and try to ship open file handles there).
    with dask.config.set(scheduler="synchronous"):
        runner = BlockRunner(
            _open_slide_ref(slide_ref), plan, unpack_model(model), tasks, precision=precision,
            batch_size=batch_size, skip_background=skip_background,
        )  # fmt: skip
        # Grouped into model calls exactly as analyze() groups a fresh region's blocks.
        done = [outs for batch in runner.run(batch_blocks(blocks, batch_size)) for _, outs in batch]
    stages = ("read", "preprocess", "model", "postprocess")
    return done, {
        **{k: runner.timings[k] for k in stages},
        "oom_retries": float(runner.oom_retries),
    }


# --------------------------------------------------------------------------- one slide
@dataclass
class _SlideJob:
    path: str
    slide: Any
    out_dir: Path
    plan: Any
    tiles: list[Any]
    run_mask: np.ndarray  # per tile: run it (tissue) or not
    model_blocks: list[Any]  # the engine's blocks of the tiles to run, in the engine's order
    blocks: list[list[Any]]  # work units: lists of model blocks
    provenance: Any
    t_start: float
    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    pending: int = 0
    error: str | None = None


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


def _output_dir(out: Path, name: str, used: set[str]) -> Path:
    base, k = name, 1
    while name in used:  # two slides with the same stem in one batch keep both outputs
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return out / name


def _plan_slide(
    path: str,
    *,
    out_dir: Path,
    region: Region | None,
    mpp: float | None,
    use_mask: bool,
    block_px: int,
    tile_size: int | None,
    settings: Any,
) -> _SlideJob:
    from ._engine import order_blocks, plan_analysis, run_provenance
    from .slide import SlideError, open_slide

    slide = open_slide(path, mpp=mpp)
    slide_mpp = mpp if mpp is not None else slide.mpp
    if slide_mpp is None:
        slide.close()
        raise SlideError(
            path,
            "the slide records no pixel size (mpp)",
            "rerun with --mpp <um per level-0 px>, e.g. --mpp 0.25 for 40x or 0.5 for 20x",
        )
    shape = tuple(int(v) for v in slide.shape[:2])
    reg = Region.full(shape) if region is None else region.clip(shape)
    if reg.is_empty:
        slide.close()
        msg = (
            f"{path}: region {region.as_tuple() if region else None} is outside the slide "
            f"{shape} (level-0 px); give y0,x0,y1,x1 inside (0, 0, {shape[0]}, {shape[1]})"
        )
        raise ValueError(msg)
    card = settings.card
    plan = plan_analysis(reg, float(slide_mpp), slide.downsamples, card, tile_size=tile_size)
    if plan.box.height * plan.box.width > MAX_ANALYSIS_PX:
        slide.close()
        msg = (
            f"{path}: at {slide_mpp:g} um/px the region is {plan.box.height} x {plan.box.width} px "
            f"on the model's {card.mpp:g} um/px grid, more than {MAX_ANALYSIS_PX:.3g}; check --mpp"
        )
        raise ValueError(msg)
    tiles = plan.grid.tiles(plan.box)
    if use_mask:
        mask, scale = tissue_mask(slide)
        run_mask = tiles_in_mask(tiles, plan.f, mask, scale)
    else:
        run_mask = np.ones(len(tiles), bool)
    # Grouped and ordered exactly as analyze() runs a fresh region (its blocks are the model
    # inputs, its order the paste order), then dealt out in work units.
    model_blocks = order_blocks([t for t, keep in zip(tiles, run_mask, strict=True) if keep], plan)
    blocks = group_work(model_blocks, block_px)
    prov = run_provenance(
        slide, reg, plan, settings, slide_mpp=float(slide_mpp), tiles_total=len(tiles),
        mpp_source="user" if mpp is not None else str(slide.mpp_source),
        slide_path=str(getattr(slide, "path", path) or path),
    )  # fmt: skip
    return _SlideJob(
        path, slide, out_dir, plan, tiles, run_mask, model_blocks, blocks, prov, time.perf_counter()
    )


def _assemble(job: _SlideJob, card: Any, tasks: tuple[str, ...]) -> Any:
    """Paste every tile's output in the engine's order (block by block); build the result."""
    from ._engine import ResultAssembly, TileOutput

    asm = ResultAssembly(job.plan, card, tasks)
    prov = job.provenance
    t0 = time.perf_counter()
    skipped = TileOutput(skipped=True)
    ran = set()
    for block in job.model_blocks:
        for t in block.tiles:
            out = job.outputs.get((t.row, t.col), skipped)
            asm.paste(t, out)
            ran.add((t.row, t.col))
            prov.tiles_skipped += int(out.skipped)
    prov.tiles_skipped += len(job.tiles) - len(ran)  # masked out as glass: never read
    prov.tiles_done = len(job.tiles)
    job.timings["stitch"] = job.timings.get("stitch", 0.0) + time.perf_counter() - t0
    job.timings["work_units"] = float(len(job.blocks))
    job.timings["tiles_masked_out"] = float(np.count_nonzero(~job.run_mask))
    prov.timings = dict(job.timings)
    prov.seconds = time.perf_counter() - job.t_start
    return asm.build(prov, complete=True, copy=False)


# --------------------------------------------------------------------------- executors
class _InProcess:
    """Runs each task when asked for its result, in submission order (no dask needed)."""

    def __init__(self) -> None:
        self._tasks: list[tuple[Any, Callable[..., Any], tuple]] = []

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> None:
        self._tasks.append((key, fn, args))

    def results(self) -> Iterator[tuple[Any, Any, BaseException | None]]:
        while self._tasks:
            key, fn, args = self._tasks.pop(0)
            try:
                yield key, fn(*args), None
            except Exception as exc:  # reported per slide; the batch goes on
                yield key, None, exc

    def cancel(self, predicate: Callable[[Any], bool]) -> None:
        self._tasks = [t for t in self._tasks if not predicate(t[0])]


class _Distributed:
    """Tasks on a dask.distributed cluster; results as they complete."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._futures: dict[Any, Any] = {}
        self._keys: dict[str, Any] = {}

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> None:
        fut = self.client.submit(fn, *args, pure=False)
        self._futures[key] = fut
        self._keys[fut.key] = key

    def results(self) -> Iterator[tuple[Any, Any, BaseException | None]]:
        from distributed import as_completed

        for fut in as_completed(list(self._futures.values()), loop=self.client.loop):
            key = self._keys[fut.key]
            if fut.cancelled():
                continue
            try:
                yield key, fut.result(), None
            except Exception as exc:
                yield key, None, exc

    def cancel(self, predicate: Callable[[Any], bool]) -> None:
        doomed = [f for k, f in self._futures.items() if predicate(k)]
        if doomed:
            self.client.cancel(doomed)


class _Progress:
    """A tqdm bar on a terminal; plain timestamped lines (at most every ``every`` s) otherwise."""

    def __init__(
        self, total: int, *, stream: Any = None, every: float = 10.0, enabled: bool = True
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done, self.every = total, 0, every
        self.enabled = enabled
        self.t0 = self._last = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            import shutil

            from tqdm.auto import tqdm

            # A pseudo-terminal may report a 0 x 0 size, and tqdm then draws nothing at all.
            size = shutil.get_terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0
            self.bar = tqdm(
                total=total, unit="tile", file=self.stream, dynamic_ncols=sized,
                ncols=None if sized else 100, nrows=None if sized else 20,
            )  # fmt: skip

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            stamp = datetime.now().strftime("%H:%M:%S")
            print(f"{stamp} histolens: {text}", file=self.stream, flush=True)

    def update(self, n: int, label: str = "") -> None:
        self.done += n
        if self.bar is not None:
            if label:
                self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.log(f"tiles {self.done}/{self.total} ({rate:.1f} tiles/s) {label}".rstrip())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the batch
def run_batch(
    slides: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    model: Any = None,
    tasks: Sequence[str] = ("nuclei", "tiles"),
    region: Region | None = None,
    mpp: float | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    client: Any = None,
    tissue: bool = True,
    block_px: int = DEFAULT_BLOCK_PX,
    tile_size: int | None = None,
    batch_size: int = 4,
    precision: str = "auto",
    skip_background: bool = True,
    formats: Sequence[str] | None = None,
    png: bool = False,
    progress: bool = True,
    stream: Any = None,
    on_result: Callable[[str, Any], None] | None = None,
    tile_classifier: Any = None,
) -> list[SlideOutcome]:
    """Analyse every slide (whole, or ``region`` in level-0 px) and write ``out/<name>/`` files.

    Work runs in this process (``workers=0``), on a new loopback ``LocalCluster`` of
    ``workers`` single-threaded processes, on the cluster at ``scheduler``, or on an existing
    dask ``client``. A slide that fails (unreadable file, missing mpp, a worker error) is
    reported in its :class:`SlideOutcome` and skipped; the others finish.
    ``on_result(path, RegionResult)`` is called for each finished slide (tests, notebooks).
    ``tile_classifier`` (a :class:`histolens.teach.TileClassifier` or its file) replaces the
    model's tile classes by a taught classifier's (checked against the model before any work).
    """
    from ._engine import resolve_settings

    out_root = Path(out)
    out_root.mkdir(parents=True, exist_ok=True)
    paths = [os.fspath(p) for p in slides]
    distributed = bool(workers) or scheduler is not None or client is not None
    if scheduler is not None and client is None:
        from ._cluster import check_scheduler

        check_scheduler(scheduler)  # before the model loads or any slide opens: fail fast
    settings = resolve_settings(
        model, tasks, device="cpu" if distributed else None, precision=precision
    )
    write_result, fmts = _writer(settings, formats, png, tile_classifier)
    if scheduler is not None and client is None:
        from ._cluster import connect_scheduler

        client = connect_scheduler(scheduler)
    prog = _Progress(0, stream=stream, enabled=progress)
    outcomes: dict[str, SlideOutcome] = {}
    jobs = _plan_slides(
        paths, out_root, settings, outcomes, prog, region=region, mpp=mpp, use_mask=tissue,
        block_px=block_px, tile_size=tile_size,
    )  # fmt: skip
    own_cluster = None
    if distributed and client is None:
        own_cluster, client = _local_cluster(workers)
    finish = functools.partial(
        _finish, card=settings.card, tasks=settings.tasks, fmts=fmts, outcomes=outcomes, prog=prog,
        write_result=write_result, on_result=on_result,
    )  # fmt: skip
    try:
        executor = _submit_all(
            jobs, settings, client if distributed else None, prog, mpp=mpp,
            batch_size=batch_size, skip_background=skip_background,
        )  # fmt: skip
        _collect(executor, jobs, outcomes, prog, finish, None if progress else stream or sys.stderr)
    finally:
        prog.close()
        if own_cluster is not None or (scheduler is not None and client is not None):
            client.close()  # a client this call made (a caller's own client stays open)
        if own_cluster is not None:
            own_cluster.close()
        for job in jobs.values():
            getattr(job.slide, "close", lambda: None)()
    return [outcomes[p] for p in paths if p in outcomes]


def _writer(
    settings: Any, formats: Sequence[str] | None, png: bool, tile_classifier: Any
) -> tuple[Callable[..., dict[str, Path]], tuple[str, ...]]:
    """The function writing a slide's files, and the formats it writes."""
    from .export import DEFAULT_FORMATS, write_result

    if tile_classifier is not None:
        from .teach import as_batch_writer

        write_result = as_batch_writer(tile_classifier, settings.card, settings.tasks, write_result)
    fmts = tuple(formats) if formats is not None else DEFAULT_FORMATS
    if png and "png" not in fmts:
        fmts = (*fmts, "png")
    return write_result, fmts


def _plan_slides(
    paths: Sequence[str],
    out_root: Path,
    settings: Any,
    outcomes: dict[str, SlideOutcome],
    prog: _Progress,
    **plan: Any,
) -> dict[int, _SlideJob]:
    """Open and plan every slide (``plan``: :func:`_plan_slide`'s options); a slide that
    fails here gets its outcome and no job."""
    from .slide._open import slide_name

    jobs: dict[int, _SlideJob] = {}
    used: set[str] = set()
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            out_dir = _output_dir(out_root, slide_name(Path(path)), used)
            job = jobs[i] = _plan_slide(path, out_dir=out_dir, settings=settings, **plan)
            prog.log(
                f"{Path(path).name}: {len(job.tiles)} tiles, "
                f"{int(job.run_mask.sum())} with tissue, "
                f"{len(job.blocks)} work units, analysis {job.plan.analysis_mpp:.3g} um/px "
                f"(level {job.plan.level.level})"
            )
        except Exception as exc:
            outcomes[path] = SlideOutcome(
                path, None, {}, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0
            )
            prog.log(
                f"FAILED {path}: {type(exc).__name__}: {exc} (skipped; the other slides go on)"
            )
    return jobs


def _local_cluster(workers: int) -> tuple[Any, Any]:
    """A loopback ``LocalCluster`` of ``workers`` single-threaded processes and its client."""
    from distributed import Client, LocalCluster

    # Loopback only, one thread per process: torch and the GIL make threads useless
    # for this work, and no port is opened beyond this machine.
    cluster = LocalCluster(
        n_workers=int(workers), threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None,
    )  # fmt: skip
    return cluster, Client(cluster, set_as_default=False)


def _submit_all(
    jobs: dict[int, _SlideJob],
    settings: Any,
    client: Any,
    prog: _Progress,
    *,
    mpp: float | None,
    batch_size: int,
    skip_background: bool,
) -> Any:
    """Every work unit of every job, submitted here (``client`` None) or to ``client``."""
    if client is not None:
        executor: Any = _Distributed(client)
        from ._parcel import pack_model

        # One copy of the weights per worker, shipped once as plain bytes (never as a
        # torch object, see _parcel): every block sees the very same model.
        model_ref = client.scatter(pack_model(settings.model), broadcast=True)
        threads = 1
    else:
        executor, model_ref, threads = _InProcess(), settings.model, None
    prog.total = sum(int(j.run_mask.sum()) for j in jobs.values())
    if prog.bar is not None:
        prog.bar.reset(total=prog.total)
    for i, job in jobs.items():
        ref = (job.path, mpp) if client is not None else job.slide
        job.pending = len(job.blocks)
        for b, block in enumerate(job.blocks):
            executor.submit(
                (i, b), _run_block, ref, job.plan, block, model_ref, settings.tasks,
                settings.precision, batch_size, skip_background, threads,
            )  # fmt: skip
    return executor


def _collect(
    executor: Any,
    jobs: dict[int, _SlideJob],
    outcomes: dict[str, SlideOutcome],
    prog: _Progress,
    finish: Callable[[_SlideJob], None],
    traceback_to: Any,
) -> None:
    """Take work units as they finish; write each slide when its last unit is in. A failed
    unit fails its slide (its other units are cancelled) and the others go on."""
    for job in jobs.values():
        if job.pending == 0:  # nothing to run (all glass, or an empty region)
            finish(job)
    for (i, b), value, exc in executor.results():
        job = jobs[i]
        if job.error is not None:
            continue
        if exc is not None:
            executor.cancel(lambda key, i=i: key[0] == i)
            _unit_failed(job, exc, outcomes, prog, traceback_to)
            continue
        _take_unit(job, b, value, prog)
        if job.pending == 0:
            finish(job)


def _unit_failed(
    job: _SlideJob,
    exc: BaseException,
    outcomes: dict[str, SlideOutcome],
    prog: _Progress,
    traceback_to: Any,
) -> None:
    job.error = f"{type(exc).__name__}: {exc}"
    outcomes[job.path] = SlideOutcome(
        job.path, job.out_dir, {}, job.error, time.perf_counter() - job.t_start
    )
    prog.log(f"FAILED {job.path}: {job.error}")
    if traceback_to is not None:
        traceback.print_exception(exc, file=traceback_to)


def _take_unit(job: _SlideJob, unit: int, value: Any, prog: _Progress) -> None:
    """Keep a finished work unit's tile outputs and stage timings."""
    per_block, timings = value
    n_tiles = 0
    for block, outs in zip(job.blocks[unit], per_block, strict=True):
        for t, o in zip(block.tiles, outs, strict=True):
            job.outputs[(t.row, t.col)] = o
        n_tiles += len(block.tiles)
    for k, v in timings.items():
        job.timings[k] = job.timings.get(k, 0.0) + v
    job.pending -= 1
    prog.update(n_tiles, Path(job.path).name)


def _finish(job: _SlideJob, card, tasks, fmts, outcomes, prog, write_result, on_result) -> None:
    import dask

    existed = job.out_dir.exists()
    try:
        # Reads for the overview PNG stay in this process, whatever client is the default.
        with dask.config.set(scheduler="threads"):
            result = _assemble(job, card, tasks)
            files = write_result(result, job.out_dir, slide=job.slide, formats=fmts)
    except Exception as exc:
        if not existed:  # a failed slide leaves no folder behind (each file is atomic anyway)
            shutil.rmtree(job.out_dir, ignore_errors=True)
        job.error = f"{type(exc).__name__}: {exc}"
        outcomes[job.path] = SlideOutcome(
            job.path, job.out_dir, {}, job.error, time.perf_counter() - job.t_start
        )
        prog.log(f"FAILED {job.path}: {job.error}")
        return
    n = result.nuclei.count if result.nuclei is not None else 0
    outcomes[job.path] = SlideOutcome(
        job.path,
        job.out_dir,
        files,
        None,
        result.provenance.seconds,
        n,
        int(job.run_mask.sum()),
        len(job.tiles),
    )
    prog.log(
        f"done {Path(job.path).name}: {n} nuclei, "
        f"{result.provenance.seconds:.1f} s -> {job.out_dir}"
    )
    if on_result is not None:
        on_result(job.path, result)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``histolens analyze``."""
    from ._args import mpp_value, non_negative_int, positive_int

    parser.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide files (SVS, NDPI, OME-TIFF, DICOM, ...)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder; each slide writes OUT/<slide name>/"
    )
    parser.add_argument(
        "--region", default=None, help="y0,x0,y1,x1 in level-0 pixels (default: the whole slide)"
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["nuclei", "tiles"], choices=["nuclei", "tiles", "attention"],
        help="what to compute (default: nuclei tiles)",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None, help="registered model name (default: the embedded model)"
    )
    parser.add_argument(
        "--mpp",
        type=mpp_value,
        default=None,
        help="level-0 um/px, for slides that record none",
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="start a loopback dask LocalCluster of N processes",
    )
    scale.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler, e.g. tcp://host:8786",
    )
    parser.add_argument(
        "--no-tissue-mask", action="store_true", help="analyse glass too (no Otsu tissue mask)"
    )
    parser.add_argument(
        "--block-px",
        type=positive_int,
        default=DEFAULT_BLOCK_PX,
        help="work block side in analysis px",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="model inputs (blocks of tiles) per model call",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=None,
        choices=["geojson", "csv", "ome-tiff", "ome-zarr", "summary", "png"],
        help="what to write (default: geojson csv ome-tiff summary)",
    )
    parser.add_argument("--png", action="store_true", help="also render overview.png per slide")
    parser.add_argument(
        "--tile-classifier", type=Path, default=None, metavar="FILE",
        help="tile classes taught in the dock (NAME.safetensors + NAME.card.json)",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads of a local run (default: $HISTOLENS_THREADS or the physical "
        "cores); each dask worker uses one",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """``histolens analyze``: exit code 0 when every slide was written, 1 when any failed."""
    if args.workers < 0:
        print(f"--workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    try:
        region = Region.from_string(args.region) if args.region else None
    except ValueError as exc:
        print(f"histolens analyze: {exc}", file=sys.stderr)
        return 2
    if not (args.workers or args.scheduler):
        from .cpu import configure_cpu

        configure_cpu(args.threads)
    outcomes = run_batch(
        args.slides, args.out, model=args.model, tasks=args.tasks, region=region, mpp=args.mpp,
        workers=args.workers, scheduler=args.scheduler, tissue=not args.no_tissue_mask,
        block_px=args.block_px, batch_size=args.batch_size, formats=args.formats, png=args.png,
        progress=not args.quiet, tile_classifier=args.tile_classifier,
    )  # fmt: skip
    failed = [o for o in outcomes if not o.ok]
    for o in outcomes:
        status = "ok    " if o.ok else "FAILED"
        detail = (
            f"{o.nuclei} nuclei, {o.tiles_run}/{o.tiles_total} tiles -> {o.out_dir}"
            if o.ok
            else o.error
        )
        print(f"{status} {o.path}: {detail}")
    if failed:
        print(f"{len(failed)} of {len(outcomes)} slide(s) failed", file=sys.stderr)
        return 1
    return 0
