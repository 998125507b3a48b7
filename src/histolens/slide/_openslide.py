"""Optional OpenSlide backend for formats tifffile cannot read (MRXS, VMS/VMU, VSI tiles, ...).

Needs the ``openslide`` extra (``pip install napari-histolens[openslide]``: openslide-python
plus the openslide-bin library). Imported only when a slide needs it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ._guard import check_level_size
from ._slide import FILL_VALUE, LazyImages
from ._tilesource import tiled_dask_array

__all__ = ["import_openslide", "open_openslide"]

INSTALL_HINT = "pip install napari-histolens[openslide]"


def import_openslide() -> Any:
    """The ``openslide`` module, or an ImportError naming the extra to install."""
    try:
        import openslide
    except ImportError as exc:  # also raised when the C library is missing
        msg = (
            f"reading this slide format needs OpenSlide, which is not available ({exc}); "
            f"install it with `{INSTALL_HINT}`"
        )
        raise ImportError(msg) from exc
    return openslide


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    # OpenSlide returns premultiplied RGBA with alpha 0 outside scanned areas: put glass behind.
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return (rgb + (FILL_VALUE * (255 - alpha) + 127) // 255).clip(0, 255).astype(np.uint8)


def open_openslide(path: Path) -> dict[str, Any]:
    """Open ``path`` with OpenSlide; return the keyword arguments of :class:`Slide`."""
    openslide = import_openslide()
    osr = openslide.OpenSlide(str(path))
    props = dict(osr.properties)
    lock = threading.Lock()
    levels = []
    for i, (width, height) in enumerate(osr.level_dimensions):
        f = float(osr.level_downsamples[i])
        tw = int(props.get(f"openslide.level[{i}].tile-width", 0)) or 512
        th = int(props.get(f"openslide.level[{i}].tile-height", 0)) or 512
        check_level_size(path, f"its level {i}", int(height), int(width), (th, tw))

        def read(y0: int, x0: int, y1: int, x1: int, _i: int = i, _f: float = f) -> np.ndarray:
            # read_region takes the top-left corner in level-0 pixels.
            location = (round(x0 * _f), round(y0 * _f))
            with lock:
                img = osr.read_region(location, _i, (x1 - x0, y1 - y0))
            return _rgba_to_rgb(np.asarray(img))

        levels.append(
            tiled_dask_array(
                read, int(height), int(width), (th, tw), name="openslide", path=path, level=i
            )
        )
    mpp = None
    try:
        mpp = float(props[openslide.PROPERTY_NAME_MPP_X])
    except (KeyError, ValueError):
        pass
    assoc = {
        name: (lambda n=name: np.asarray(osr.associated_images[n].convert("RGB")))
        for name in osr.associated_images
    }
    vendor = str(props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"))
    return {
        "levels": tuple(levels),
        "downsamples": tuple(float(f) for f in osr.level_downsamples),
        "mpp": mpp if mpp and mpp > 0 else None,
        "mpp_source": "openslide" if mpp and mpp > 0 else "none",
        "vendor": f"openslide:{vendor}",
        "metadata": {"format": vendor, **{k: v for k, v in props.items() if len(v) < 4096}},
        "associated": LazyImages(assoc, path),
        "closers": (osr.close,),
    }
