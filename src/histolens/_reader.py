"""napari reader contribution: whole-slide images as one multiscale RGB layer in micrometres.

Thin by design: :func:`histolens.slide.open_slide` does the work, :func:`slide_to_layer_data`
builds the layer tuple (reused by the sample data and the GUI). No napari import here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .slide import SLIDE_SUFFIXES, Slide, open_slide

__all__ = ["napari_get_reader", "read_slides", "slide_to_layer_data"]

LayerData = tuple[Any, dict[str, Any], str]
PathLike = str | os.PathLike[str]


def slide_to_layer_data(slide: Slide) -> LayerData:
    """``(levels, kwargs, "image")`` for ``viewer.add_image(levels, **kwargs)``.

    The layer is in micrometres (``scale=(mpp, mpp)``, ``units="um"``, no translate) so overlays
    placed with :func:`histolens.region.layer_transform` line up. Without an mpp the scale is 1
    (level-0 pixels) and a warning says how to set it. ``metadata`` holds the slide facts
    (path, vendor, mpp, shapes) and the :class:`Slide` itself under ``"slide"``.
    """
    if slide.mpp is None:
        warnings.warn(
            f"{slide.name}: no pixel size (mpp) known, the layer is shown in pixels (scale 1); "
            "set it with open_slide(path, mpp=...) or the HistoLens dock's mpp field",
            UserWarning,
            stacklevel=2,
        )
        scale, units = (1.0, 1.0), "pixel"
    else:
        scale, units = (slide.mpp, slide.mpp), "um"
    meta = {
        "name": slide.name,
        "multiscale": True,
        "rgb": True,
        "scale": scale,
        "units": units,
        "metadata": {**slide.facts(), "slide": slide},
    }
    return (list(slide.levels), meta, "image")


def read_slides(paths: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Open each path (slide or ``.geojson``) and return napari LayerDataTuples."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    layers: list[LayerData] = []
    for p in items:
        if str(p).lower().endswith(".geojson"):
            layers.extend(_read_geojson(p))
        else:
            layers.append(slide_to_layer_data(open_slide(p)))
    return layers


def _read_geojson(path: PathLike) -> list[LayerData]:
    from .export import geojson_to_layer_data

    result = geojson_to_layer_data(path)
    # Accept a single tuple as well as a list of them.
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[1], dict):
        return [result]
    return list(result)


def _geojson_supported() -> bool:
    try:
        from .export import geojson_to_layer_data  # noqa: F401
    except ImportError:
        return False
    return True


def _handles(path: PathLike) -> bool:
    """Cheap check (suffix, first bytes) that ``path`` is ours; never raises."""
    p = Path(os.fspath(path))
    lower = p.name.lower()
    if lower.endswith(".geojson"):
        return p.is_file() and _geojson_supported()
    if p.is_dir():
        # A folder of DICOM instances (one slide); plain folders belong to other readers.
        try:
            return any(c.suffix.lower() == ".dcm" for c in p.iterdir())
        except OSError:
            return False
    if not lower.endswith(SLIDE_SUFFIXES):
        return False
    if lower.endswith((".tif", ".tiff")):
        return _is_slide_tiff(p)
    return True


def _is_slide_tiff(path: Path) -> bool:
    """Plain ``.tif`` stacks and fluorescence images are left to napari's default reader."""
    try:
        import tifffile

        from .slide._tiff import tiff_plane_axes

        with tifffile.TiffFile(path) as tif:
            return tiff_plane_axes(tif.series[0]) is not None
    except Exception:  # anything unreadable is not ours to claim
        return False


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """napari hook: a reader function when every path is a slide (or GeoJSON), else ``None``.

    The returned function raises :class:`histolens.slide.SlideError` (naming the file and the
    fix) when a claimed file turns out to be damaged; napari shows that message.
    """
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items or not all(_handles(p) for p in items):
        return None
    return read_slides
