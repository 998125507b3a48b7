"""napari reader contribution: whole-slide images as one multiscale RGB layer in micrometres,
and GeoJSON files as shapes.

Thin by design: :func:`histolens.slide.open_slide` opens the slide and :mod:`histolens.layers`
builds the layer tuples (shared with the sample data and the GUI). No napari import here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .layers import LayerData, geojson_to_layer_data, slide_to_layer_data
from .slide import SLIDE_SUFFIXES, open_slide

__all__ = ["napari_get_reader", "read_slides"]

PathLike = str | os.PathLike[str]


def read_slides(paths: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Open each path (slide or ``.geojson``) and return napari LayerDataTuples."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    layers: list[LayerData] = []
    for p in items:
        if str(p).lower().endswith(".geojson"):
            layers.extend(geojson_to_layer_data(p))
        else:
            layers.append(slide_to_layer_data(open_slide(p)))
    return layers


def _handles(path: PathLike) -> bool:
    """Cheap check (suffix, first bytes) that ``path`` is ours; never raises."""
    p = Path(os.fspath(path))
    lower = p.name.lower()
    if lower.endswith(".geojson"):
        return p.is_file()
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
