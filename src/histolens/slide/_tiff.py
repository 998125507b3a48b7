"""tifffile backend: SVS, NDPI, OME-TIFF, Leica SCN, Ventana BIF, Philips and generic tiled TIFF.

Each pyramid level is ``tifffile`` series level -> ``aszarr`` store -> zarr array -> a
:class:`GuardedArray` (read failures become SlideError) -> dask array, so dask chunks are the
file's tiles and a region read decodes only the tiles under it (JPEG / JPEG 2000 / LZW ...
through imagecodecs). The declared structure is checked first (``_tiffcheck``).
"""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ._guard import GuardedArray
from ._mpp import (
    aperio_properties,
    mpp_from_aperio,
    mpp_from_ome,
    mpp_from_philips,
    mpp_from_resolution,
    mpp_from_ventana,
)
from ._read import DIRECT_READ_ATTR
from ._slide import LazyImages, SlideError, as_rgb_uint8
from ._tiffcheck import check_series_structure

__all__ = ["open_tiff", "tiff_plane_axes"]

#: tifffile series names (lower-cased) that are associated images, not the slide.
_ASSOCIATED = {"thumbnail": "thumbnail", "label": "label", "macro": "macro", "overview": "macro"}


def tiff_plane_axes(series: Any) -> str | None:
    """``series.axes`` if it holds one RGB(A)/grey 2-D plane (other axes of length 1), else None."""
    axes = series.axes.upper()
    shape = series.shape
    if "Y" not in axes or "X" not in axes:
        return None
    for ax, n in zip(axes, shape, strict=True):
        if ax in "YX":
            continue
        if ax in "SC" and n in (1, 2, 3, 4):
            continue
        if n != 1:
            return None
    if "S" in axes and "C" in axes and shape[axes.index("C")] != 1:
        return None
    return axes


def _vendor(tif: Any) -> str:
    for flag, name in (
        ("is_svs", "aperio"), ("is_ndpi", "hamamatsu"), ("is_scn", "leica"), ("is_bif", "ventana"),
        ("is_philips", "philips"), ("is_ome", "ome"),
    ):  # fmt: skip
        if getattr(tif, flag, False):
            return name
    return "generic-tiff"


def _snap_downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> float:
    """Level-0 px per level px: the integer factor when the level is level 0 divided and rounded.

    Pyramids store ``floor`` or ``ceil`` of ``size / f``; the shape ratio (e.g. 2967/1483 =
    2.0007) would misplace overlays by a pixel per thousand, so snap to ``f`` when it fits.
    """
    ratio = (shape0[0] / shape[0] + shape0[1] / shape[1]) / 2.0
    f = round(ratio)
    if f >= 1 and all(n in (s // f, -(-s // f)) for s, n in zip(shape0, shape, strict=True)):
        return float(f)
    return ratio


def _tile_offset(page: Any, across: int) -> Any:
    """``(row, col) -> byte offset`` of a tile of ``page`` (None if unknown), for messages."""

    def offset(row: int, col: int) -> int | None:
        try:
            return int(page.dataoffsets[row * across + col])
        except (IndexError, TypeError, ValueError):
            return None

    return offset


def _level_array(series: Any, level: int, axes: str, path: Path) -> tuple[da.Array, Any]:
    """One pyramid level as ``(Y, X, 3) uint8`` dask array whose chunks are the file's tiles,
    and the raw zarr array it reads (in the series' own axes)."""
    import zarr

    store = zarr.open_array(series.aszarr(level=level), mode="r")
    page = series.levels[level].keyframe
    iy, ix = axes.index("Y"), axes.index("X")
    tile = (int(store.chunks[iy]), int(store.chunks[ix]))
    guarded = GuardedArray(
        store,
        path,
        level,
        axes=(iy, ix),
        tile=tile,
        tile_offset=_tile_offset(page, -(-int(store.shape[ix]) // tile[1])),
    )
    raw = da.from_array(
        guarded,
        chunks=tuple(int(c) for c in store.chunks),
        name=f"histolens-tiff-{uuid.uuid4().hex}",
        asarray=False,
        fancy=False,
        # Inlined: slicing a level of 10^6 tiles then costs no more than a small one.
        inline_array=True,
        meta=np.empty((0,) * store.ndim, dtype=store.dtype),
    )
    rgb = as_rgb_uint8(raw, axes)
    if tuple(store.shape) == tuple(rgb.shape) and store.dtype == rgb.dtype:
        # Plain interleaved RGB: Slide.read_region can slice the zarr array itself, with no
        # dask graph per read (about 3x faster for a 1024 px box of 240 px JPEG tiles).
        setattr(rgb, DIRECT_READ_ATTR, guarded)
    return rgb, store


def _series_pyramid(tif: Any, main: Any) -> list[tuple[Any, int]]:
    """``(series, level)`` per pyramid level, level 0 first.

    SubIFD and SVS/NDPI pyramids are ``main.levels``; older OME and page-chain pyramids
    store each level as a separate series with the same axes, which are collected here.
    """
    if len(main.levels) > 1:
        return [(main, i) for i in range(len(main.levels))]
    levels = [main]
    h0, w0 = main.shape[main.axes.index("Y")], main.shape[main.axes.index("X")]
    for s in tif.series[tif.series.index(main) + 1 :]:
        if s.axes != main.axes or s.dtype != main.dtype or s.name.lower() in _ASSOCIATED:
            break
        h, w = s.shape[s.axes.index("Y")], s.shape[s.axes.index("X")]
        prev = levels[-1]
        ph, pw = prev.shape[prev.axes.index("Y")], prev.shape[prev.axes.index("X")]
        # A level must be smaller, with the same aspect (within rounding) as level 0.
        if not (h < ph and w < pw) or abs(h0 / h - w0 / w) > 0.02 * (h0 / h) + 2.0 / min(h, w):
            break
        levels.append(s)
    return [(s, 0) for s in levels]


def _main_series(tif: Any, vendor: str) -> Any:
    candidates = [s for s in tif.series if s.name.lower() not in _ASSOCIATED and tiff_plane_axes(s)]
    if not candidates:
        return None
    if vendor in ("leica", "ventana"):
        # SCN/BIF list a macro overview beside the scan: the slide is the largest image.
        return max(candidates, key=lambda s: int(np.prod(s.shape)))
    return candidates[0]


def _metadata(tif: Any, vendor: str, page0: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": vendor}
    for tag in ("Software", "DateTime", "Make", "Model", "Artist"):
        value = page0.tags.valueof(tag)
        if isinstance(value, str) and value:
            meta[f"tiff.{tag}"] = value
    desc = page0.description or ""
    if vendor == "aperio":
        meta.update({f"aperio.{k}": v for k, v in aperio_properties(desc).items()})
    elif vendor == "ome":
        match = re.search(r'<Image [^>]*Name="([^"]*)"', desc)
        if match:
            meta["ome.image_name"] = match.group(1)
    elif desc and len(desc) < 4096 and not desc.lstrip().startswith("<"):
        meta["tiff.ImageDescription"] = desc
    meta["compression"] = getattr(page0.compression, "name", str(page0.compression))
    return meta


def _find_mpp(tif: Any, vendor: str, page0: Any) -> tuple[float | None, str]:
    desc = page0.description or ""
    parsers: list[tuple[str, Any]] = []
    if vendor == "aperio":
        parsers.append(("aperio", lambda: mpp_from_aperio(desc)))
    if vendor == "ome" or tif.is_ome:
        parsers.append(("ome", lambda: mpp_from_ome(tif.ome_metadata or desc)))
    if vendor == "philips":
        parsers.append(("philips", lambda: mpp_from_philips(desc)))
    if vendor == "ventana":
        xmp = page0.tags.valueof(700)
        if isinstance(xmp, bytes):
            xmp = xmp.decode("utf-8", "replace")
        parsers.append(("ventana", lambda: mpp_from_ventana(xmp or "")))
    parsers.append(
        (
            "tiff-resolution",
            lambda: mpp_from_resolution(
                page0.tags.valueof("XResolution"), page0.tags.valueof("ResolutionUnit")
            ),
        )
    )
    for source, parse in parsers:
        value = parse()
        if value is not None:
            return value, source
    return None, "none"


class _TiffLog(logging.Handler):
    """Collects tifffile's complaints while a file is parsed: it skips a damaged IFD chain
    (e.g. "invalid page offset" past the end of a truncated file) with only a log message."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def open_tiff(path: Path) -> dict[str, Any]:
    """Open ``path`` with tifffile; return the keyword arguments of :class:`Slide`.

    Raises :class:`SlideError` for files that are not TIFF, hold no 2-D RGB/grey plane,
    are truncated or use a compression imagecodecs cannot decode.
    """
    import tifffile

    log = _TiffLog()
    logger = logging.getLogger("tifffile")
    logger.addHandler(log)
    try:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # tifffile raises many types on damaged headers
            raise SlideError(
                path,
                f"tifffile cannot parse it as TIFF ({type(exc).__name__}: {exc})",
                "check that the file is a complete whole-slide image (re-copy it if it was "
                "truncated)",
            ) from None
        try:
            try:
                parts = _open_tiff(tif, path)
            except (SlideError, ImportError):
                raise
            except Exception as exc:  # tifffile parses IFDs lazily and raises many types
                raise SlideError(
                    path,
                    f"its TIFF structure is damaged ({type(exc).__name__}: {exc})",
                    "copy or download the slide again and compare it with the original",
                ) from exc
            broken = [m for m in log.messages if "offset" in m.lower()]
            if broken:
                raise SlideError(
                    path,
                    f"the file is truncated or damaged: its image list is broken ({broken[0]})",
                    "copy or download the slide again and compare its size with the original",
                )
            return parts
        except BaseException:
            tif.close()
            raise
    finally:
        logger.removeHandler(log)


def _open_tiff(tif: Any, path: Path) -> dict[str, Any]:
    vendor = _vendor(tif)
    try:
        series_list = tif.series
    except Exception as exc:  # tifffile raises many types on corrupt IFDs
        raise SlideError(
            path, f"its TIFF structure is damaged ({exc})", "re-copy the file"
        ) from None
    main = _main_series(tif, vendor) if series_list else None
    if main is None:
        shapes = ", ".join(f"{s.axes} {s.shape}" for s in series_list) or "no images"
        raise SlideError(
            path,
            f"it holds no 2-D RGB or grey image plane ({shapes})",
            "open image stacks or multichannel fluorescence with napari's default reader; "
            "histolens reads brightfield slides",
        )
    check_series_structure(path, list(series_list), path.stat().st_size)
    series_levels = _series_pyramid(tif, main)
    axes = tiff_plane_axes(main) or main.axes
    levels: list[da.Array] = []
    for series, index in series_levels:
        rgb, store = _level_array(series, index, axes, path)
        levels.append(rgb)
    keyframe = main.keyframe
    try:
        # Decode one tile of the coarsest level now: a missing codec or corrupt data fails
        # here, with the file name, instead of later inside a napari draw or a dask worker.
        store[tuple(slice(0, int(c)) for c in store.chunks)]
    except Exception as exc:
        compression = getattr(keyframe.compression, "name", keyframe.compression)
        raise SlideError(
            path,
            f"its tiles ({compression} compression) cannot be decoded: {exc}",
            "install a complete imagecodecs (`pip install -U imagecodecs`), or convert the "
            "slide to JPEG-compressed tiled TIFF",
        ) from None
    shape0 = levels[0].shape[:2]
    downsamples = [_snap_downsample(shape0, lvl.shape[:2]) for lvl in levels]
    page0 = main.pages[0] if main.pages[0] is not None else keyframe
    mpp, mpp_source = _find_mpp(tif, vendor, page0)
    assoc = {}
    for s in series_list:
        key = _ASSOCIATED.get(s.name.lower())
        s_axes = tiff_plane_axes(s)
        if key and s_axes and s is not main and key not in assoc:
            assoc[key] = lambda s=s, a=s_axes: as_rgb_uint8(s.asarray(), a)
    return {
        "levels": tuple(levels),
        "downsamples": tuple(downsamples),
        "mpp": mpp,
        "mpp_source": mpp_source,
        "vendor": vendor,
        "metadata": _metadata(tif, vendor, page0),
        "associated": LazyImages(assoc, path),
        "closers": (tif.close,),
    }
