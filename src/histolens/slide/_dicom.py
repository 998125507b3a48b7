"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage).

Primary path: ``wsidicom`` (multi-file series, pyramids, labels, overviews). Single files
that wsidicom rejects because optional attributes are missing (``ImageType``,
``DimensionOrganizationType``, as written by some converters) are read directly: a
``TILED_FULL`` frame grid whose encapsulated JPEG / JPEG 2000 frames are located once and
decoded per tile on demand with imagecodecs.
"""

from __future__ import annotations

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

_ITEM = 0xE000FFFE  # (FFFE,E000) little-endian as uint32 of group|element<<16
_SEQ_END = 0xE0DDFFFE


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


def _frame_offsets(fh: Any, start: int, size: int, nframes: int) -> list[list[tuple[int, int]]]:
    """``(offset, length)`` of the fragments of each frame of encapsulated pixel data.

    Reads only the 8-byte item headers. Frames are one fragment each unless the Basic Offset
    Table groups several fragments into a frame.
    """
    fh.seek(start)
    tag, length = struct.unpack("<II", fh.read(8))
    if tag != _ITEM:
        raise ValueError("pixel data is not encapsulated (no Basic Offset Table item)")
    bot = np.frombuffer(fh.read(length), dtype="<u4").astype(np.int64) if length else None
    first = fh.tell()
    fragments: list[tuple[int, int]] = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("pixel data ends before its sequence delimiter")
        tag, length = struct.unpack("<II", head)
        if tag == _SEQ_END:
            break
        if tag != _ITEM:
            raise ValueError(f"unexpected tag {tag:#010x} inside encapsulated pixel data")
        pos = fh.tell()
        if pos + length > size:
            raise ValueError(f"frame data ends at byte {pos + length}, past the file end ({size})")
        fragments.append((pos, length))
        fh.seek(length, 1)
    if len(fragments) == nframes:
        return [[f] for f in fragments]
    if bot is None or len(bot) != nframes:
        msg = f"{len(fragments)} fragments for {nframes} frames and no usable Basic Offset Table"
        raise ValueError(msg)
    # Group fragments by the Basic Offset Table (offsets of each frame's first item).
    starts = {int(o) + first: k for k, o in enumerate(bot)}
    frames: list[list[tuple[int, int]]] = []
    for pos, length in fragments:
        if pos - 8 in starts:
            frames.append([])
        frames[-1].append((pos, length))
    return frames


#: (7FE0,0010) Pixel Data, explicit VR OB, undefined length: how encapsulated frames begin.
_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"


def _pixel_data_start(fh: Any, step: int = 1 << 20) -> int:
    """File offset of the first item after the Pixel Data header (headers are small: scan)."""
    fh.seek(0)
    pos, tail = 0, b""
    while True:
        block = fh.read(step)
        if not block:
            raise ValueError("no encapsulated Pixel Data element found")
        data = tail + block
        hit = data.find(_PIXEL_DATA)
        if hit >= 0:
            return pos - len(tail) + hit + len(_PIXEL_DATA)
        tail = data[-(len(_PIXEL_DATA) - 1) :]
        pos += len(block)


def _open_frames(path: Path) -> dict[str, Any]:
    import imagecodecs
    import pydicom

    try:
        # Header only: the frames are located and decoded lazily below.
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise SlideError(
            path, f"pydicom cannot read it ({exc})", "check that it is a DICOM file"
        ) from None
    sop = str(getattr(ds, "SOPClassUID", ""))
    if sop != "1.2.840.10008.5.1.4.1.1.77.1.6":
        raise SlideError(
            path,
            "it is a DICOM file but not a VL Whole Slide Microscopy image "
            f"(SOP class {sop or 'missing'})",
            "open whole-slide DICOM instances (SOP class 1.2.840.10008.5.1.4.1.1.77.1.6)",
        )
    organisation = str(getattr(ds, "DimensionOrganizationType", "TILED_FULL"))
    if organisation not in ("TILED_FULL", "") or "PerFrameFunctionalGroupsSequence" in ds:
        raise SlideError(
            path,
            f"its frames are organised as {organisation} with per-frame positions, which only "
            "wsidicom reads, and wsidicom rejected the file",
            "convert it with wsidicomizer or open the full series folder",
        )
    width = _int_element(ds, "TotalPixelMatrixColumns", path)
    height = _int_element(ds, "TotalPixelMatrixRows", path)
    tile = (_int_element(ds, "Rows", path), _int_element(ds, "Columns", path))
    nframes = _int_element(ds, "NumberOfFrames", path, default=1)
    check_level_size(path, "its pixel matrix", height, width, tile)
    across, down = -(-width // tile[1]), -(-height // tile[0])
    if across * down != nframes:
        raise SlideError(
            path,
            f"{nframes} frames do not tile a {width} x {height} matrix "
            f"in {tile[1]} x {tile[0]} tiles",
            "the file is incomplete; export the slide again",
        )
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    decoders = {
        "1.2.840.10008.1.2.4.50": imagecodecs.jpeg8_decode,  # JPEG baseline
        "1.2.840.10008.1.2.4.91": imagecodecs.jpeg2k_decode,  # JPEG 2000
        "1.2.840.10008.1.2.4.90": imagecodecs.jpeg2k_decode,  # JPEG 2000 lossless
    }
    if syntax not in decoders:
        raise SlideError(
            path,
            f"its transfer syntax {syntax} is not supported by the direct DICOM reader",
            "convert it to JPEG or JPEG 2000 tiles, or make it readable by wsidicom",
        )
    decode = decoders[syntax]
    size = path.stat().st_size
    fh = open(path, "rb")  # noqa: SIM115 - closed by Slide.close()
    try:
        frames = _frame_offsets(fh, _pixel_data_start(fh), size, nframes)
        if len(frames) != nframes:
            msg = f"{len(frames)} frames found, {nframes} declared"
            raise ValueError(msg)
    except (ValueError, IndexError, struct.error, MemoryError) as exc:
        fh.close()
        raise SlideError(
            path, f"its encapsulated pixel data is damaged: {exc}", "re-copy the file"
        ) from None
    lock = threading.Lock()

    def frame(index: int) -> np.ndarray:
        parts = []
        with lock:
            for pos, length in frames[index]:
                fh.seek(pos)
                parts.append(fh.read(length))
        data = b"".join(parts)
        arr = np.asarray(decode(data))
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

    try:
        read(0, 0, min(tile[0], height), min(tile[1], width))
    except Exception as exc:
        fh.close()
        raise SlideError(
            path, f"its first frame cannot be decoded ({exc})", "re-copy the file"
        ) from None
    level0 = tiled_dask_array(read, height, width, tile, name="dicom", path=path)
    mpp = _dicom_mpp(ds)
    meta = {"format": "dicom", "reader": "histolens-frames", "dicom.TransferSyntaxUID": syntax}
    for key in ("SeriesDescription", "Manufacturer", "ContainerIdentifier", "StudyDate"):
        try:
            if key in ds:
                meta[f"dicom.{key}"] = str(ds.get(key))
        except Exception:  # noqa: S112 - a damaged descriptive element is only left out
            continue
    return {
        "levels": (level0,),
        "downsamples": (1.0,),
        "mpp": mpp,
        "mpp_source": "dicom" if mpp is not None else "none",
        "vendor": "dicom",
        "metadata": meta,
        "associated": LazyImages(),
        "closers": (fh.close,),
        "derive": True,
    }


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
