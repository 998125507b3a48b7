"""Wrap a "read this box of this level" function as a lazy dask array chunked by tiles.

Used by the backends that are not zarr stores (DICOM, OpenSlide) and by derived levels: dask
asks for one chunk (= one native tile) at a time, so a region read decodes only the tiles
under it. A failing read becomes a :class:`SlideError` naming the file, level and box.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np

from ._guard import read_failure
from ._read import DIRECT_READ_ATTR
from ._slide import SlideError

__all__ = ["BoxReader", "lazy_level", "tiled_dask_array"]

#: ``read(y0, x0, y1, x1) -> (y1-y0, x1-x0, 3) uint8`` in the level's own pixels.
BoxReader = Callable[[int, int, int, int], np.ndarray]


class _LevelView:
    """Array-like (shape, dtype, ndim, __getitem__ with slices) over a :data:`BoxReader`."""

    def __init__(
        self,
        read: BoxReader,
        height: int,
        width: int,
        path: str | os.PathLike[str] | None = None,
        level: int = 0,
    ) -> None:
        self._read = read
        self._path = path
        self._level = level
        self.shape = (height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        try:
            block = np.asarray(self._read(y0, x0, y1, x1), dtype=np.uint8)
            if block.shape != (y1 - y0, x1 - x0, 3):
                msg = f"tile reader returned {block.shape}, expected {(y1 - y0, x1 - x0, 3)}"
                raise ValueError(msg)
        except SlideError:
            raise
        except Exception as exc:  # decoders and backends raise many types on damaged data
            raise read_failure(self._path, self._level, (y0, x0, y1, x1), exc) from None
        return block[(slice(None), slice(None)) + tuple(key[2:3])] if len(key) > 2 else block


def lazy_level(view: Any, tile: tuple[int, int], *, name: str) -> da.Array:
    """A dask array over an array-like ``view`` ``(Y, X, 3) uint8``, chunked ``tile``.

    The view is inlined in every task, so slicing a level of 10^6 tiles costs no more than
    slicing a small one (a shared array key makes dask scan every chunk key per compute).
    ``Slide.read_region`` slices the view itself, with no dask graph (:data:`DIRECT_READ_ATTR`).
    """
    # A unique graph key per opened level (also across processes): two slides must never
    # share cached or scheduled chunks.
    array = da.from_array(
        view,
        chunks=(tile[0], tile[1], 3),
        name=f"histolens-{name}-{uuid.uuid4().hex}",
        asarray=False,
        fancy=False,
        inline_array=True,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
    setattr(array, DIRECT_READ_ATTR, view)
    return array


def tiled_dask_array(
    read: BoxReader,
    height: int,
    width: int,
    tile: tuple[int, int],
    *,
    name: str,
    path: str | os.PathLike[str] | None = None,
    level: int = 0,
) -> da.Array:
    """A ``(height, width, 3) uint8`` dask array; chunk ``(i, j)`` = ``read`` of tile ``(i, j)``.

    ``path`` and ``level`` name the source in the :class:`SlideError` of a failed read.
    """
    return lazy_level(_LevelView(read, height, width, path, level), tile, name=name)
