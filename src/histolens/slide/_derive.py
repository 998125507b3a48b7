"""Derived (computed) coarser levels for slides that store only level 0.

Each derived level is a view that halves the level below it when sliced: building one costs
nothing at open time, whatever the slide size (a rechunk graph over every chunk of a
100k x 200k px level took 14 s), and a read decodes only the level-0 tiles under it.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from ._read import DIRECT_READ_ATTR
from ._tilesource import lazy_level

__all__ = ["derive_levels"]

#: Derived levels stop once the longest side is below this many pixels, so napari always
#: has a coarse level to show the whole slide quickly.
MIN_LEVEL_SIDE = 512
#: Output pixels per side of one piece of a derived read: each piece reads a box of at most
#: (2 * _PIECE)^2 pixels of the level below, which bounds the memory of any read.
_PIECE = 1024


class _HalvedLevel:
    """``(Y, X, 3) uint8`` array-like: pixel ``(i, j)`` is the rounded mean of the 2 x 2
    pixels ``[2i, 2i+2) x [2j, 2j+2)`` of ``source`` (an odd last row/column is dropped)."""

    def __init__(self, source: Any) -> None:
        # Slice the backend's own array when it has one: no dask graph per read.
        self._source = getattr(source, DIRECT_READ_ATTR, None)
        if self._source is None:
            self._source = source
        self.shape = (int(source.shape[0]) // 2, int(source.shape[1]) // 2, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        y0, y1, _ = key[0].indices(self.shape[0])
        x0, x1, _ = key[1].indices(self.shape[1])
        out = np.empty((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        for py in range(y0, y1, _PIECE):
            for px in range(x0, x1, _PIECE):
                qy, qx = min(py + _PIECE, y1), min(px + _PIECE, x1)
                out[py - y0 : qy - y0, px - x0 : qx - x0] = self._halve(py, px, qy, qx)
        return out[(slice(None), slice(None)) + tuple(key[2:3])] if len(key) > 2 else out

    def _halve(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        src = np.asarray(self._source[2 * y0 : 2 * y1, 2 * x0 : 2 * x1])[..., :3]
        total = src[0::2, 0::2].astype(np.uint16) + src[1::2, 0::2]
        total += src[0::2, 1::2]
        total += src[1::2, 1::2]
        # floor(sum / 4 + 0.5): the rounded mean, in integers.
        return ((total + 2) >> 2).astype(np.uint8)


def derive_levels(
    level0: da.Array, *, min_side: int = MIN_LEVEL_SIDE
) -> tuple[tuple[da.Array, ...], tuple[float, ...]]:
    """Lazy coarser levels for a single-level slide: halve until the longest side < ``min_side``.

    Level ``k`` pixel ``i`` is the rounded 2 x 2 mean of level ``k-1`` pixels ``[2i, 2i+2)``,
    so its downsample is exactly ``2**k``. Chunks keep the native tile size of level 0.
    """
    tile = max(int(level0.chunksize[0]), int(level0.chunksize[1]), 64)
    levels = [level0]
    while max(levels[-1].shape[:2]) >= min_side and min(levels[-1].shape[:2]) >= 2:
        view = _HalvedLevel(levels[-1])
        levels.append(lazy_level(view, (tile, tile), name="derived"))
    return tuple(levels), tuple(float(2**k) for k in range(len(levels)))
