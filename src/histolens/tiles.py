"""Tiling with a halo, tissue masking and stitching: pure geometry, no slide reading.

Frames used here:

- **analysis pixels**: the grid the model runs on. Analysis pixel ``i`` covers level-0
  pixels ``[i * f, (i + 1) * f)`` where ``f`` is level-0 pixels per analysis pixel. The grid
  is anchored at level-0 (0, 0) for the whole slide, so tiles of overlapping regions are the
  same tiles (that is what makes the tile cache work while panning).
- **cells of stride s**: coarse outputs (tile classes, attention) where cell ``J`` covers
  analysis pixels ``[J * s, (J + 1) * s)``, also anchored at (0, 0).

Boxes are :class:`~histolens.region.Region` objects (half-open, ``(y, x)``) in one of those
frames; the frame is always said in the name or docstring. Pure numpy/scipy, no torch.
Pixels are read from a slide level by :mod:`histolens.slide` (``read_analysis_box``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .region import Region

__all__ = [
    "Block",
    "CellCanvas",
    "InstanceCanvas",
    "Tile",
    "TileGrid",
    "TileInstances",
    "cells_covering",
    "group_tiles",
    "keep_instances",
    "plan_grid",
    "split_instances",
    "tissue_fraction",
    "stain_saturation",
]


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`, boxes in global analysis pixels.

    ``inner`` is the part this tile owns; ``outer`` adds the halo on every side and is what
    the model sees. ``row``/``col`` index the tile on the global grid.
    """

    row: int
    col: int
    inner: Region
    outer: Region


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of ``size`` analysis pixels owned, read with ``halo`` pixels of context.

    The grid is global (tile ``(r, c)`` owns analysis pixels ``[r*size, (r+1)*size)`` x
    ``[c*size, (c+1)*size)``). ``size`` and ``halo`` are multiples of ``multiple`` so coarse
    model outputs of every stride line up with the global cell grid.
    """

    size: int
    halo: int
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.size <= 0 or self.halo < 0 or self.multiple <= 0:
            msg = (
                f"TileGrid(size={self.size}, halo={self.halo}, multiple={self.multiple}) needs "
                "size > 0, halo >= 0 and multiple > 0 (analysis pixels)"
            )
            raise ValueError(msg)
        if self.size % self.multiple or self.halo % self.multiple:
            msg = (
                f"TileGrid size {self.size} and halo {self.halo} must be multiples of "
                f"{self.multiple} analysis pixels; use plan_grid() to round them"
            )
            raise ValueError(msg)

    def tile(self, row: int, col: int) -> Tile:
        s, h = self.size, self.halo
        inner = Region(row * s, col * s, (row + 1) * s, (col + 1) * s)
        outer = Region(inner.y0 - h, inner.x0 - h, inner.y1 + h, inner.x1 + h)
        return Tile(row, col, inner, outer)

    def tiles(self, box: Region) -> list[Tile]:
        """Tiles whose inner box meets ``box`` (analysis pixels), row-major."""
        if box.is_empty:
            return []
        s = self.size
        rows = range(box.y0 // s, -(-box.y1 // s))
        cols = range(box.x0 // s, -(-box.x1 // s))
        return [self.tile(r, c) for r in rows for c in cols]


@dataclass(frozen=True)
class Block:
    """Adjacent tiles run as one model input (global analysis pixels).

    ``inner`` is the union of the tiles' inner boxes (a rectangle), ``outer`` adds the grid's
    halo. Every tile in a block sees at least ``halo`` pixels of context, so splitting a
    block's outputs back into tiles gives what each tile alone would (for a local model),
    at a fraction of the halo overhead.
    """

    tiles: tuple[Tile, ...]
    inner: Region
    outer: Region


def group_tiles(tiles: Sequence[Tile], grid: TileGrid, max_cells: int) -> list[Block]:
    """Greedy row-major grouping of ``tiles`` into rectangles of at most ``max_cells`` per side.

    Only tiles in ``tiles`` are grouped (cached ones are left out by the caller); a block is
    grown right, then down, while every tile it would take is present and free.
    """
    k = max(1, int(max_cells))
    free = {(t.row, t.col): t for t in tiles}
    blocks: list[Block] = []
    for t in tiles:
        if (t.row, t.col) not in free:
            continue
        r, c = t.row, t.col
        w = 1
        while w < k and (r, c + w) in free:
            w += 1
        h = 1
        while h < k and all((r + h, c + j) in free for j in range(w)):
            h += 1
        members = tuple(free.pop((r + i, c + j)) for i in range(h) for j in range(w))
        s, hl = grid.size, grid.halo
        inner = Region(r * s, c * s, (r + h) * s, (c + w) * s)
        outer = Region(inner.y0 - hl, inner.x0 - hl, inner.y1 + hl, inner.x1 + hl)
        blocks.append(Block(members, inner, outer))
    return blocks


def plan_grid(
    tile_size: int, halo: int, multiples: Sequence[int], *, inner: int | None = None
) -> TileGrid:
    """A :class:`TileGrid` from a model's input size and halo (analysis pixels).

    ``multiples`` are the strides the outputs must align to (input multiple, class cell,
    attention strides). The halo is rounded *up* (never less context than the card asks for);
    the owned size is ``tile_size - 2 * halo`` (or ``inner``) rounded to the alignment.
    """
    align = 1
    for m in multiples:
        m = int(m)
        if m <= 0:
            msg = f"output strides must be positive integers, got {list(multiples)!r}"
            raise ValueError(msg)
        align = align * m // math.gcd(align, m)
    halo_a = -(-int(halo) // align) * align
    want = int(inner) if inner is not None else int(tile_size) - 2 * halo_a
    size = max(align, round(want / align) * align)
    return TileGrid(size=size, halo=halo_a, multiple=align)


#: Pixels per band when a whole label canvas is rewritten (bounds the temporaries).
_BAND_PX = 1 << 20


def tissue_fraction(rgb: np.ndarray, *, saturation: float = 0.08, darkness: float = 0.88) -> float:
    """Fraction of pixels that look like stained tissue in an RGB uint8 image (one tile).

    A pixel is tissue when its :func:`stain_saturation` exceeds ``saturation`` or its
    brightness ``max / 255`` is below ``darkness``: glass is bright and grey, H&E is coloured,
    pen marks and folds are dark. Cheap enough to run on every tile. This is the engine's
    "is this tile worth a model call" test, read at the analysis resolution: its fixed, lenient
    thresholds (anything not bright glass counts) never skip faint tissue, since a skipped tile
    loses its nuclei while a needless one costs a model call. Where on a whole slide the
    section lies is a different question, answered on a low pyramid level by
    :func:`histolens.batch.tissue_mask` with the same saturation measure.
    """
    if rgb.size == 0:
        return 0.0
    # Subsample: a tile of 512^2 needs no more than ~16k pixels to decide.
    stride = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 16384)))
    sat, brightest = stain_saturation(rgb[::stride, ::stride])
    tissue = (sat > saturation) | (brightest < darkness * 255)
    return float(tissue.mean())


def stain_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of an ``(..., 3+)`` uint8 RGB image: the stain saturation
    ``(max - min) / max`` in [0, 1] (0 for grey glass, high for H&E) and ``max`` (0..255)."""
    px = rgb[..., :3].astype(np.int16)
    mx = px.max(axis=-1)
    return (mx - px.min(axis=-1)) / np.maximum(mx, 1), mx


@dataclass
class TileInstances:
    """Instances one tile owns (centroid in its inner box), in global analysis pixels.

    ``labels`` is a crop (uint32, 1..n, 0 = none) whose pixel (0, 0) is global analysis pixel
    ``origin``; ``centroids`` ``(n, 2)`` are the instances' centroids (global analysis pixel
    index coordinates, computed on the full tile-level instance); ``types``/``probs`` hold
    the class index and its probability per instance (index ``k`` -> label ``k + 1``).
    """

    labels: np.ndarray
    origin: tuple[int, int]
    centroids: np.ndarray
    types: np.ndarray
    probs: np.ndarray

    @property
    def count(self) -> int:
        return len(self.centroids)

    @property
    def nbytes(self) -> int:
        return int(
            self.labels.nbytes + self.centroids.nbytes + self.types.nbytes + self.probs.nbytes
        )

    @classmethod
    def empty(cls) -> TileInstances:
        return cls(
            np.zeros((0, 0), np.uint32),
            (0, 0),
            np.zeros((0, 2), np.float64),
            np.zeros(0, np.int32),
            np.zeros(0, np.float32),
        )


def keep_instances(
    labels: np.ndarray,
    tile: Tile,
    types: Sequence[int] | np.ndarray | None = None,
    probs: Sequence[float] | np.ndarray | None = None,
) -> TileInstances:
    """Instances of a tile's label image (over ``tile.outer``) whose centroid is in ``tile.inner``.

    ``types``/``probs`` are indexed by ``label - 1``. Deciding ownership by centroid means a
    nucleus cut by the seam between two tiles is kept by exactly one of them, whole (the halo
    lets the owner see all of it), which is the de-duplication rule.
    """
    return split_instances(labels, Block((tile,), tile.inner, tile.outer), types, probs)[0]


def split_instances(
    labels: np.ndarray,
    block: Block,
    types: Sequence[int] | np.ndarray | None = None,
    probs: Sequence[float] | np.ndarray | None = None,
) -> list[TileInstances]:
    """:func:`keep_instances` for every tile of ``block`` in one pass over the block's labels.

    ``labels`` covers ``block.outer`` (global analysis pixels). Each instance goes to the tile
    whose inner box holds its centroid (pixel ``k`` spans ``[k - 0.5, k + 0.5)``); centroids
    and bounding boxes are computed once for the block instead of once per tile, which matters
    when a block holds many small tiles.
    Returns one :class:`TileInstances` per ``block.tiles``, in that order.
    """
    labels = np.asarray(labels)
    outer = block.outer
    if labels.shape != outer.shape:
        msg = f"block labels have shape {labels.shape}, expected the outer box {outer.shape}"
        raise ValueError(msg)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return [TileInstances.empty() for _ in block.tiles]
    from scipy import ndimage

    flat = labels.ravel().astype(np.intp, copy=False)
    counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
    yy, xx = np.divmod(np.arange(flat.size, dtype=np.int64), labels.shape[1])
    sy = np.bincount(flat, weights=yy, minlength=n + 1)
    sx = np.bincount(flat, weights=xx, minlength=n + 1)
    ids = np.nonzero(counts[1:] > 0)[0] + 1
    cy = sy[ids] / counts[ids] + outer.y0
    cx = sx[ids] / counts[ids] + outer.x0
    ry, rx = np.floor(cy + 0.5), np.floor(cx + 0.5)  # pixel k spans [k - 0.5, k + 0.5)
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=n)
    types_a = None if types is None else np.asarray(types)
    probs_a = None if probs is None else np.asarray(probs)
    out = []
    for tile in block.tiles:
        inner = tile.inner
        own = (ry >= inner.y0) & (ry < inner.y1) & (rx >= inner.x0) & (rx < inner.x1)
        mine = ids[own]
        if len(mine) == 0:
            out.append(TileInstances.empty())
            continue
        # The union of the owned instances' bounding boxes (block-local), then one remap.
        y0 = min(boxes[i - 1][0].start for i in mine)
        y1 = max(boxes[i - 1][0].stop for i in mine)
        x0 = min(boxes[i - 1][1].start for i in mine)
        x1 = max(boxes[i - 1][1].stop for i in mine)
        remap = np.zeros(n + 1, np.uint32)
        remap[mine] = np.arange(1, len(mine) + 1, dtype=np.uint32)
        crop = remap[labels[y0:y1, x0:x1]]
        t = np.zeros(len(mine), np.int32) if types_a is None else types_a[mine - 1]
        p = np.ones(len(mine), np.float32) if probs_a is None else probs_a[mine - 1]
        out.append(
            TileInstances(
                labels=crop,
                origin=(outer.y0 + y0, outer.x0 + x0),
                centroids=np.stack([cy[own], cx[own]], axis=1),
                types=np.asarray(t, np.int32),
                probs=np.asarray(p, np.float32),
            )
        )
    return out


@dataclass
class InstanceCanvas:
    """The nuclei label image of one region, filled tile by tile (global analysis pixels).

    ``box`` is the region's analysis box. An instance is pasted when its centroid lies in
    ``box`` (a nucleus belongs to the region its centre is in); it only takes pixels still
    free, so labels never overwrite each other. Labels are numbered in paste order, which is
    the tile order, so a result does not depend on which tiles came from the cache.
    """

    box: Region
    labels: np.ndarray = field(init=False)
    _rows: list[np.ndarray] = field(init=False, default_factory=list)
    _next: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        self.labels = np.zeros(self.box.shape, np.uint32)

    def paste(self, inst: TileInstances) -> None:
        if inst.count == 0:
            return
        b = self.box
        cy, cx = inst.centroids[:, 0], inst.centroids[:, 1]
        ry, rx = np.floor(cy + 0.5), np.floor(cx + 0.5)
        inside = (ry >= b.y0) & (ry < b.y1) & (rx >= b.x0) & (rx < b.x1)
        if not inside.any():
            return
        oy, ox = inst.origin
        hy, hx = inst.labels.shape
        y0, x0 = max(oy, b.y0), max(ox, b.x0)
        y1, x1 = min(oy + hy, b.y1), min(ox + hx, b.x1)
        if y1 <= y0 or x1 <= x0:
            return
        src = inst.labels[y0 - oy : y1 - oy, x0 - ox : x1 - ox].astype(np.int64)
        keep = np.zeros(inst.count + 1, bool)
        keep[1:] = inside
        dst = self.labels[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
        mask = keep[src] & (dst == 0)
        if not mask.any():
            return
        written = src[mask]
        counts = np.bincount(written, minlength=inst.count + 1)
        got = np.nonzero(counts[1:] > 0)[0]  # local index k -> label k + 1
        new_ids = np.zeros(inst.count + 1, np.int64)
        new_ids[got + 1] = np.arange(self._next, self._next + len(got))
        dst[mask] = new_ids[written].astype(np.uint32)
        yy, xx = np.nonzero(mask)
        sy = np.bincount(written, weights=yy + (y0 - b.y0), minlength=inst.count + 1)
        sx = np.bincount(written, weights=xx + (x0 - b.x0), minlength=inst.count + 1)
        k = got + 1
        self._rows.append(
            np.stack(
                [
                    new_ids[k].astype(np.float64),
                    sy[k] / counts[k] + b.y0,  # centroid of the pixels actually shown
                    sx[k] / counts[k] + b.x0,
                    counts[k].astype(np.float64),
                    inst.types[got].astype(np.float64),
                    inst.probs[got].astype(np.float64),
                ],
                axis=1,
            )
        )
        self._next += len(got)

    def canonical(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and :meth:`table` renumbered 1..n by centroid (y, then x), in place.

        Paste order depends on which tiles came from the cache; renumbering by position
        makes the final result independent of it. The canvas is renumbered where it lies
        (a whole slide's canvas is gigabytes: no second copy, no int64 index image) in bands
        of about 1 M pixels, skipping empty bands; call it once, after the last paste.
        """
        rows = self.table()
        if len(rows) == 0:
            return self.labels, rows
        order = np.lexsort((rows[:, 2], rows[:, 1]))
        lut = np.zeros(int(rows[:, 0].max()) + 1, np.uint32)
        lut[rows[order, 0].astype(np.int64)] = np.arange(1, len(rows) + 1, dtype=np.uint32)
        out = rows[order].copy()
        out[:, 0] = np.arange(1, len(rows) + 1)
        band = max(1, _BAND_PX // max(1, self.labels.shape[1]))
        for y in range(0, self.labels.shape[0], band):
            part = self.labels[y : y + band]
            if part.any():
                np.take(lut, part, out=part)
        return self.labels, out

    def table(self) -> np.ndarray:
        """``(n, 6)`` float64 rows: label, centroid y, centroid x (global analysis px), pixel
        count, class index, probability; sorted by label."""
        if not self._rows:
            return np.zeros((0, 6), np.float64)
        return np.concatenate(self._rows, axis=0)


def cells_covering(box: Region, stride: int) -> Region:
    """The cells of ``stride`` analysis pixels that cover analysis box ``box`` (outward)."""
    s = int(stride)
    return Region(box.y0 // s, box.x0 // s, -(-box.y1 // s), -(-box.x1 // s))


@dataclass
class CellCanvas:
    """A coarse map (``(gh, gw, *channels)``) over global cells, filled tile by tile."""

    box: Region
    channels: tuple[int, ...] = ()
    dtype: type = np.float32
    fill: float = 0.0
    data: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.data = np.full(self.box.shape + tuple(self.channels), self.fill, dtype=self.dtype)

    def paste(self, values: np.ndarray, origin: tuple[int, int]) -> None:
        """Write ``values`` whose cell (0, 0) is global cell ``origin``; clipped to ``box``."""
        b = self.box
        oy, ox = origin
        y0, x0 = max(oy, b.y0), max(ox, b.x0)
        y1, x1 = min(oy + values.shape[0], b.y1), min(ox + values.shape[1], b.x1)
        if y1 <= y0 or x1 <= x0:
            return
        self.data[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0] = values[
            y0 - oy : y1 - oy, x0 - ox : x1 - ox
        ]
