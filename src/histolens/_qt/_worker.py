"""The analysis job the dock runs in a napari thread worker.

:func:`analysis_job` is a plain generator (no Qt): it creates or reuses the model, runs
:func:`histolens.inference.analyze` and yields ``(stamp, partial RegionResult)`` so the dock
can drop yields of a request that is no longer the latest. Warnings raised while it runs
are collected and returned instead of being shown: a warning shown from a worker thread
would create a notification widget off the main thread (napari#2598, #4982).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from histolens.region import Region
from histolens.result import RegionResult

__all__ = [
    "AnalysisError",
    "AnalysisRequest",
    "JobOutcome",
    "ModelCache",
    "analysis_job",
    "export_job",
    "preload_model_stack",
    "tiles_job",
]

#: Largest view analysed interactively, in pixels at the model's mpp (about 6300 x 6300).
#: Beyond it the dock asks to zoom in, or to run ``histolens analyze`` for whole slides.
MAX_VIEW_PIXELS = 40_000_000


class AnalysisError(Exception):
    """A RuntimeError raised inside a worker, re-raised under a type the worker reports.

    superqt's ``WorkerBase.run`` treats a ``RuntimeError`` coming out of the work function as
    "the Qt object was deleted": it emits neither ``errored`` nor ``finished``, so the dock
    would stay on "Cancel" forever. torch raises RuntimeError for everyday failures (no CUDA
    driver, out of memory), so the job converts them.
    """


def preload_model_stack() -> None:
    """Import torch and timm on the calling (main) thread, once, before any worker needs them.

    Measured here (napari 0.9.2 with PyQt6 6.11 and with PyQt5 5.15, xvfb/Mesa llvmpipe, torch
    2.14, triton 3.8): once napari has a GL context, importing timm segfaults in triton's C
    extension (pulled in through torchvision -> torch._dynamo); the two LLVM copies clash.
    Triton only serves CUDA kernels, so without CUDA we mark it absent, which torch treats as
    "no triton". With CUDA the import goes ahead unchanged. Doing it on the main thread also
    keeps a multi-second C-extension import out of the worker.
    """
    if "timm" in sys.modules:
        return
    from histolens.cpu import configure_cpu

    # Threads (physical cores or $HISTOLENS_THREADS) and the allocator, before workers start.
    configure_cpu()
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]
    import timm  # noqa: F401


@dataclass(frozen=True)
class AnalysisRequest:
    """One "Analyze view" click (or live re-analysis): everything captured on the main thread.

    ``region`` is in level-0 pixels; ``device`` None means auto (CUDA, MPS, then CPU).
    """

    stamp: int
    slide: Any
    region: Region
    model_name: str | None
    device: str | None
    tasks: tuple[str, ...]
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass(frozen=True)
class JobOutcome:
    """What the worker returns: the last result (None if none arrived) and warning texts."""

    stamp: int
    result: RegionResult | None
    warnings: tuple[str, ...]


class ModelCache:
    """Models by ``(name, device)``, created on first use in the worker thread."""

    def __init__(self) -> None:
        self._models: dict[tuple[str | None, str | None], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None, device: str | None) -> Any:
        # Held while creating, so two live requests never build the same model twice.
        with self._lock:
            key = (name, device)
            if key not in self._models:
                from histolens.models import create_model

                self._models[key] = create_model(name, device=device)
            return self._models[key]


def _check_size(request: AnalysisRequest, model: Any) -> None:
    slide_mpp = float(request.slide.mpp)
    model_mpp = float(model.card.mpp)
    pixels = request.region.area * (slide_mpp / model_mpp) ** 2
    if pixels > MAX_VIEW_PIXELS:
        msg = (
            f"the view is {request.region.width} x {request.region.height} level-0 px, "
            f"{pixels / 1e6:.0f} Mpx at the model's {model_mpp:g} um/px (limit "
            f"{MAX_VIEW_PIXELS / 1e6:.0f} Mpx): zoom in, or run `histolens analyze` "
            "for whole slides"
        )
        raise ValueError(msg)


def analysis_job(
    request: AnalysisRequest, models: ModelCache
) -> Generator[tuple[int, RegionResult], None, JobOutcome]:
    """Analyse ``request.region``; yield ``(stamp, partial result)`` as tiles finish."""
    from histolens.inference import analyze

    last: RegionResult | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = models.get(request.model_name, request.device)
            _check_size(request, model)
            for partial in analyze(
                request.slide,
                request.region,
                model=model,
                tasks=request.tasks,
                cancel=request.cancel,
            ):
                last = partial
                yield request.stamp, partial
        except RuntimeError as exc:
            raise AnalysisError(f"{type(exc).__name__}: {exc}") from exc
    texts = tuple(dict.fromkeys(str(w.message) for w in caught))  # unique, in order
    return JobOutcome(stamp=request.stamp, result=last, warnings=texts)


def tiles_job(request: AnalysisRequest, region: Region, models: ModelCache) -> RegionResult:
    """Tile classes and embeddings of ``region`` (level-0 px) with ``request``'s slide and model."""
    from histolens.inference import analyze_region

    try:
        model = models.get(request.model_name, request.device)
        return analyze_region(request.slide, region, model=model, tasks=("tiles",))
    except RuntimeError as exc:
        raise AnalysisError(f"{type(exc).__name__}: {exc}") from exc


def export_job(result: RegionResult, folder: str, slide: Any = None) -> dict[str, Any]:
    """:func:`histolens.export.write_result` for a worker (RuntimeError converted, see above)."""
    from histolens.export import write_result

    try:
        return dict(write_result(result, folder, slide=slide))
    except RuntimeError as exc:
        raise AnalysisError(f"{type(exc).__name__}: {exc}") from exc
