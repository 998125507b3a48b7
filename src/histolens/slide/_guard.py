"""Limits on declared sizes, and read guards that turn tile-decoding failures into SlideError.

A damaged or hostile file must fail with a :class:`SlideError` naming the file: at open time
when its declared structure is impossible (checked before any array is built), and at read
time, wherever the read happens (a napari draw, a dask worker), naming the level and tile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ._slide import SlideError

__all__ = [
    "MAX_CHUNK_BYTES",
    "GuardedArray",
    "check_level_size",
    "read_failure",
]

#: Longest side of any level, in pixels. 2**20 px is 26 cm at 0.25 um/px, three times the
#: length of a glass slide; larger declared sizes are damage or an attack, refused at once.
MAX_SIDE = 1 << 20
#: Largest decoded tile or strip, in bytes (256 MiB, e.g. a 8192 x 8192 RGB tile): one read
#: decodes whole tiles, so this bounds the memory of every region read.
MAX_CHUNK_BYTES = 1 << 28

#: ``tile_offset(row, col) -> byte offset in the file`` (or None), for messages only.
TileOffset = Callable[[int, int], "int | None"]

_REFETCH = "copy or download the slide again (compare its size and checksum with the original)"


def check_level_size(
    path: str | os.PathLike[str], what: str, height: int, width: int, tile: tuple[int, int]
) -> None:
    """Refuse a level whose declared size or tile size is zero, negative or absurd.

    ``height``/``width`` and ``tile`` (rows, columns) are pixels of that level.
    """
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise SlideError(
            path,
            f"{what} declares {width} x {height} pixels; a slide level must be 1 to "
            f"{MAX_SIDE:,} pixels per side",
            f"the file is damaged or not a slide; {_REFETCH}",
        )
    th, tw = tile
    if not (1 <= th and 1 <= tw and th * tw * 4 <= MAX_CHUNK_BYTES):
        raise SlideError(
            path,
            f"{what} declares tiles (or strips) of {tw} x {th} pixels; they must be at least "
            f"1 pixel and at most {MAX_CHUNK_BYTES >> 20} MB decoded",
            f"the file is damaged; {_REFETCH}, or convert it to a tiled TIFF with 256-1024 px "
            "tiles",
        )


def _box(key: Any, axes: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` that ``key`` selects on the Y and X axes (slices or ints)."""
    key = key if isinstance(key, tuple) else (key,)
    bounds = []
    for ax in axes:
        k = key[ax] if ax < len(key) else slice(None)
        if isinstance(k, slice):
            start, stop, _ = k.indices(shape[ax])
        else:
            start = int(k) % shape[ax] if shape[ax] else 0
            stop = start + 1
        bounds.append((start, stop))
    (y0, y1), (x0, x1) = bounds
    return y0, x0, y1, x1


def read_failure(
    path: str | os.PathLike[str] | None,
    level: int,
    box: tuple[int, int, int, int],
    exc: BaseException,
    tile: tuple[int, int] | None = None,
    offset: int | None = None,
) -> SlideError:
    """The :class:`SlideError` for a failed read of ``box`` (level pixels) of ``level``."""
    y0, x0, y1, x1 = box
    where = f"level {level}, pixels y {y0}:{y1}, x {x0}:{x1}"
    if tile is not None:
        where += f" (tile row {tile[0]}, column {tile[1]}"
        where += f", at byte {offset})" if offset is not None else ")"
    detail = str(exc) or type(exc).__name__
    return SlideError(
        path,
        f"its image data cannot be read at {where}: {type(exc).__name__}: {detail}",
        f"the file is damaged there; {_REFETCH}",
    )


class GuardedArray:
    """Array-like over a backend level (e.g. a zarr array of TIFF tiles) that re-raises any
    read failure as a :class:`SlideError` naming the file, the level and the failing tile.

    ``axes`` are the positions of the Y and X axes; ``tile`` is the (rows, columns) of one
    stored tile; ``tile_offset`` gives a tile's byte offset in the file for the message.
    """

    def __init__(
        self,
        array: Any,
        path: str | os.PathLike[str] | None,
        level: int,
        *,
        axes: tuple[int, int] = (0, 1),
        tile: tuple[int, int],
        tile_offset: TileOffset | None = None,
    ) -> None:
        self._array = array
        self._path = path
        self._level = level
        self._axes = axes
        self._tile = (max(1, int(tile[0])), max(1, int(tile[1])))
        self._tile_offset = tile_offset
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._array[key])
        except SlideError:
            raise
        except Exception as exc:  # codecs, zarr and tifffile raise many types on bad data
            raise self._failure(key, exc) from None

    def _failure(self, key: Any, exc: Exception) -> SlideError:
        box = _box(key, self._axes, self.shape)
        th, tw = self._tile
        rows = range(box[0] // th, -(-box[2] // th))
        cols = range(box[1] // tw, -(-box[3] // tw))
        if len(rows) * len(cols) > 64:  # a large read: name the box, not every tile
            return read_failure(self._path, self._level, box, exc)
        for r in rows:
            for c in cols:
                index = [slice(None)] * self.ndim
                index[self._axes[0]] = slice(r * th, min((r + 1) * th, self.shape[self._axes[0]]))
                index[self._axes[1]] = slice(c * tw, min((c + 1) * tw, self.shape[self._axes[1]]))
                try:
                    self._array[tuple(index)]
                except Exception as tile_exc:
                    offset = self._tile_offset(r, c) if self._tile_offset else None
                    tile_box = (r * th, c * tw, (r + 1) * th, (c + 1) * tw)
                    return read_failure(self._path, self._level, tile_box, tile_exc, (r, c), offset)
        return read_failure(self._path, self._level, box, exc)
