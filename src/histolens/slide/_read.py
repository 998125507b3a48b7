"""Pixels out of one pyramid level: a level-pixel box, or a box of analysis pixels resampled.

Frames (see :mod:`histolens.tiles` for the analysis grid):

- **level pixels**: the pixels of one pyramid level as stored (level 0 or a coarser level);
- **analysis pixels**: the grid the model runs on; ``step`` level pixels per analysis pixel,
  anchored at level pixel (0, 0), so a pixel's value depends only on its global position.

Boxes are half-open ``(y, x)``. Pixels outside the level are ``fill`` (white glass).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from histolens.region import Region

__all__ = ["DIRECT_READ_ATTR", "read_analysis_box", "read_level_box"]

#: Attribute a slide backend may set on a lazy level: an array-like (a zarr array) that gives
#: the same pixels as the level when sliced, without building a dask graph per read.
DIRECT_READ_ATTR = "_histolens_direct"


def read_level_box(level: Any, y0: int, x0: int, y1: int, x1: int, fill: int = 255) -> np.ndarray:
    """``level[y0:y1, x0:x1]`` as ``(h, w, 3) uint8``, ``fill`` where the box leaves the level.

    ``level`` is one pyramid level (dask, zarr or numpy), in its own pixels. Slicing goes
    straight to the level's zarr store when the backend exposes one (:data:`DIRECT_READ_ATTR`):
    about 3x faster than a dask compute for a 1024 px box of small JPEG tiles.
    """
    h_l, w_l = int(level.shape[0]), int(level.shape[1])
    out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=np.uint8)
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, h_l), min(x1, w_l)
    if cy1 > cy0 and cx1 > cx0:
        source = getattr(level, DIRECT_READ_ATTR, None)
        block = np.asarray((level if source is None else source)[cy0:cy1, cx0:cx1])
        if block.ndim == 2:  # greyscale slides: replicate to RGB
            block = np.repeat(block[..., None], 3, axis=2)
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = block[..., :3]
    return out


def _axis_samples(n: int, start: int, step: float) -> np.ndarray:
    """Continuous source coordinates (source pixel-index frame) of ``n`` output pixel centres.

    Output pixel ``start + i`` covers source pixels ``[(start + i) * step, ...)`` (edges), so its
    centre sits at ``(start + i + 0.5) * step - 0.5`` in index coordinates.
    """
    return (np.arange(start, start + n, dtype=np.float64) + 0.5) * step - 0.5


def _interp_axis(img: np.ndarray, coords: np.ndarray, axis: int, origin: int) -> np.ndarray:
    """Linear interpolation of ``img`` along ``axis`` at ``coords`` (relative to ``origin``)."""
    c = coords - origin
    i0 = np.floor(c).astype(np.int64)
    w = (c - i0).astype(np.float32)
    n = img.shape[axis]
    i0c = np.clip(i0, 0, n - 1)
    i1c = np.clip(i0 + 1, 0, n - 1)
    a = np.take(img, i0c, axis=axis)
    b = np.take(img, i1c, axis=axis)
    shape = [1] * img.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    return a * (1.0 - w) + b * w


def read_analysis_box(level: Any, box: Region, step: float, *, fill: int = 255) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` for ``box`` (analysis pixels) read from one pyramid level.

    ``level`` is an array-like ``(Y, X, 3)`` (numpy or lazy dask), ``step`` is level pixels per
    analysis pixel. ``step == 1`` slices the level as is; otherwise each output pixel is the
    level sampled at its centre, after a Gaussian anti-alias blur when downsampling
    (``step > 1``). Pixels outside the level are ``fill`` (white glass), so the result for a
    pixel depends only on its global position, never on how the region was tiled.
    """
    h, w = box.height, box.width
    if h == 0 or w == 0:
        return np.zeros((h, w, 3), np.uint8)
    if abs(step - 1.0) < 1e-9:
        return read_level_box(level, box.y0, box.x0, box.y1, box.x1, fill)
    from scipy import ndimage

    ys = _axis_samples(h, box.y0, step)
    xs = _axis_samples(w, box.x0, step)
    sigma = max(0.0, (step - 1.0) / 2.0)  # skimage's anti-aliasing choice for a zoom of 1/step
    # Read enough margin that the blur and the interpolation never see the window edge:
    # then a pixel's value is the same whichever window it was read in.
    margin = int(math.ceil(4.0 * sigma)) + 2
    ry0, rx0 = int(math.floor(ys[0])) - margin, int(math.floor(xs[0])) - margin
    ry1, rx1 = int(math.ceil(ys[-1])) + margin + 1, int(math.ceil(xs[-1])) + margin + 1
    src = read_level_box(level, ry0, rx0, ry1, rx1, fill).astype(np.float32)
    if sigma > 0:
        src = ndimage.gaussian_filter(src, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)
    out = _interp_axis(src, ys, axis=0, origin=ry0)
    out = _interp_axis(out, xs, axis=1, origin=rx0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
