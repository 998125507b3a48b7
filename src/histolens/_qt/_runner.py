"""The dock's analysis runner: one analysis at a time in a napari thread worker, latest wins.

Each :meth:`AnalysisRunner.start` stamps a new :class:`._worker.AnalysisRequest` from a frozen
:class:`._controls.DockSettings` and cancels the request before it. The old worker finishes in
the background; its signals carry an old stamp and are dropped here, so only the latest request
ever reaches the dock. Partial results arrive as tiles finish, several per frame on a fast
model; the runner paints the newest at most every :data:`PARTIAL_REFRESH_MS` and keeps the
:class:`RunProgress` bar in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QProgressBar

from histolens.progress import progress_text
from histolens.region import Region
from histolens.result import RegionResult

from ._controls import DockSettings
from ._worker import AnalysisRequest, JobOutcome, ModelCache, analysis_job

__all__ = ["PARTIAL_REFRESH_MS", "AnalysisRunner", "RunProgress"]

PARTIAL_REFRESH_MS = 150


class RunProgress(QProgressBar):
    """Tiles done out of tiles planned, with the time left once the engine can estimate it."""

    IDLE_FORMAT = "%v / %m tiles"

    def __init__(self) -> None:
        super().__init__()
        self.setFormat(self.IDLE_FORMAT)
        self.setValue(0)

    def busy(self) -> None:
        """An analysis started: busy until the first tile reports the total."""
        self.setRange(0, 0)

    def advance(self, partial: RegionResult) -> None:
        total, done = max(partial.tiles_total, 1), partial.tiles_done
        self.setRange(0, total)
        self.setValue(min(done, total))
        self.setFormat(progress_text(partial.provenance))

    def idle(self) -> None:
        """The analysis ended: keep the count, drop the estimate (and the busy bar)."""
        self.setFormat(self.IDLE_FORMAT)
        if self.maximum() == 0:
            self.setRange(0, 1)


class AnalysisRunner(QObject):
    """Runs ``job(request, models)`` (:func:`._worker.analysis_job`) for the latest request only.

    Signals, all on the main thread and only for the latest request:
    ``result_ready(result, final)``: a result to show (partials throttled, then the final);
    ``warned(texts)``: warning texts the job collected; ``failed(exc)``: the job raised;
    ``finished(held_back)``: the job ended; ``held_back`` is the newest partial not painted yet
    when the job ended without a final result (it raised), else None.
    """

    result_ready = Signal(object, bool)
    warned = Signal(object)
    failed = Signal(object)
    finished = Signal(object)

    def __init__(
        self,
        models: ModelCache,
        progress: RunProgress,
        job: Callable[..., Any] = analysis_job,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.models = models
        self.progress = progress
        self._job = job
        self._stamp = 0
        self._request: AnalysisRequest | None = None
        self._worker: Any = None
        self._pending: RegionResult | None = None
        self._side_workers: set[Any] = set()

    @property
    def stamp(self) -> int:
        """Stamp of the latest request (0 before the first); each start adds one."""
        return self._stamp

    @property
    def request(self) -> AnalysisRequest | None:
        """The latest request, running or done (None before the first)."""
        return self._request

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, settings: DockSettings, slide: Any, region: Region) -> AnalysisRequest:
        """Analyse ``region`` (level-0 px) of ``slide`` as ``settings`` say; the request before
        is cancelled (latest wins). Returns the new request."""
        self.stop()
        self._stamp += 1
        request = AnalysisRequest(
            stamp=self._stamp,
            slide=slide,
            region=region,
            model_name=settings.model_name,
            device=settings.device,
            tasks=settings.tasks,
        )
        self._request = request
        worker = create_worker(self._job, request, self.models, _ignore_errors=True)
        stamp = request.stamp
        worker.yielded.connect(lambda item: self._on_yielded(stamp, item))
        worker.returned.connect(lambda outcome: self._on_returned(stamp, outcome))
        worker.errored.connect(lambda exc: self._on_errored(stamp, exc))
        worker.finished.connect(lambda: self._on_finished(stamp))
        self._worker = worker
        self.progress.busy()
        worker.start()
        return request

    def cancel(self) -> bool:
        """Stop the latest analysis after the current tile batch; False if there is none.

        Only the engine's cancel event is set (no ``worker.quit()``): the engine then ends
        with one last result holding every finished tile, so layers and review agree.
        """
        if self._request is None:
            return False
        self._request.cancel.set()
        return True

    def stop(self) -> None:
        """Cancel the latest analysis and drop everything it still sends."""
        if self._request is not None:
            self._request.cancel.set()
        if self._worker is not None:
            self._worker.quit()
        self._worker = None
        self._pending = None

    def side_job(self, func: Callable[..., Any], *args: Any) -> Any:
        """Start ``func(*args)`` in a worker beside the analysis and return the worker.

        Kept referenced until it finishes: an unreferenced worker may lose its signals.
        """
        worker = create_worker(func, *args, _ignore_errors=True)
        self._side_workers.add(worker)
        worker.finished.connect(lambda: self._side_workers.discard(worker))
        return worker

    # --- worker signals (main thread) --------------------------------------------------------
    def _on_yielded(self, stamp: int, item: tuple[int, RegionResult]) -> None:
        if stamp != self._stamp:
            return
        _stamp, partial = item
        self.progress.advance(partial)
        # Several tiles may land per frame; paint the newest at most every PARTIAL_REFRESH_MS.
        scheduled = self._pending is not None
        self._pending = partial
        if not scheduled:
            QTimer.singleShot(PARTIAL_REFRESH_MS, lambda: self._flush(stamp))

    def _flush(self, stamp: int) -> None:
        if stamp != self._stamp or self._pending is None:
            return
        partial, self._pending = self._pending, None
        self.result_ready.emit(partial, False)

    def _on_returned(self, stamp: int, outcome: JobOutcome) -> None:
        if stamp != self._stamp:
            return
        self._pending = None
        if outcome.result is not None:
            self.result_ready.emit(outcome.result, True)
        if outcome.warnings:
            self.warned.emit(outcome.warnings)

    def _on_errored(self, stamp: int, exc: BaseException) -> None:
        if stamp == self._stamp:
            self.failed.emit(exc)

    def _on_finished(self, stamp: int) -> None:
        if stamp != self._stamp:
            return
        held_back, self._pending = self._pending, None
        self._worker = None
        self.progress.idle()
        self.finished.emit(held_back)
