"""Where on a slide the tissue section lies, decided before any tile is read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from histolens.tiles import stain_saturation

__all__ = ["tiles_in_mask", "tissue_mask"]

#: Longest side of the low-resolution image the tissue mask is computed on.
MASK_MAX_SIDE = 2048
#: Bounds of the per-slide Otsu threshold on the stain saturation, around the engine's fixed
#: tile threshold (0.08, :func:`histolens.tiles.tissue_fraction`), used when Otsu has no split.
SATURATION_BOUNDS = (0.04, 0.12)
SATURATION_FALLBACK = 0.08
#: Pixels darker than this (``max / 255``) are tissue whatever their colour: folds, dense nuclei.
DARK = 0.2


def tissue_mask(
    slide: Any, *, max_side: int = MASK_MAX_SIDE
) -> tuple[np.ndarray, tuple[float, float]]:
    """Boolean tissue mask of the whole slide and level-0 px per mask pixel ``(y, x)``.

    This answers "where on the slide is the section", once per slide on a low pyramid level,
    so that glass tiles are never read. Otsu's threshold on the :func:`stain_saturation`
    separates glass from H&E on this slide; it is clamped to :data:`SATURATION_BOUNDS` because
    a slide that is all tissue (or all glass) has no such split and a free Otsu would then cut
    the tissue in half. Only near-black pixels (:data:`DARK`) count as tissue by brightness:
    the engine's per-tile test (:func:`histolens.tiles.tissue_fraction`) takes anything
    not bright, which on an overview of a dim scan would keep all of its grey glass. The mask
    is dilated by one pixel so tissue at a mask pixel's edge is never lost.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    h0, w0 = (int(v) for v in slide.shape[:2])
    downsamples = [float(d) for d in slide.downsamples]
    fits = [i for i, d in enumerate(downsamples) if max(h0, w0) / d <= max_side]
    level = min(fits, key=lambda i: downsamples[i]) if fits else int(np.argmax(downsamples))
    arr = slide.levels[level]
    stride = max(1, math.ceil(max(arr.shape[0], arr.shape[1]) / max_side))
    px = np.asarray(arr[::stride, ::stride])
    if px.size == 0:
        return np.zeros((0, 0), bool), (1.0, 1.0)
    sat, brightest = stain_saturation(px)
    lo, hi = SATURATION_BOUNDS
    try:
        t = float(threshold_otsu(sat))
    except ValueError:  # a constant image
        t = SATURATION_FALLBACK
    t = min(max(t, lo), hi)
    mask = (sat > t) | (brightest < DARK * 255)
    mask = ndimage.binary_dilation(mask, iterations=1)
    return mask, (h0 / mask.shape[0], w0 / mask.shape[1])


def tiles_in_mask(
    tiles: Sequence[Any], f: float, mask: np.ndarray, mask_scale: tuple[float, float]
) -> np.ndarray:
    """Per tile (inner box in analysis px of ``f`` level-0 px): does the mask have tissue there."""
    if mask.size == 0:
        return np.zeros(len(tiles), bool)
    # Summed-area table: any() over a box in O(1) per tile, for whole slides of 10^5 tiles.
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    sy, sx = mask_scale
    keep = np.zeros(len(tiles), bool)
    for i, t in enumerate(tiles):
        y0 = min(max(int(math.floor(t.inner.y0 * f / sy)), 0), mask.shape[0])
        x0 = min(max(int(math.floor(t.inner.x0 * f / sx)), 0), mask.shape[1])
        y1 = min(max(int(math.ceil(t.inner.y1 * f / sy)), y0), mask.shape[0])
        x1 = min(max(int(math.ceil(t.inner.x1 * f / sx)), x0), mask.shape[1])
        keep[i] = (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0
    return keep
