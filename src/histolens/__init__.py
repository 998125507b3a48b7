"""napari-histolens: interactive pathology analysis (nuclei, tile classes, cross-scale attention).

The public API is small and imports neither torch nor Qt; models load on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .region import Region

try:
    __version__ = version("napari-histolens")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "PointExplanation",
    "Region",
    "RegionResult",
    "Slide",
    "SlideError",
    "analyze",
    "analyze_region",
    "create_model",
    "explain_point",
    "list_models",
    "open_slide",
]

_LAZY = {
    "Slide": ("histolens.slide", "Slide"),
    "SlideError": ("histolens.slide", "SlideError"),
    "open_slide": ("histolens.slide", "open_slide"),
    "create_model": ("histolens.models", "create_model"),
    "list_models": ("histolens.models", "list_models"),
    "analyze": ("histolens.inference", "analyze"),
    "analyze_region": ("histolens.inference", "analyze_region"),
    "RegionResult": ("histolens.result", "RegionResult"),
    "explain_point": ("histolens.explain", "explain_point"),
    "PointExplanation": ("histolens.explain", "PointExplanation"),
}


def __getattr__(name: str):
    # Lazy so that `import histolens` (and the napari manifest scan) stays light.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    msg = f"module 'histolens' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
