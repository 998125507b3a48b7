"""A shard run where the work runs (:func:`run_shard`), and the executors that run shards:
in this process, or as tasks on a dask cluster (:func:`shard_executor`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._options import BatchOptions

__all__ = ["run_shard", "shard_executor"]

#: Slides kept open per worker process.
_KEEP_SLIDES = 8
_SLIDES: dict[tuple[str, float | None], Any] = {}


def run_shard(
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
    """Read, predict and post-process the model ``blocks`` of one shard, as the engine does.

    ``slide_ref`` is a Slide (in this process) or ``(path, mpp)`` (a dask worker reopens the
    slide from its path); ``model`` a model or a :class:`histolens._parcel.ModelParcel`.
    Returns, per block, its tiles' outputs (owned instances, class cells, attention) in the
    block's tile order, and the seconds spent per stage.
    """
    import dask

    from histolens._engine import BlockRunner, batch_blocks
    from histolens._parcel import unpack_model

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    slide = _cached_slide(*slide_ref) if isinstance(slide_ref, tuple) else slide_ref
    # Pixels are read inside this task: on a dask worker, a nested compute() would otherwise
    # go back to the distributed scheduler (and try to ship open file handles there).
    with dask.config.set(scheduler="synchronous"):
        runner = BlockRunner(
            slide, plan, unpack_model(model), tasks, precision=precision,
            batch_size=batch_size, skip_background=skip_background,
        )  # fmt: skip
        # Grouped into model calls exactly as analyze() groups a fresh region's blocks.
        done = [outs for batch in runner.run(batch_blocks(blocks, batch_size)) for _, outs in batch]
    stages = ("read", "preprocess", "model", "postprocess")
    return done, {
        **{k: runner.timings[k] for k in stages},
        "oom_retries": float(runner.oom_retries),
    }


def _cached_slide(path: str, mpp: float | None) -> Any:
    # One open file per worker process and slide: the shards of a slide reuse its handles.
    key = (path, mpp)
    if key not in _SLIDES:
        from histolens.slide import open_slide

        if len(_SLIDES) >= _KEEP_SLIDES:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        _SLIDES[key] = open_slide(path, mpp=mpp)
    return _SLIDES[key]


@contextmanager
def shard_executor(options: BatchOptions, settings: Any, client: Any = None) -> Iterator[Any]:
    """Where the shards run: this process, or the dask cluster of ``options`` (or ``client``).

    ``settings`` is the run's :class:`histolens._engine.RunSettings` (model, tasks, precision).
    Yields an executor with ``submit(key, job, blocks)`` (one shard of a
    :class:`~histolens.batch._plan.SlideJob`), ``results()`` (``(key, value, exception)`` as
    shards finish) and ``cancel(predicate)`` (of keys). A cluster or client opened here is
    closed on the way out, also on an error or Ctrl-C (:func:`histolens._cluster.dask_client`).
    """
    from histolens._cluster import dask_client

    call = _ShardCall(settings.model, settings.tasks, settings.precision, options)
    if client is None and not options.distributed:
        yield _InProcess(call)
        return
    with dask_client(workers=options.workers, scheduler=options.scheduler, client=client) as c:
        yield _Distributed(c, call.for_workers(c))


class _ShardCall:
    """The arguments of :func:`run_shard` for one shard: the run's fixed ones and the slide as
    a task gets it (the open Slide in this process, ``(path, mpp)`` on a worker)."""

    def __init__(
        self, model: Any, tasks: tuple[str, ...], precision: str, options: BatchOptions,
        *, remote: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.tasks, self.precision = model, tasks, precision
        self.options, self.remote = options, remote

    def for_workers(self, client: Any) -> _ShardCall:
        from histolens._parcel import pack_model

        # One copy of the weights per worker, shipped once as plain bytes (never as a
        # torch object, see _parcel): every block sees the very same model.
        parcel = client.scatter(pack_model(self.model), broadcast=True)
        return _ShardCall(parcel, self.tasks, self.precision, self.options, remote=True)

    def args(self, job: Any, blocks: Sequence[Any]) -> tuple:
        o = self.options
        ref = (job.path, o.mpp) if self.remote else job.slide
        threads = 1 if self.remote else None  # a worker process owns one core
        return (ref, job.plan, blocks, self.model, self.tasks, self.precision, o.batch_size,
                o.skip_background, threads)  # fmt: skip


class _InProcess:
    """Runs each shard when asked for its result, in submission order (no dask needed)."""

    def __init__(self, call: _ShardCall) -> None:
        self.call = call
        self._tasks: list[tuple[Any, tuple]] = []

    def submit(self, key: Any, job: Any, blocks: Sequence[Any]) -> None:
        self._tasks.append((key, self.call.args(job, blocks)))

    def results(self) -> Iterator[tuple[Any, Any, BaseException | None]]:
        while self._tasks:
            key, args = self._tasks.pop(0)
            try:
                yield key, run_shard(*args), None
            except Exception as exc:  # reported per slide; the batch goes on
                yield key, None, exc

    def cancel(self, predicate: Callable[[Any], bool]) -> None:
        self._tasks = [t for t in self._tasks if not predicate(t[0])]


class _Distributed:
    """Shards as tasks on a dask.distributed cluster; results as they complete."""

    def __init__(self, client: Any, call: _ShardCall) -> None:
        self.client, self.call = client, call
        self._futures: dict[Any, Any] = {}
        self._keys: dict[str, Any] = {}

    def submit(self, key: Any, job: Any, blocks: Sequence[Any]) -> None:
        fut = self.client.submit(run_shard, *self.call.args(job, blocks), pure=False)
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
