"""Regions in level-0 pixels, pyramid level choice by mpp, and the one alignment rule.

Everything in the core is expressed in **level-0 pixels** of the slide, ``(y, x)`` order,
half-open boxes. Micrometres only appear when results leave the core as napari layers,
through :func:`layer_transform`, the single place that turns "an array at downsample ``f``
whose pixel (0, 0) starts at level-0 pixel ``(y0, x0)``" into napari ``scale``/``translate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LevelChoice",
    "Region",
    "choose_level",
    "layer_transform",
    "visible_region",
]


@dataclass(frozen=True, order=True)
class Region:
    """Axis-aligned half-open box ``[y0, y1) x [x0, x1)`` in level-0 pixels."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __post_init__(self) -> None:
        for name in ("y0", "x0", "y1", "x1"):
            value = getattr(self, name)
            if isinstance(value, bool) or not float(value).is_integer():
                msg = f"Region.{name} must be a whole number of level-0 pixels, got {value!r}"
                raise ValueError(msg)
            object.__setattr__(self, name, int(value))
        if self.y1 < self.y0 or self.x1 < self.x0:
            msg = (
                f"Region(y0={self.y0}, x0={self.x0}, y1={self.y1}, x1={self.x1}) has its far "
                "corner before its near corner; give (y0, x0, y1, x1) with y1 >= y0 and x1 >= x0"
            )
            raise ValueError(msg)

    @classmethod
    def from_string(cls, text: str) -> Region:
        """Parse ``"y0,x0,y1,x1"`` (level-0 pixels), as given on the command line."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            msg = f"region {text!r} must be four integers 'y0,x0,y1,x1' in level-0 pixels"
            raise ValueError(msg)
        try:
            y0, x0, y1, x1 = (int(float(p)) for p in parts)
        except (ValueError, OverflowError):  # text, nan, inf
            msg = f"region {text!r} must be four integers 'y0,x0,y1,x1' in level-0 pixels"
            raise ValueError(msg) from None
        return cls(y0, x0, y1, x1)

    @classmethod
    def full(cls, shape: Sequence[int]) -> Region:
        """The whole level-0 plane of a slide of ``shape`` ``(height, width, ...)``."""
        return cls(0, 0, int(shape[0]), int(shape[1]))

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in level-0 pixels."""
        return (self.height, self.width)

    @property
    def origin(self) -> tuple[int, int]:
        """``(y0, x0)`` in level-0 pixels."""
        return (self.y0, self.x0)

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def is_empty(self) -> bool:
        return self.height == 0 or self.width == 0

    def clip(self, shape: Sequence[int]) -> Region:
        """This box clipped to a level-0 plane of ``shape`` ``(height, width, ...)``."""
        h, w = int(shape[0]), int(shape[1])
        y0, x0 = min(max(self.y0, 0), h), min(max(self.x0, 0), w)
        y1, x1 = min(max(self.y1, y0), h), min(max(self.x1, x0), w)
        return Region(y0, x0, y1, x1)

    def intersection(self, other: Region) -> Region:
        """The overlap of two boxes (possibly empty, anchored at the nearest corner)."""
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        y1, x1 = max(min(self.y1, other.y1), y0), max(min(self.x1, other.x1), x0)
        return Region(y0, x0, y1, x1)

    def contains(self, other: Region) -> bool:
        return (
            self.y0 <= other.y0
            and self.x0 <= other.x0
            and other.y1 <= self.y1
            and other.x1 <= self.x1
        )

    def at_downsample(self, factor: float) -> tuple[int, int, int, int]:
        """The box in pixels of a level at ``factor`` (outward-rounded so it covers the box)."""
        f = float(factor)
        return (
            math.floor(self.y0 / f),
            math.floor(self.x0 / f),
            math.ceil(self.y1 / f),
            math.ceil(self.x1 / f),
        )

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.y0, self.x0, self.y1, self.x1)


@dataclass(frozen=True)
class LevelChoice:
    """Which pyramid level to read for a target resolution.

    ``resample`` is the zoom to apply to pixels read at ``level`` so that they are at
    ``target_mpp``: ``> 1`` upsamples, ``< 1`` downsamples, ``1.0`` means read as is.
    """

    level: int
    downsample: float
    level_mpp: float
    target_mpp: float
    resample: float

    @property
    def exact(self) -> bool:
        return abs(self.resample - 1.0) < 0.02


def choose_level(mpp: float, downsamples: Sequence[float], target_mpp: float) -> LevelChoice:
    """Pick the pyramid level to read for ``target_mpp`` (um/px) on a slide of level-0 ``mpp``.

    Takes the coarsest level that is no coarser than the target (within 2 %), so the model
    never sees upsampled pixels when a finer level exists; resampling covers the rest.
    """
    if mpp is None or not (mpp > 0) or not math.isfinite(mpp):
        msg = f"level-0 mpp must be a positive number of micrometres per pixel, got {mpp!r}"
        raise ValueError(msg)
    if not (target_mpp > 0) or not math.isfinite(target_mpp):
        msg = f"target mpp must be a positive number of micrometres per pixel, got {target_mpp!r}"
        raise ValueError(msg)
    if len(downsamples) == 0:
        msg = "a slide needs at least one pyramid level"
        raise ValueError(msg)
    best = 0
    for i, f in enumerate(downsamples):
        if mpp * float(f) <= target_mpp * 1.02:
            if mpp * float(f) >= mpp * float(downsamples[best]):
                best = i
    level_mpp = mpp * float(downsamples[best])
    return LevelChoice(
        level=best,
        downsample=float(downsamples[best]),
        level_mpp=level_mpp,
        target_mpp=float(target_mpp),
        resample=level_mpp / float(target_mpp),
    )


def layer_transform(
    mpp: float, downsample: float, origin: Sequence[float] = (0.0, 0.0)
) -> tuple[tuple[float, float], tuple[float, float]]:
    """napari ``(scale, translate)`` in micrometres for an array laid on the slide layer.

    The array's pixels are ``downsample`` level-0 pixels wide (any positive real: a pyramid
    downsample, a model resampling, a tile-class cell) and its pixel ``(0, 0)`` covers level-0
    pixels starting at ``origin = (y0, x0)``. napari puts pixel *centres* at
    ``translate + scale * index``, and the slide layer (``scale=mpp``, no translate) has the
    centre of level-0 pixel ``k`` at ``k * mpp``; the centre of output pixel 0 is at level-0
    coordinate ``y0 + (downsample - 1) / 2``.
    """
    f = float(downsample)
    if not (f > 0):
        msg = f"downsample must be positive, got {downsample!r}"
        raise ValueError(msg)
    m = float(mpp)
    y0, x0 = (float(v) for v in origin)
    scale = (m * f, m * f)
    translate = (m * (y0 + (f - 1.0) / 2.0), m * (x0 + (f - 1.0) / 2.0))
    return scale, translate


def visible_region(
    center: Sequence[float],
    zoom: float,
    canvas_size: Sequence[int],
    *,
    layer_scale: Sequence[float],
    layer_translate: Sequence[float] = (0.0, 0.0),
    level0_shape: Sequence[int] | None = None,
) -> Region:
    """The level-0 box on screen, from a captured camera state (pure, no viewer).

    ``center`` is the camera centre in world units (the last two axes are ``(y, x)``),
    ``zoom`` is screen pixels per world unit, ``canvas_size`` is ``(height, width)`` in screen
    pixels, and ``layer_scale``/``layer_translate`` are the slide layer's (world units per
    level-0 pixel, usually micrometres). The box covers every level-0 pixel that is at least
    partly visible, clipped to ``level0_shape`` when given.
    """
    if not (zoom > 0):
        msg = f"camera zoom must be positive, got {zoom!r}"
        raise ValueError(msg)
    cy, cx = (float(v) for v in list(center)[-2:])
    h, w = (float(v) for v in list(canvas_size)[-2:])
    sy, sx = (float(v) for v in list(layer_scale)[-2:])
    ty, tx = (float(v) for v in list(layer_translate)[-2:])
    half_y, half_x = h / (2.0 * zoom), w / (2.0 * zoom)
    # world -> continuous level-0 data coordinate (pixel k spans [k - 0.5, k + 0.5))
    lo_y, hi_y = sorted(((cy - half_y - ty) / sy, (cy + half_y - ty) / sy))
    lo_x, hi_x = sorted(((cx - half_x - tx) / sx, (cx + half_x - tx) / sx))
    y0, x0 = math.floor(lo_y + 0.5), math.floor(lo_x + 0.5)
    y1, x1 = math.floor(hi_y + 0.5) + 1, math.floor(hi_x + 0.5) + 1
    y0, x0 = max(y0, 0), max(x0, 0)
    y1, x1 = max(y1, y0), max(x1, x0)
    region = Region(y0, x0, y1, x1)
    if level0_shape is not None:
        region = region.clip(level0_shape)
    return region
