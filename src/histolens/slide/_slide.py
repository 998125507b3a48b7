"""The ``Slide`` value: a pyramid of lazy ``(Y, X, 3) uint8`` dask arrays plus a few facts.

Coordinates are **level-0 pixels** ``(y, x)``; a level with downsample ``f`` has pixel ``i``
covering level-0 pixels ``[i*f, (i+1)*f)``. ``mpp`` is micrometres per level-0 pixel.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from histolens.region import Region

from ._read import read_level_box

__all__ = ["LazyImages", "Slide", "SlideError", "as_rgb_uint8"]

#: Background for pixels outside the slide and for transparent pixels: brightfield glass is white.
FILL_VALUE = 255


class SlideError(ValueError):
    """A file could not be opened as a slide: names the file, what is wrong and the fix."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str, fix: str = "") -> None:
        # Keep all three in ``args`` so the error pickles across dask.distributed workers.
        super().__init__(str(path) if path is not None else None, reason, fix)
        self.path = str(path) if path is not None else None
        self.reason = reason
        self.fix = fix

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{where}{self.reason}.{fix}"


class LazyImages(Mapping[str, np.ndarray]):
    """Associated images (``thumbnail``, ``label``, ``macro``) decoded on first access, then cached.

    Each value is a ``(Y, X, 3) uint8`` array in its own pixel frame (not level-0 pixels).
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], np.ndarray]] | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._loaders = dict(loaders or {})
        self._path = path
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> np.ndarray:
        with self._lock:
            if key not in self._cache:
                if key not in self._loaders:
                    raise KeyError(key)
                try:
                    image = as_rgb_uint8(np.asarray(self._loaders[key]()), "YXS")
                except Exception as exc:  # a damaged associated image must not crash a viewer
                    raise SlideError(
                        self._path,
                        f"its {key} image cannot be read ({type(exc).__name__}: {exc})",
                        "the slide itself may still be readable; re-copy the file to get the "
                        f"{key} image back",
                    ) from None
                self._cache[key] = image
            return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"LazyImages({sorted(self._loaders)})"


def as_rgb_uint8(array: Any, axes: str = "YXS") -> Any:
    """Return ``array`` (numpy or dask) as ``(Y, X, 3) uint8``.

    ``axes`` uses tifffile letters: ``Y``/``X`` spatial, ``S`` interleaved samples, ``C`` planar
    channels; other axes must have length 1. Grey becomes RGB, an alpha channel is composited
    onto white (glass), uint16 is scaled to 8 bits, floats are taken as ``[0, 1]``.
    """
    axes = axes.upper()
    if len(axes) != array.ndim:
        msg = f"axes {axes!r} do not match an array of {array.ndim} dimensions {array.shape}"
        raise ValueError(msg)
    # Drop singleton axes that are neither spatial nor colour (T, Z, I, Q, ... of length 1).
    index: list[Any] = []
    kept = ""
    for ax, n in zip(axes, array.shape, strict=True):
        if ax in "YXSC":
            index.append(slice(None))
            kept += ax
        elif n == 1:
            index.append(0)
        else:
            msg = f"axis {ax!r} has length {n}; a slide plane needs only Y, X and colour"
            raise ValueError(msg)
    array = array[tuple(index)]
    if "S" in kept and "C" in kept:
        msg = f"axes {axes!r} have both planar (C) and interleaved (S) colour"
        raise ValueError(msg)
    if "Y" not in kept or "X" not in kept:
        msg = f"axes {axes!r} lack Y or X"
        raise ValueError(msg)
    colour = "S" if "S" in kept else ("C" if "C" in kept else "")
    order = [kept.index("Y"), kept.index("X")] + ([kept.index(colour)] if colour else [])
    array = array.transpose(order)
    if not colour:
        array = array[..., None]
    nchan = array.shape[-1]
    if nchan not in (1, 2, 3, 4):
        msg = f"a slide needs 1 (grey), 3 (RGB) or 4 (RGBA) colour samples, got {nchan}"
        raise ValueError(msg)
    lib = da if isinstance(array, da.Array) else np
    dtype = np.dtype(array.dtype)
    if dtype == np.uint8:
        pass
    elif dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif dtype.kind == "b":
        array = array.astype(np.uint8) * np.uint8(255)
    elif dtype.kind == "f":
        array = (lib.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        msg = (
            f"pixel type {dtype} is not supported; slides are 8-bit (uint8) or 16-bit (uint16) RGB"
        )
        raise ValueError(msg)
    if nchan in (2, 4):
        # Composite onto white so transparent areas look like glass, as viewers do.
        alpha = array[..., -1:].astype(np.uint16)
        rgb = array[..., :-1].astype(np.uint16)
        array = ((rgb * alpha + FILL_VALUE * (255 - alpha) + 127) // 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = lib.concatenate([array] * 3, axis=-1) if lib is da else np.repeat(array, 3, axis=-1)
    return array


def _check_mpp(mpp: float | None, what: str) -> float | None:
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0) or not math.isfinite(value):
        msg = f"{what} must be a positive number of micrometres per pixel (e.g. 0.25), got {mpp!r}"
        raise ValueError(msg)
    return value


@dataclass(frozen=True, eq=False)
class Slide:
    """A whole-slide image: lazy pyramid levels plus the facts needed to place results.

    Attributes
    ----------
    levels : tuple of dask arrays ``(Y, X, 3) uint8``, level 0 first; chunks are the file's tiles.
    downsamples : level-0 pixels per level pixel, ``1.0`` first.
    mpp : micrometres per level-0 pixel, or ``None`` when unknown.
    mpp_source : where ``mpp`` came from: ``"aperio"``, ``"ome"``, ``"tiff-resolution"``,
        ``"dicom"``, ``"philips"``, ``"ventana"``, ``"leica"``, ``"openslide"``, ``"user"``,
        ``"none"``.
    vendor : the format, e.g. ``"aperio"``, ``"ome"``, ``"dicom"``, ``"memory"``.
    metadata : vendor properties (JSON-friendly values).
    associated : ``thumbnail``/``label``/``macro`` images, decoded on first access.
    path : the file (``None`` for in-memory slides); name : a display name.
    """

    levels: tuple[da.Array, ...]
    downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    vendor: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    associated: Mapping[str, np.ndarray] = field(default_factory=LazyImages)
    path: Path | None = None
    name: str = "slide"
    # Closes file handles; kept out of repr/eq. Called by close() / the context manager.
    _closers: tuple[Callable[[], None], ...] = field(default=(), repr=False)
    # How to reopen the file in another process (dask.distributed): (path, backend hint).
    _reopen: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.levels) == 0:
            raise ValueError("a slide needs at least one pyramid level")
        if len(self.levels) != len(self.downsamples):
            msg = f"{len(self.levels)} levels but {len(self.downsamples)} downsamples"
            raise ValueError(msg)
        for i, lvl in enumerate(self.levels):
            if lvl.ndim != 3 or lvl.shape[2] != 3 or lvl.dtype != np.uint8:
                msg = f"level {i} is {lvl.shape} {lvl.dtype}; slide levels must be (Y, X, 3) uint8"
                raise ValueError(msg)
        object.__setattr__(self, "mpp", _check_mpp(self.mpp, "mpp"))
        object.__setattr__(self, "downsamples", tuple(float(f) for f in self.downsamples))
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))

    # --- facts -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0 in pixels."""
        return (int(self.levels[0].shape[0]), int(self.levels[0].shape[1]))

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(height, width)`` of every level, in that level's pixels."""
        return tuple((int(a.shape[0]), int(a.shape[1])) for a in self.levels)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """Chunk (native tile) ``(height, width)`` of level 0, in pixels."""
        return (int(self.levels[0].chunksize[0]), int(self.levels[0].chunksize[1]))

    def level_mpp(self, level: int) -> float | None:
        """Micrometres per pixel of ``level`` (``None`` if the slide mpp is unknown)."""
        return None if self.mpp is None else self.mpp * self.downsamples[level]

    def facts(self) -> dict[str, Any]:
        """JSON-friendly summary (path, name, vendor, mpp, shapes) for layer metadata and logs."""
        return {
            "path": None if self.path is None else str(self.path),
            "name": self.name,
            "vendor": self.vendor,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "shape": list(self.shape),
            "level_shapes": [list(s) for s in self.level_shapes],
            "downsamples": list(self.downsamples),
            "tile_shape": list(self.tile_shape),
            "associated": sorted(self.associated),
        }

    # --- pixels ------------------------------------------------------------------------
    def read_region(self, region: Region, level: int = 0, *, fill: int = FILL_VALUE) -> np.ndarray:
        """Pixels of ``level`` covering ``region`` (level-0 pixels, outward-rounded).

        Returns ``(h, w, 3) uint8`` with ``(h, w) = region.at_downsample(f)`` extents, so array
        pixel ``(0, 0)`` starts at level-0 ``(floor(y0/f)*f, floor(x0/f)*f)``. Parts of the box
        outside the slide are filled with ``fill`` (white glass by default), so the output shape
        never depends on where the box sits. Only the tiles under the box are decoded.
        """
        if not isinstance(region, Region):
            msg = (
                "read_region needs a histolens.Region in level-0 pixels, "
                f"got {type(region).__name__}"
            )
            raise TypeError(msg)
        if not (-len(self.levels) <= level < len(self.levels)):
            msg = f"level {level} does not exist; this slide has levels 0..{len(self.levels) - 1}"
            raise IndexError(msg)
        y0, x0, y1, x1 = region.at_downsample(self.downsamples[level])
        return read_level_box(self.levels[level], y0, x0, y1, x1, fill)

    # --- constructors ------------------------------------------------------------------
    @classmethod
    def from_array(
        cls,
        array: Any,
        *,
        mpp: float | None = None,
        name: str = "image",
        axes: str | None = None,
        chunks: int = 512,
    ) -> Slide:
        """An in-memory slide from a numpy/dask image (``(Y, X)``, ``(Y, X, 3)`` or RGBA).

        ``mpp`` is micrometres per pixel of ``array`` (``None`` = unknown, no warning: the caller
        chose). Coarser levels are derived lazily so napari shows it as multiscale.
        """
        ndim = getattr(array, "ndim", None)
        if ndim is None:
            array = np.asarray(array)
            ndim = array.ndim
        if axes is None:
            axes = {2: "YX", 3: "YXS"}.get(ndim, "")
        if not isinstance(array, da.Array):
            array = da.from_array(np.asarray(array), chunks=(chunks, chunks) + (-1,) * (ndim - 2))
        try:
            rgb = as_rgb_uint8(array, axes)
        except ValueError as exc:
            msg = f"Slide.from_array: {exc}; pass a (Y, X) grey or (Y, X, 3|4) colour image"
            raise ValueError(msg) from None
        from ._derive import derive_levels  # it builds on this module

        levels, downsamples = derive_levels(rgb)
        mpp = _check_mpp(mpp, "Slide.from_array mpp")
        return cls(
            levels=levels,
            downsamples=downsamples,
            mpp=mpp,
            mpp_source="user" if mpp is not None else "none",
            vendor="memory",
            metadata={},
            associated=LazyImages(),
            path=None,
            name=name,
        )

    def with_mpp(self, mpp: float) -> Slide:
        """The same pixels with a user-given level-0 ``mpp`` (um/px), ``mpp_source="user"``."""
        value = _check_mpp(mpp, "with_mpp(mpp)")
        if value is None:
            raise ValueError("with_mpp(mpp) needs a number of micrometres per pixel, got None")
        return replace(self, mpp=value, mpp_source="user")

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles; the levels must not be read afterwards."""
        for closer in self._closers:
            closer()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # File handles do not pickle; a file-backed slide travels as "reopen this path", so
        # dask.distributed workers read tiles themselves instead of receiving pixels.
        if self._reopen is not None:
            user_mpp = self.mpp if self.mpp_source == "user" else None
            return (_reopen_slide, (self._reopen, user_mpp))
        return (
            _rebuild,
            (
                self.levels,
                self.downsamples,
                self.mpp,
                self.mpp_source,
                self.vendor,
                dict(self.metadata),
                self.name,
            ),
        )

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:g} um/px ({self.mpp_source})"
        return (
            f"Slide(name={self.name!r}, vendor={self.vendor!r}, shape={self.shape}, "
            f"levels={len(self.levels)}, mpp={mpp})"
        )


def _reopen_slide(reopen: Sequence[str], mpp: float | None) -> Slide:
    from ._open import open_slide

    return open_slide(reopen[0], mpp=mpp)


def _rebuild(
    levels: tuple[da.Array, ...],
    downsamples: tuple[float, ...],
    mpp: float | None,
    mpp_source: str,
    vendor: str,
    metadata: dict[str, Any],
    name: str,
) -> Slide:
    return Slide(levels, downsamples, mpp, mpp_source, vendor, metadata, LazyImages(), None, name)
