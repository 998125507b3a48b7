"""The HistoLens napari dock: the only Qt code of the package.

``HistoLensWidget`` is imported lazily so that the Qt-free helpers in
:mod:`histolens._qt._viewport` can be used (and tested) without importing Qt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._widget import HistoLensWidget

__all__ = ["HistoLensWidget"]


def __getattr__(name: str) -> Any:
    # napari resolves the manifest's `histolens._qt:HistoLensWidget` with getattr, which
    # lands here, so the dock is importable by name but Qt loads only when it is asked for.
    if name == "HistoLensWidget":
        from ._widget import HistoLensWidget

        return HistoLensWidget
    msg = f"module 'histolens._qt' has no attribute {name!r}"
    raise AttributeError(msg)
