"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage).

Primary path: ``wsidicom`` (multi-file series, pyramids, labels, overviews). Single files
that wsidicom rejects because optional attributes are missing (``ImageType``,
``DimensionOrganizationType``, as written by some converters) are read directly: a
``TILED_FULL`` frame grid whose encapsulated JPEG / JPEG 2000 frames are located once with
pydicom's encapsulation parser (``pydicom.encaps``: offset tables, fragment items), read
per tile on demand and decoded with imagecodecs.
"""

from __future__ import annotations

import itertools
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ._guard import check_level_size
from ._mpp import plausible_mpp
from ._slide import LazyImages, SlideError
from ._tilesource import tiled_dask_array

__all__ = ["open_dicom"]


def open_dicom(path: Path) -> dict[str, Any]:
    """Open a DICOM WSI file or folder; return the keyword arguments of :class:`Slide`."""
    try:
        return _open_wsidicom(path)
    except SlideError:
        raise
    except Exception as exc:  # wsidicom raises its own error types and pydicom's
        if path.is_dir():
            raise SlideError(
                path,
                f"wsidicom cannot open this folder as a DICOM whole-slide series ({exc})",
                "point at a folder holding the VL Whole Slide Microscopy instances of one slide",
            ) from None
        first_error = exc
    try:
        return _open_frames(path)
    except SlideError as exc:
        raise SlideError(
            path,
            f"{exc.reason} (wsidicom also failed: {first_error})",
            exc.fix,
        ) from None


def _open_wsidicom(path: Path) -> dict[str, Any]:
    from wsidicom import WsiDicom

    wsi = WsiDicom.open(path)
    lock = threading.Lock()
    levels = []
    downsamples = []
    base = wsi.levels[0]
    for i, lvl in enumerate(wsi.levels):
        width, height = int(lvl.size.width), int(lvl.size.height)
        tile = (int(lvl.tile_size.height), int(lvl.tile_size.width))
        pyramid_level = int(getattr(lvl, "level", i))

        def read(y0: int, x0: int, y1: int, x1: int, _lvl: int = pyramid_level) -> np.ndarray:
            # wsidicom shares file handles between levels: serialise reads per slide.
            with lock:
                img = wsi.read_region((x0, y0), _lvl, (x1 - x0, y1 - y0))
            return np.asarray(img.convert("RGB"))

        check_level_size(path, f"its level {i}", height, width, tile)
        levels.append(tiled_dask_array(read, height, width, tile, name="dicom", path=path, level=i))
        downsamples.append(
            (base.size.width / width + base.size.height / height) / 2.0 if i else 1.0
        )
    spacing = getattr(base, "pixel_spacing", None)
    width_mm = getattr(spacing, "width", None)
    mpp = plausible_mpp(float(width_mm) * 1000.0) if width_mm else None  # mm -> um
    assoc = {}
    if wsi.labels:
        assoc["label"] = lambda: np.asarray(wsi.read_label().convert("RGB"))
    if wsi.overviews:
        assoc["macro"] = lambda: np.asarray(wsi.read_overview().convert("RGB"))
    return {
        "levels": tuple(levels),
        "downsamples": tuple(downsamples),
        "mpp": mpp,
        "mpp_source": "dicom" if mpp is not None else "none",
        "vendor": "dicom",
        "metadata": {"format": "dicom", "reader": "wsidicom"},
        "associated": LazyImages(assoc, path),
        "closers": (wsi.close,),
    }


class _EncapsulatedFrames:
    """The frames of encapsulated Pixel Data in an open file, read one at a time on demand.

    Frame ``k`` is ``counts[k]`` fragment items starting at file offset ``starts[k]`` (its
    first item tag). Reads go through :func:`pydicom.encaps.generate_fragments` (which checks
    each item tag and length) under a lock, as dask may read tiles from several threads.
    """

    def __init__(self, fh: Any, starts: np.ndarray, counts: np.ndarray) -> None:
        self._fh = fh
        self._starts = starts
        self._counts = counts
        self._lock = threading.Lock()

    def read(self, index: int) -> bytes:
        from pydicom.encaps import generate_fragments

        start, count = int(self._starts[index]), int(self._counts[index])
        try:
            with self._lock:
                self._fh.seek(start)
                parts = list(itertools.islice(generate_fragments(self._fh), count))
            if len(parts) != count:
                raise ValueError(f"{len(parts)} of its {count} fragments are present")
        except Exception as exc:  # pydicom raises ValueError and struct.error on damage
            raise ValueError(f"DICOM frame {index} at byte {start}: {exc}") from None
        return b"".join(parts)


def _locate_frames(fh: Any, ds: Any, nframes: int, size: int) -> _EncapsulatedFrames:
    """Find each frame's fragments once, from the offset tables; no frame data is read.

    ``fh`` is positioned at the top-level Pixel Data element (after ``dcmread(...,
    stop_before_pixels=True)``). Frame boundaries come from the Extended Offset Table when
    present (one fragment per frame: nothing else is read), else from the fragment item
    headers (:func:`pydicom.encaps.parse_fragments`, 8 bytes per item), grouped by the Basic
    Offset Table when there are more fragments than frames. Raises ``ValueError``.
    """
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    tag, vr, length = struct.unpack("<I2s2xI", fh.read(12).ljust(12, b"\0"))
    if tag != _PIXEL_DATA_TAG or vr not in (b"OB", b"OW") or length != 0xFFFFFFFF:
        raise ValueError("no encapsulated Pixel Data element follows the header")
    basic = np.asarray(parse_basic_offsets(fh), np.int64)
    first = fh.tell()  # item tag of the first fragment: the origin of both offset tables
    extended = _extended_offsets(ds)
    if extended is not None:
        offsets, lengths = extended
        if len(offsets) != nframes or len(lengths) != nframes:
            msg = f"the Extended Offset Table lists {len(offsets)} frames, {nframes} declared"
            raise ValueError(msg)
        starts = first + offsets
        _check_inside(int((starts + 8 + lengths).max(initial=first)), size)
        return _EncapsulatedFrames(fh, starts, np.ones(nframes, np.int64))
    n_items, items_list = parse_fragments(fh)
    if n_items == 0:
        raise ValueError("the encapsulated pixel data holds no fragments")
    items = np.asarray(items_list, np.int64)
    fh.seek(int(items[-1]) + 4)
    _check_inside(int(items[-1]) + 8 + struct.unpack("<I", fh.read(4))[0], size)
    if n_items == nframes:
        return _EncapsulatedFrames(fh, items, np.ones(nframes, np.int64))
    if len(basic) != nframes:
        msg = f"{n_items} fragments for {nframes} frames and no usable Basic Offset Table"
        raise ValueError(msg)
    # Several fragments per frame: each Basic Offset Table entry must be a fragment's item.
    firsts = np.searchsorted(items - first, basic)
    if firsts[0] != 0:  # leading fragments would belong to no frame, frame 0 to wrong bytes
        raise ValueError("the Basic Offset Table does not start at the first fragment")
    if (firsts >= n_items).any() or (items[firsts.clip(max=n_items - 1)] != first + basic).any():
        raise ValueError("the Basic Offset Table points between fragment items")
    counts = np.diff(np.append(firsts, n_items))
    if (counts <= 0).any():
        raise ValueError("the Basic Offset Table is not increasing")
    return _EncapsulatedFrames(fh, items[firsts], counts)


def _extended_offsets(ds: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, lengths) of the Extended Offset Table (7FE0,0001/0002), or None if absent.

    Offsets are bytes from the first fragment's item tag; both are 64-bit little-endian.
    """
    raw = (ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths"))
    if raw[0] is None or raw[1] is None:
        return None
    tables = []
    for value in raw:
        data = bytes(value)
        if len(data) % 8:
            raise ValueError(
                f"an Extended Offset Table element has {len(data)} bytes, not 8 per frame"
            )
        table = np.frombuffer(data, "<u8")
        if (table >= 2**62).any():
            raise ValueError("the Extended Offset Table points beyond any file")
        tables.append(table.astype(np.int64))
    return tables[0], tables[1]


def _check_inside(end: int, size: int) -> None:
    if end > size:
        raise ValueError(f"frame data ends at byte {end}, past the file end ({size})")


#: (7FE0,0010) Pixel Data as a little-endian uint32 of group | element << 16.
_PIXEL_DATA_TAG = 0x00107FE0
#: Decoders of the transfer syntaxes the direct reader handles (imagecodecs function names).
_DECODERS = {
    "1.2.840.10008.1.2.4.50": "jpeg8_decode",  # JPEG baseline
    "1.2.840.10008.1.2.4.91": "jpeg2k_decode",  # JPEG 2000
    "1.2.840.10008.1.2.4.90": "jpeg2k_decode",  # JPEG 2000 lossless
}
#: SOP class of VL Whole Slide Microscopy Image Storage.
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _read_header(fh: Any, path: Path) -> Any:
    """The dataset up to the Pixel Data (``fh`` is left there), checked to be a TILED_FULL WSI."""
    import pydicom

    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
    except Exception as exc:
        raise SlideError(
            path, f"pydicom cannot read it ({exc})", "check that it is a DICOM file"
        ) from None
    sop = str(getattr(ds, "SOPClassUID", ""))
    if sop != _WSI_SOP_CLASS:
        raise SlideError(
            path,
            "it is a DICOM file but not a VL Whole Slide Microscopy image "
            f"(SOP class {sop or 'missing'})",
            f"open whole-slide DICOM instances (SOP class {_WSI_SOP_CLASS})",
        )
    organisation = str(getattr(ds, "DimensionOrganizationType", "TILED_FULL"))
    if organisation not in ("TILED_FULL", "") or "PerFrameFunctionalGroupsSequence" in ds:
        raise SlideError(
            path,
            f"its frames are organised as {organisation} with per-frame positions, which only "
            "wsidicom reads, and wsidicom rejected the file",
            "convert it with wsidicomizer or open the full series folder",
        )
    return ds


def _frame_grid(ds: Any, path: Path) -> tuple[int, int, tuple[int, int], int]:
    """``(height, width, tile, frames)`` of the TILED_FULL matrix, checked to agree."""
    width = _int_element(ds, "TotalPixelMatrixColumns", path)
    height = _int_element(ds, "TotalPixelMatrixRows", path)
    tile = (_int_element(ds, "Rows", path), _int_element(ds, "Columns", path))
    nframes = _int_element(ds, "NumberOfFrames", path, default=1)
    check_level_size(path, "its pixel matrix", height, width, tile)
    if -(-width // tile[1]) * -(-height // tile[0]) != nframes:
        raise SlideError(
            path,
            f"{nframes} frames do not tile a {width} x {height} matrix "
            f"in {tile[1]} x {tile[0]} tiles",
            "the file is incomplete; export the slide again",
        )
    return height, width, tile, nframes


def _decoder(ds: Any, path: Path) -> tuple[str, Any]:
    import imagecodecs

    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _DECODERS:
        raise SlideError(
            path,
            f"its transfer syntax {syntax} is not supported by the direct DICOM reader",
            "convert it to JPEG or JPEG 2000 tiles, or make it readable by wsidicom",
        )
    return syntax, getattr(imagecodecs, _DECODERS[syntax])


def _tile_reader(
    frames: _EncapsulatedFrames, decode: Any, tile: tuple[int, int], across: int
) -> Any:
    """``read(y0, x0, y1, x1)`` of level-0 pixels, decoding only the frames under the box."""

    def frame(index: int) -> np.ndarray:
        data = frames.read(index)  # its errors name the frame and its byte offset
        try:
            arr = np.asarray(decode(data))
        except Exception as exc:  # imagecodecs raises its own types per codec
            msg = f"DICOM frame {index} cannot be decoded: {type(exc).__name__}: {exc}"
            raise ValueError(msg) from None
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return arr[: tile[0], : tile[1], :3]

    def read(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for ty in range(y0 // tile[0], -(-y1 // tile[0])):
            for tx in range(x0 // tile[1], -(-x1 // tile[1])):
                t = frame(ty * across + tx)
                ty0, tx0 = ty * tile[0], tx * tile[1]
                sy0, sx0 = max(y0, ty0), max(x0, tx0)
                sy1, sx1 = min(y1, ty0 + tile[0]), min(x1, tx0 + tile[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = t[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out

    return read


def _open_frames(path: Path) -> dict[str, Any]:
    """The direct reader: a TILED_FULL single-file WSI whose JPEG / JPEG 2000 frames are
    located once (offset tables, item headers) and decoded per tile on demand."""
    fh = open(path, "rb")  # noqa: SIM115 - closed by Slide.close()
    try:
        ds = _read_header(fh, path)
        height, width, tile, nframes = _frame_grid(ds, path)
        syntax, decode = _decoder(ds, path)
        try:
            frames = _locate_frames(fh, ds, nframes, path.stat().st_size)
        except (ValueError, IndexError, struct.error, MemoryError) as exc:
            raise SlideError(
                path, f"its encapsulated pixel data is damaged: {exc}", "re-copy the file"
            ) from None
        read = _tile_reader(frames, decode, tile, across=-(-width // tile[1]))
        try:
            read(0, 0, min(tile[0], height), min(tile[1], width))
        except Exception as exc:
            raise SlideError(
                path, f"its first frame cannot be decoded ({exc})", "re-copy the file"
            ) from None
    except BaseException:
        fh.close()
        raise
    level0 = tiled_dask_array(read, height, width, tile, name="dicom", path=path)
    mpp = _dicom_mpp(ds)
    return {
        "levels": (level0,),
        "downsamples": (1.0,),
        "mpp": mpp,
        "mpp_source": "dicom" if mpp is not None else "none",
        "vendor": "dicom",
        "metadata": _frames_metadata(ds, syntax),
        "associated": LazyImages(),
        "closers": (fh.close,),
        "derive": True,
    }


def _frames_metadata(ds: Any, syntax: str) -> dict[str, str]:
    meta = {"format": "dicom", "reader": "histolens-frames", "dicom.TransferSyntaxUID": syntax}
    for key in ("SeriesDescription", "Manufacturer", "ContainerIdentifier", "StudyDate"):
        try:
            if key in ds:
                meta[f"dicom.{key}"] = str(ds.get(key))
        except Exception:  # noqa: S112 - a damaged descriptive element is only left out
            continue
    return meta


def _int_element(ds: Any, keyword: str, path: Path, default: int | None = None) -> int:
    """The integer value of a DICOM element, or a SlideError naming it when absent or bad."""
    try:
        value = ds.get(keyword, default)
        if value is None:
            reason = f"it lacks the {keyword} element"
        else:
            return int(value)
    except Exception as exc:  # pydicom converts values lazily and raises many types
        reason = f"its {keyword} element is not an integer ({exc})"
    raise SlideError(path, reason, "the file is damaged or incomplete; export the slide again")


def _dicom_mpp(ds: Any) -> float | None:
    """Pixel spacing (mm -> um) from the shared functional groups, else from the imaged volume.

    The imaged-volume fallback (``ImagedVolumeWidth`` mm / columns) is used only when width
    and height agree within 1 %: converters often write a nominal volume there.
    """
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return plausible_mpp(float(spacing[1]) * 1000.0)
    except Exception:  # noqa: S110 - absent or damaged: try the imaged volume below
        pass
    try:
        mx = float(ds.ImagedVolumeWidth) * 1000.0 / int(ds.TotalPixelMatrixColumns)
        my = float(ds.ImagedVolumeHeight) * 1000.0 / int(ds.TotalPixelMatrixRows)
    except Exception:  # absent or damaged elements: no calibration
        return None
    if abs(mx - my) <= 0.01 * max(mx, my):
        return plausible_mpp(mx)
    return None
