"""The batch run: plan every slide, run its shards, paste and write each slide as it completes."""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from histolens.progress import ProgressPrinter

from ._options import BatchOptions
from ._plan import SlideJob, SlideOutcome, plan_slides
from ._shard import shard_executor

__all__ = ["run_batch"]


def run_batch(
    slides: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    options: BatchOptions | None = None,
    *,
    client: Any = None,
    on_result: Callable[[str, Any], None] | None = None,
    stream: Any = None,
) -> list[SlideOutcome]:
    """Analyse every slide (whole, or ``options.region``) and write ``out/<name>/`` files.

    ``options`` (default ``BatchOptions()``: the embedded model, nuclei and tiles, tissue
    only, in this process) says what to compute and where: in this process
    (``workers=0``), on a new loopback ``LocalCluster`` of ``workers`` single-threaded
    processes, or on the cluster at ``scheduler``; an existing dask ``client`` overrides both
    (and stays open). A slide that fails (unreadable file, missing mpp, a worker error) is
    reported in its :class:`SlideOutcome` and skipped; the others finish.
    ``on_result(path, RegionResult)`` is called for each finished slide (tests, notebooks);
    progress goes to ``stream`` (default stderr). Returns one outcome per slide, in order.
    """
    from histolens._engine import resolve_settings

    if options is None:
        options = BatchOptions()
    if not isinstance(options, BatchOptions):
        msg = f"options must be a histolens.batch.BatchOptions, got {type(options).__name__}"
        raise TypeError(msg)
    out_root = Path(out)
    out_root.mkdir(parents=True, exist_ok=True)
    paths = [os.fspath(p) for p in slides]
    if options.scheduler is not None and client is None:
        from histolens._cluster import check_scheduler

        check_scheduler(options.scheduler)  # before the model loads or any slide opens
    on_cluster = options.distributed or client is not None
    settings = resolve_settings(
        options.model, options.tasks, device="cpu" if on_cluster else None,
        precision=options.precision,
    )  # fmt: skip
    progress = ProgressPrinter(stream=stream, enabled=options.progress)
    run = _Run(settings, options, progress, on_result, stream)
    jobs: dict[int, SlideJob] = {}
    try:
        jobs = plan_slides(paths, out_root, options, settings, run.outcomes, progress)
        with shard_executor(options, settings, client) as executor:
            run.submit_and_collect(executor, jobs)
    finally:
        progress.close()
        for job in jobs.values():
            getattr(job.slide, "close", lambda: None)()
    return [run.outcomes[p] for p in paths if p in run.outcomes]


class _Run:
    """One run's state: shards in, slides pasted and written as their last shard arrives."""

    def __init__(
        self, settings: Any, options: BatchOptions, progress: ProgressPrinter,
        on_result: Callable[[str, Any], None] | None, stream: Any,
    ) -> None:  # fmt: skip
        self.settings, self.progress, self.on_result = settings, progress, on_result
        self.write_result, self.formats = _writer(settings, options)
        self.outcomes: dict[str, SlideOutcome] = {}
        # Quiet runs print no FAILED line, so a failed shard leaves its traceback on the stream.
        self.traceback_to = None if options.progress else stream or sys.stderr

    def submit_and_collect(self, executor: Any, jobs: dict[int, SlideJob]) -> None:
        """Submit every shard of every job, then take shards as they finish. A failed shard
        fails its slide (its other shards are cancelled) and the other slides go on."""
        self.progress.set_total(sum(int(j.run_mask.sum()) for j in jobs.values()))
        for i, job in jobs.items():
            job.pending = len(job.shards)
            for s, blocks in enumerate(job.shards):
                executor.submit((i, s), job, blocks)
        for job in jobs.values():
            if job.pending == 0:  # nothing to run (all glass, or an empty region)
                self._finish(job)
        for (i, s), value, exc in executor.results():
            job = jobs[i]
            if job.error is not None:
                continue
            if exc is not None:
                executor.cancel(lambda key, i=i: key[0] == i)
                self._shard_failed(job, exc)
                continue
            self._take_shard(job, s, value)
            if job.pending == 0:
                self._finish(job)

    def _shard_failed(self, job: SlideJob, exc: BaseException) -> None:
        self._fail(job, f"{type(exc).__name__}: {exc}")
        if self.traceback_to is not None:
            traceback.print_exception(exc, file=self.traceback_to)

    def _fail(self, job: SlideJob, error: str) -> None:
        job.error = error
        self.outcomes[job.path] = SlideOutcome.failed(job.path, job.out_dir, error, job.t_start)
        self.progress.log(f"FAILED {job.path}: {error}")

    def _take_shard(self, job: SlideJob, shard: int, value: Any) -> None:
        """Keep a finished shard's tile outputs and stage timings."""
        per_block, timings = value
        n_tiles = 0
        for block, outs in zip(job.shards[shard], per_block, strict=True):
            for t, o in zip(block.tiles, outs, strict=True):
                job.outputs[(t.row, t.col)] = o
            n_tiles += len(block.tiles)
        for k, v in timings.items():
            job.timings[k] = job.timings.get(k, 0.0) + v
        job.pending -= 1
        self.progress.update(n_tiles, Path(job.path).name)

    def _finish(self, job: SlideJob) -> None:
        """Paste and write a slide whose shards are all in; a failure leaves no folder."""
        import dask

        existed = job.out_dir.exists()
        try:
            # Reads for the overview PNG stay in this process, whatever client is the default.
            with dask.config.set(scheduler="threads"):
                result = _assemble(job, self.settings.card, self.settings.tasks)
                files = self.write_result(
                    result, job.out_dir, slide=job.slide, formats=self.formats
                )
        except Exception as exc:
            if not existed:  # each file is atomic; a failed slide also leaves no folder
                shutil.rmtree(job.out_dir, ignore_errors=True)
            self._fail(job, f"{type(exc).__name__}: {exc}")
            return
        n = result.nuclei.count if result.nuclei is not None else 0
        seconds = result.provenance.seconds
        self.outcomes[job.path] = SlideOutcome(
            job.path, job.out_dir, files, None, seconds, n, int(job.run_mask.sum()), len(job.tiles)
        )
        self.progress.log(
            f"done {Path(job.path).name}: {n} nuclei, {seconds:.1f} s -> {job.out_dir}"
        )
        if self.on_result is not None:
            self.on_result(job.path, result)


def _writer(
    settings: Any, options: BatchOptions
) -> tuple[Callable[..., dict[str, Path]], tuple[str, ...]]:
    """The function writing a slide's files, and the formats it writes."""
    from histolens.export import DEFAULT_FORMATS, write_result

    if options.tile_classifier is not None:
        from histolens.teach import as_batch_writer

        write_result = as_batch_writer(
            options.tile_classifier, settings.card, settings.tasks, write_result
        )
    formats = options.formats if options.formats is not None else tuple(DEFAULT_FORMATS)
    if options.png and "png" not in formats:
        formats = (*formats, "png")
    return write_result, formats


def _assemble(job: SlideJob, card: Any, tasks: tuple[str, ...]) -> Any:
    """Paste every tile's output in the engine's order (block by block); build the result."""
    from histolens._engine import ResultAssembly, TileOutput

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
    job.timings["shards"] = float(len(job.shards))
    job.timings["tiles_masked_out"] = float(np.count_nonzero(~job.run_mask))
    prov.timings = dict(job.timings)
    prov.seconds = time.perf_counter() - job.t_start
    return asm.build(prov, complete=True, copy=False)
