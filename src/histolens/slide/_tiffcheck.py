"""Check a TIFF's declared structure before any array is built from it.

tifffile parses tags as the file says; a damaged or hostile file then fails far from the
cause (ZeroDivisionError for a zero width, TypeError in zarr for a DOUBLE width, broadcasting
errors for mismatched offset tables, OverflowError for offsets >= 2**63, a hang for a width
of 2**31). These checks use only the parsed tags and offset tables, so opening stays cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ._guard import MAX_CHUNK_BYTES, check_level_size
from ._slide import SlideError

__all__ = ["check_series_structure"]

#: TIFF data types holding unsigned integers: BYTE, SHORT, LONG, IFD, LONG8, IFD8.
_UNSIGNED = frozenset({1, 3, 4, 13, 16, 18})
#: Structural tags that must be one unsigned integer.
_SCALAR_TAGS = {
    256: "ImageWidth", 257: "ImageLength", 259: "Compression", 262: "PhotometricInterpretation",
    277: "SamplesPerPixel", 278: "RowsPerStrip", 284: "PlanarConfiguration", 322: "TileWidth",
    323: "TileLength", 32997: "ImageDepth", 32998: "TileDepth",
}  # fmt: skip
#: Offset and byte-count tables: unsigned integers, one per tile or strip.
_TABLE_TAGS = {273: "StripOffsets", 279: "StripByteCounts", 324: "TileOffsets",
               325: "TileByteCounts"}  # fmt: skip
_FIX = "the file is damaged; copy or download the slide again and compare it with the original"


def _check_tags(path: Path, what: str, page: Any) -> None:
    """Types and counts of the structural tags of one IFD."""
    for tag in page.tags.values():
        name = _SCALAR_TAGS.get(tag.code) or _TABLE_TAGS.get(tag.code)
        if name is None and tag.code != 258:  # BitsPerSample: one, or one per sample
            continue
        name = name or "BitsPerSample"
        if int(tag.dtype) not in _UNSIGNED:
            raise SlideError(
                path,
                f"{what}: its {name} tag has TIFF data type {int(tag.dtype)}, not an unsigned "
                "integer",
                _FIX,
            )
        if tag.code in _SCALAR_TAGS and tag.count != 1:
            raise SlideError(path, f"{what}: its {name} tag holds {tag.count} values, not 1", _FIX)


def _check_chunks(path: Path, what: str, page: Any, file_size: int) -> None:
    """Declared sizes, decoded tile size, and the offset tables against the file size."""
    height, width = int(page.imagelength), int(page.imagewidth)
    chunks = tuple(int(n) for n in page.chunks)
    strip = chunks[-3] if len(chunks) >= 3 else chunks[0]
    tile = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else (strip, width)
    check_level_size(path, what, height, width, tile)
    bits = page.bitspersample
    if not isinstance(bits, int):  # tifffile gives a tuple when samples differ
        raise SlideError(path, f"{what}: its samples have different bit depths {bits}", _FIX)
    itemsize = max(1, -(-bits // 8))
    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise SlideError(
            path,
            f"{what}: one {'tile' if page.is_tiled else 'strip'} decodes to "
            f"{chunk_bytes / 2**20:,.0f} MB (limit {MAX_CHUNK_BYTES >> 20} MB)",
            "convert the slide to a tiled TIFF with 256-1024 px tiles (e.g. `vips tiffsave "
            "in.tif out.tif --tile --pyramid`)",
        )
    _check_offsets(path, what, page.dataoffsets, page.databytecounts, page.chunked, file_size)


def _check_offsets(
    path: Path, what: str, offsets: Any, counts: Any, grid: Any, file_size: int
) -> None:
    """Every tile's ``[offset, offset + count)`` lies in the file; one entry per tile."""
    offsets, counts = np.asarray(offsets), np.asarray(counts)
    expected = math.prod(int(n) for n in grid)
    if not (offsets.shape == counts.shape == (expected,)):
        raise SlideError(
            path,
            f"{what}: it needs {expected} tiles/strips but its tables list {offsets.size} "
            f"offsets and {counts.size} byte counts",
            _FIX,
        )
    for table in (offsets, counts):
        if table.dtype.kind not in "ui" or (table.dtype.kind == "i" and (table < 0).any()):
            raise SlideError(
                path, f"{what}: its tile offset tables hold negative or >= 2**63 values", _FIX
            )
    offsets, counts = offsets.astype(np.uint64), counts.astype(np.uint64)
    size = np.uint64(file_size)
    # Written without a sum that could wrap around: offset <= size and count <= size - offset.
    bad = (offsets > size) | (counts > size - np.minimum(offsets, size))
    if bad.any():
        k = int(np.argmax(bad))
        raise SlideError(
            path,
            f"the file is truncated or damaged: {what} tile/strip {k} lies at bytes "
            f"{int(offsets[k])}..{int(offsets[k]) + int(counts[k])} but the file has "
            f"{file_size} bytes",
            "copy or download the slide again and compare its size with the original",
        )


def check_series_structure(path: Path, series_list: list[Any], file_size: int) -> None:
    """Check every page of every level of every series (associated images too).

    Raises :class:`SlideError` naming the image and level for zero, absurd or mistyped sizes,
    tiles too large to decode, offset tables of the wrong length, and data past the file end.
    """
    for series in series_list:
        for k, level in enumerate(series.levels):
            what = f"image {series.name or 'main'!r} level {k}"
            _check_tags(path, what, level.keyframe)
            _check_chunks(path, what, level.keyframe, file_size)
            for page in level.pages:
                if page is None or page is level.keyframe:
                    continue
                if hasattr(page, "tags"):
                    _check_tags(path, what, page)
                    _check_chunks(path, what, page, file_size)
                else:  # a TiffFrame: the keyframe's tags, its own offsets
                    grid = level.keyframe.chunked
                    _check_offsets(
                        path, what, page.dataoffsets, page.databytecounts, grid, file_size
                    )
