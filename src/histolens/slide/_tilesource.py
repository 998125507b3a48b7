"""Wrap a "read this box of this level" function as a lazy dask array chunked by tiles.

Used by the backends that are not zarr stores (DICOM, OpenSlide): dask asks for one chunk
(= one native tile) at a time, so a region read decodes only the tiles under it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import dask.array as da
import numpy as np

__all__ = ["BoxReader", "tiled_dask_array"]

#: ``read(y0, x0, y1, x1) -> (y1-y0, x1-x0, 3) uint8`` in the level's own pixels.
BoxReader = Callable[[int, int, int, int], np.ndarray]


class _LevelView:
    """Array-like (shape, dtype, ndim, __getitem__ with slices) over a :data:`BoxReader`."""

    def __init__(self, read: BoxReader, height: int, width: int) -> None:
        self._read = read
        self.shape = (height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = np.asarray(self._read(y0, x0, y1, x1), dtype=np.uint8)
        if block.shape != (y1 - y0, x1 - x0, 3):
            msg = f"tile reader returned {block.shape}, expected {(y1 - y0, x1 - x0, 3)}"
            raise ValueError(msg)
        return block[(slice(None), slice(None)) + tuple(key[2:3])] if len(key) > 2 else block


def tiled_dask_array(
    read: BoxReader, height: int, width: int, tile: tuple[int, int], *, name: str
) -> da.Array:
    """A ``(height, width, 3) uint8`` dask array; chunk ``(i, j)`` = ``read`` of tile ``(i, j)``."""
    view = _LevelView(read, height, width)
    # A unique graph key per opened level (also across processes): two slides must never
    # share cached or scheduled chunks.
    return da.from_array(
        view,
        chunks=(tile[0], tile[1], 3),
        name=f"histolens-{name}-{uuid.uuid4().hex}",
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
