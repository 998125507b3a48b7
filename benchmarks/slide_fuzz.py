"""Fuzz ``open_slide`` with seeded mutations of the shared slides.

The only allowed outcomes of a case are "opened, and a few regions of every level (and the
associated images) read" or a ``SlideError`` whose message names the file. Anything else
(another exception type, a SlideError without the path, a crash, a hang past the timeout,
running out of the memory cap) is *bad*.

Cases run in worker subprocesses (many cases per worker, so imports are paid once) with an
address-space cap (``RLIMIT_AS``) and a per-case timeout; a worker that hangs or dies is
replaced and the case recorded as ``hang``/``crash``. Mutation classes: truncation, byte
flips in the header and in tile data, TIFF tag value/type/count changes, IFD entry counts,
IFD pointers, tile offset tables, DICOM element and frame-item changes, and handmade files
(sparse 10^6 px TIFFs, BigTIFF offsets >= 2**63, 2**31 px widths, ``head -c 4``, ...).

    python benchmarks/slide_fuzz.py --cases 3000          # the large run
    python benchmarks/slide_fuzz.py --cases 300 --keep /tmp/bad   # write bad cases out
    python benchmarks/slide_fuzz.py --replay 17 --seed 0  # run one case in this process
    python benchmarks/slide_fuzz.py --classes dicom_element,dicom_frames  # some classes only

``tests/test_slide_fuzz.py`` runs a few hundred cases by default and more under ``-m slow``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WSI = Path(os.environ.get("HISTOLENS_SHARED_DATA", REPO.parent / "shared" / "data")) / "wsi"
#: Address-space cap of a worker (bytes): imports take ~1.5 GB of it, mostly thread stacks
#: and shared-library mappings; the rest bounds what a hostile file can make us allocate.
MEMORY_CAP = 3 << 30
TIMEOUT_S = 20.0
#: Pixels of level 0 a region read may cover per side (bounds reads of derived levels).
READ_SPAN = 4096

TIFF_SOURCES = ("CMU-1-Small-Region.svs", "OS-1-detail.ome.tif",
                "derived/CMU-1-Small-Region.pyramid.ome.tif", "@bigtiff")  # fmt: skip
DICOM_SOURCES = ("small_dicom.dcm", "@complete.dcm")


# --- sources and their layout -----------------------------------------------------------
@dataclass
class Entry:
    """One IFD entry: where its fields sit in the file."""

    pos: int  # file offset of the entry
    code: int
    dtype: int
    count: int
    value_pos: int  # where the value (inline) or the pointer to it sits
    value_at: int  # where the value bytes are (value_pos if inline)


@dataclass
class TiffLayout:
    byteorder: str
    bigtiff: bool
    ifds: list[int]  # IFD offsets
    ifd_counts: list[int]  # position of each IFD's entry count
    next_ptrs: list[int]  # position of each IFD's next-IFD pointer
    entries: list[Entry]
    data: list[tuple[int, int]]  # (offset, length) of tile/strip data


@dataclass
class Source:
    name: str
    data: bytes
    kind: str  # "tiff" or "dicom"
    tiff: TiffLayout | None = None
    dicom_pixels: int = 0  # where the pixel data items start
    dicom_items: list[int] = field(default_factory=list)  # positions of item headers


def _tiff_layout(path: Path) -> TiffLayout:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        bo = tif.byteorder
        big = tif.is_bigtiff
        pages = list(tif.pages)
        for series in tif.series:
            for level in series.levels:
                pages.extend(p for p in level.pages if p is not None and p not in pages)
        csize, esize, psize = (8, 20, 8) if big else (2, 12, 4)
        ifds, counts, nexts, entries, data = [], [], [], [], []
        for page in pages:
            if not hasattr(page, "tags"):
                continue
            ifds.append(page.offset)
            counts.append(page.offset)
            nexts.append(page.offset + csize + len(page.tags) * esize)
            for tag in page.tags.values():
                entries.append(
                    Entry(
                        tag.offset,
                        tag.code,
                        int(tag.dtype),
                        tag.count,
                        tag.offset + 4 + psize,
                        tag.valueoffset,
                    )  # fmt: skip
                )
            data.extend(
                (int(o), int(c))
                for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)
                if c
            )
    return TiffLayout(bo, big, ifds, counts, nexts, entries, data)


def _dicom_items(data: bytes) -> tuple[int, list[int]]:
    marker = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
    start = data.find(marker) + len(marker)
    items, pos = [], start
    while pos + 8 <= len(data):
        tag, length = struct.unpack_from("<II", data, pos)
        items.append(pos)
        if tag != 0xE000FFFE:
            break
        pos += 8 + length
    return start, items


def _bigtiff_source(tmp: Path) -> Path:
    """A small BigTIFF pyramid (SubIFDs, JPEG tiles) cut from the SVS: 64-bit offsets."""
    import tifffile

    path = tmp / "pyramid.bigtiff.tif"
    if not path.exists():
        img = tifffile.imread(WSI / TIFF_SOURCES[0])[:1024, :1024]
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            opts = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
            tw.write(img, subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **opts)
            tw.write(img[::2, ::2], subfiletype=1, **opts)
            tw.write(img[::4, ::4], subfiletype=1, **opts)
    return path


def _complete_dicom(tmp: Path) -> Path:
    """The shared DICOM with the attributes wsidicom needs, so its reader is fuzzed too."""
    import warnings

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = tmp / "complete.dcm"
    if path.exists():
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(WSI / DICOM_SOURCES[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.PhotometricInterpretation = "YBR_FULL_422"  # the frames are JFIF YCbCr, not the RGB it says
    measures = Dataset()
    measures.PixelSpacing = [0.0005, 0.0005]  # mm
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    light = Dataset()
    light.CodeValue, light.CodingSchemeDesignator = "414298005", "SCT"
    light.CodeMeaning = "Brightfield illumination"
    item = Dataset()
    item.OpticalPathIdentifier = "1"
    item.IlluminationTypeCodeSequence = Sequence([light])
    ds.OpticalPathSequence = Sequence([item])
    ds.ContainerIdentifier, ds.PatientName, ds.PatientID, ds.StudyID = "s", "anon", "anon", "1"
    uid = "1.2.826.0.1.3680043.8.498.1"  # fixed UIDs: the file is the same in every run
    ds.FrameOfReferenceUID, ds.StudyInstanceUID = uid + ".1", uid + ".2"
    ds.SeriesInstanceUID = uid + ".3"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid + ".4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def load_sources(tmp: Path) -> dict[str, Source]:
    sources = {}
    for name in TIFF_SOURCES:
        path = _bigtiff_source(tmp) if name == "@bigtiff" else WSI / name
        sources[name] = Source(name, path.read_bytes(), "tiff", tiff=_tiff_layout(path))
    for name in DICOM_SOURCES:
        path = _complete_dicom(tmp) if name == "@complete.dcm" else WSI / name
        data = path.read_bytes()
        start, items = _dicom_items(data)
        sources[name] = Source(name, data, "dicom", dicom_pixels=start, dicom_items=items)
    return sources


# --- mutations ------------------------------------------------------------------------------
Rng = np.random.Generator
INTERESTING = (0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 256, 4096, 32767, 32768, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1)  # fmt: skip
INTERESTING_64 = (*INTERESTING, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
#: Tags whose values and types matter to the reader.
STRUCTURAL = (254, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 322, 323, 324, 325, 330,
              338, 339, 347, 530, 32997)  # fmt: skip


def _pick(rng: Rng, seq: Any) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _put_uint(buf: bytearray, pos: int, value: int, size: int, byteorder: str) -> None:
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
    struct.pack_into(byteorder + fmt, buf, pos, value % (1 << (8 * size)))


def _value(rng: Rng, big: bool, original: int | None = None) -> int:
    choices = INTERESTING_64 if big else INTERESTING
    if original is not None and rng.random() < 0.3:
        return max(0, original + int(rng.integers(-3, 4)))
    if rng.random() < 0.2:
        return int(rng.integers(0, 2**32))
    return int(_pick(rng, choices))


def m_truncate(rng: Rng, src: Source) -> bytes:
    n = len(src.data)
    mode = int(rng.integers(3))
    if mode == 0:
        return src.data[: int(rng.integers(1, 40))]
    if mode == 1 and src.tiff:
        ifd = _pick(rng, src.tiff.ifds)
        return src.data[: int(rng.integers(ifd, min(n, ifd + 4096)))]
    return src.data[: int(rng.integers(1, n))]


def _flip(rng: Rng, data: bytes, lo: int, hi: int, nbytes: int) -> bytes:
    buf = bytearray(data)
    for _ in range(nbytes):
        pos = int(rng.integers(lo, max(lo + 1, hi)))
        if pos < len(buf):
            buf[pos] ^= int(rng.integers(1, 256))
    return bytes(buf)


def m_flip_header(rng: Rng, src: Source) -> bytes:
    if src.tiff:
        if rng.random() < 0.2:
            return _flip(rng, src.data, 0, 16, 1)
        ifd = _pick(rng, src.tiff.ifds)
        entries = sorted(e.pos for e in src.tiff.entries if ifd < e.pos < ifd + 20 * 400)
        end = entries[-1] + 20 if entries else ifd + 64
        return _flip(rng, src.data, ifd, end, int(rng.integers(1, 5)))
    return _flip(rng, src.data, 128, src.dicom_pixels, int(rng.integers(1, 5)))


def m_flip_data(rng: Rng, src: Source) -> bytes:
    if src.tiff:
        offset, length = _pick(rng, src.tiff.data)
        return _flip(rng, src.data, offset, offset + length, int(rng.integers(1, 17)))
    item = _pick(rng, src.dicom_items[1:-1])
    length = struct.unpack_from("<I", src.data, item + 4)[0]
    return _flip(rng, src.data, item + 8, item + 8 + length, int(rng.integers(1, 17)))


def _entry(rng: Rng, src: Source, codes: tuple[int, ...] = STRUCTURAL) -> Entry:
    assert src.tiff is not None
    chosen = [e for e in src.tiff.entries if e.code in codes] or src.tiff.entries
    return _pick(rng, chosen)


def m_tag_value(rng: Rng, src: Source) -> bytes:
    lay = src.tiff
    assert lay is not None
    e = _entry(rng, src)
    buf = bytearray(src.data)
    size = {1: 1, 3: 2, 4: 4, 16: 8, 13: 4, 18: 8}.get(e.dtype, 4)
    if e.value_at != e.value_pos:  # the values live elsewhere: move the pointer, or one value
        if rng.random() < 0.5:
            psize = 8 if lay.bigtiff else 4
            _put_uint(buf, e.value_pos, _value(rng, lay.bigtiff, e.value_at), psize, _bo(lay))
            return bytes(buf)
        pos = e.value_at + size * int(rng.integers(e.count))
        _put_uint(buf, pos, _value(rng, size == 8), size, _bo(lay))
        return bytes(buf)
    pos = e.value_at + size * int(rng.integers(max(1, e.count)))
    _put_uint(buf, pos, _value(rng, size == 8), size, _bo(lay))
    return bytes(buf)


def _bo(lay: TiffLayout) -> str:
    return "<" if lay.byteorder == "<" else ">"


def m_tag_type(rng: Rng, src: Source) -> bytes:
    lay = src.tiff
    assert lay is not None
    e = _entry(rng, src)
    buf = bytearray(src.data)
    new = int(_pick(rng, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19, 255)))
    _put_uint(buf, e.pos + 2, new if new != e.dtype else 12, 2, _bo(lay))
    return bytes(buf)


def m_tag_count(rng: Rng, src: Source) -> bytes:
    lay = src.tiff
    assert lay is not None
    e = _entry(rng, src)
    buf = bytearray(src.data)
    _put_uint(buf, e.pos + 4, _value(rng, lay.bigtiff, e.count), 8 if lay.bigtiff else 4, _bo(lay))
    return bytes(buf)


def m_ifd_pointer(rng: Rng, src: Source) -> bytes:
    lay = src.tiff
    assert lay is not None
    buf = bytearray(src.data)
    psize = 8 if lay.bigtiff else 4
    subifds = [e for e in lay.entries if e.code == 330]
    where = int(rng.integers(3 if subifds else 2))
    if where == 0:
        pos = 8 if lay.bigtiff else 4  # the header's first-IFD pointer
    elif where == 1:
        pos = _pick(rng, lay.next_ptrs)
    else:
        e = _pick(rng, subifds)
        pos = e.value_at + psize * int(rng.integers(e.count))
    n = len(src.data)
    value = _pick(rng, (0, 1, 8, 9, n, n - 1, n + 7, _pick(rng, lay.ifds), _pick(rng, lay.ifds) + 2,
                        int(rng.integers(0, n)), _value(rng, lay.bigtiff)))  # fmt: skip
    _put_uint(buf, pos, value, psize, _bo(lay))
    return bytes(buf)


def m_ifd_entry_count(rng: Rng, src: Source) -> bytes:
    lay = src.tiff
    assert lay is not None
    buf = bytearray(src.data)
    pos = _pick(rng, lay.ifd_counts)
    size = 8 if lay.bigtiff else 2
    old = struct.unpack_from(_bo(lay) + ("Q" if lay.bigtiff else "H"), buf, pos)[0]
    value = _pick(rng, (0, 1, old - 1, old + 1, old + 5, 255, 65535, _value(rng, lay.bigtiff)))
    _put_uint(buf, pos, value, size, _bo(lay))
    return bytes(buf)


def m_offset_table(rng: Rng, src: Source) -> bytes:
    lay = src.tiff
    assert lay is not None
    e = _entry(rng, src, (273, 279, 324, 325))
    buf = bytearray(src.data)
    size = {3: 2, 4: 4, 16: 8}.get(e.dtype, 4)
    n = len(src.data)
    for _ in range(int(rng.integers(1, 3))):
        pos = e.value_at + size * int(rng.integers(max(1, e.count)))
        value = _pick(rng, (0, 1, n - 1, n, n + 1, _pick(rng, lay.data)[0], _value(rng, size == 8),
                            2**63, 2**64 - 1))  # fmt: skip
        _put_uint(buf, pos, value, size, _bo(lay))
    return bytes(buf)


#: DICOM elements: (group, element, VR). Explicit VR little endian.
DICOM_ELEMENTS = (
    (0x0002, 0x0000, "UL"), (0x0002, 0x0010, "UI"), (0x0008, 0x0016, "UI"),
    (0x0028, 0x0002, "US"), (0x0028, 0x0004, "CS"), (0x0028, 0x0006, "US"),
    (0x0028, 0x0008, "IS"), (0x0028, 0x0010, "US"), (0x0028, 0x0011, "US"),
    (0x0028, 0x0100, "US"), (0x0028, 0x0101, "US"), (0x0028, 0x0102, "US"),
    (0x0048, 0x0001, "FL"), (0x0048, 0x0002, "FL"), (0x0048, 0x0006, "UL"),
    (0x0048, 0x0007, "UL"), (0x0020, 0x9311, "CS"), (0x0008, 0x0008, "CS"),
    (0x0028, 0x0030, "DS"), (0x5200, 0x9229, "SQ"),
)  # fmt: skip
_LONG_VRS = {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL"}


def _find_element(data: bytes, group: int, elem: int, vr: str, end: int) -> int:
    return data.find(struct.pack("<HH", group, elem) + vr.encode(), 0, end)


def m_dicom_element(rng: Rng, src: Source) -> bytes:
    found = []
    for g, el, vr in DICOM_ELEMENTS:
        pos = _find_element(src.data, g, el, vr, src.dicom_pixels)
        if pos >= 0:
            found.append((pos, vr))
    pos, vr = _pick(rng, found)
    long = vr in _LONG_VRS
    head = 12 if long else 8
    length = struct.unpack_from("<I" if long else "<H", src.data, pos + (8 if long else 6))[0]
    op = int(rng.integers(5))
    if op == 0:  # delete the element
        return src.data[:pos] + src.data[pos + head + length :]
    if op == 1:  # another length field
        buf = bytearray(src.data)
        new = _pick(rng, (0, 1, length + 1, length - 1, 0xFFFF, 0xFFFFFFFF))
        _put_uint(buf, pos + (8 if long else 6), new, 4 if long else 2, "<")
        return bytes(buf)
    if op == 2:  # another VR
        buf = bytearray(src.data)
        buf[pos + 4 : pos + 6] = _pick(rng, (b"US", b"UL", b"SS", b"FD", b"OB", b"XX", b"\0\0"))
        return bytes(buf)
    if vr in ("US", "UL"):
        size = 2 if vr == "US" else 4
        new_value = struct.pack("<" + "HI"[size // 4], _value(rng, False) % (1 << (8 * size)))
    elif vr == "FL":
        new_value = struct.pack("<f", _pick(rng, (0.0, -1.0, float("nan"), float("inf"), 1e30)))
    else:
        new_value = _pick(rng, (b"", b"abc ", b"-1", b"0 ", b"99999999999 ", b"1.2.3", b"\xff\xfe",
                                b"TILED_SPARSE", bytes(rng.integers(0, 256, 8, dtype=np.uint8))))  # fmt: skip
        if len(new_value) % 2:
            new_value += b" "
    fmt = "<I" if long else "<H"
    header = src.data[pos : pos + (8 if long else 6)] + struct.pack(fmt, len(new_value))
    return src.data[:pos] + header + new_value + src.data[pos + head + length :]


def m_dicom_frames(rng: Rng, src: Source) -> bytes:
    buf = bytearray(src.data)
    pos = _pick(rng, src.dicom_items)
    if rng.random() < 0.5:
        _put_uint(buf, pos + 4, _value(rng, False), 4, "<")  # the item length
    else:
        _put_uint(buf, pos, _pick(rng, (0, 0xE0DDFFFE, 0xE00DFFFE, 0x12345678)), 4, "<")
    return bytes(buf)


# --- handmade files ---------------------------------------------------------------------------
def _bigtiff(entries: list[tuple[int, int, Any]]) -> bytes:
    """A one-IFD little-endian BigTIFF: ``entries`` are (code, type, values); arrays go after."""
    dtypes = {1: "B", 2: "B", 3: "H", 4: "I", 12: "d", 16: "Q"}
    entries = sorted(entries)
    ifd_size = 8 + 20 * len(entries) + 8
    out = bytearray(b"II+\x00" + struct.pack("<HHQ", 8, 0, 16))
    extra = bytearray()
    body = bytearray(struct.pack("<Q", len(entries)))
    for code, dtype, values in entries:
        arr = np.asarray(values, dtype="<" + dtypes[dtype]).ravel()
        raw = arr.tobytes()
        body += struct.pack("<HHQ", code, dtype, arr.size)
        if len(raw) <= 8:
            body += raw.ljust(8, b"\0")
        else:
            body += struct.pack("<Q", 16 + ifd_size + len(extra))
            extra += raw + b"\0" * (len(raw) % 2)
    body += struct.pack("<Q", 0)
    return bytes(out + body + extra)


def _sparse_tiff(height: int, width: int, tile: int, n: int | None = None) -> bytes:
    """A tiled RGB BigTIFF whose tiles are all absent (offset and byte count 0); ``n`` tiles
    listed (default: as many as the size needs)."""
    n = -(-height // tile) * -(-width // tile) if n is None else n
    return _bigtiff([
        (256, 4, width), (257, 4, height), (258, 3, [8, 8, 8]), (259, 3, 1), (262, 3, 2),
        (277, 3, 3), (284, 3, 1), (322, 4, tile), (323, 4, tile),
        (324, 16, np.zeros(n, np.uint64)), (325, 16, np.zeros(n, np.uint64)),
    ])  # fmt: skip


def _handmade(sources: dict[str, Source]) -> list[tuple[str, str, Callable[[], bytes]]]:
    svs = sources[TIFF_SOURCES[0]].data
    ome = sources[TIFF_SOURCES[1]]
    big = sources["@bigtiff"]

    def patch(src: Source, code: int, field_: str, value: int, index: int = 0) -> bytes:
        lay = src.tiff
        assert lay is not None
        e = next(e for e in lay.entries if e.code == code)
        buf = bytearray(src.data)
        if field_ == "type":
            _put_uint(buf, e.pos + 2, value, 2, _bo(lay))
        elif field_ == "count":
            _put_uint(buf, e.pos + 4, value, 8 if lay.bigtiff else 4, _bo(lay))
        else:
            size = {3: 2, 4: 4, 16: 8}[e.dtype]
            _put_uint(buf, e.value_at + size * index, value, size, _bo(lay))
        return bytes(buf)

    def stripped(height: int, width: int) -> bytes:
        return _bigtiff([
            (256, 4, width), (257, 4, height), (258, 3, [8, 8, 8]), (259, 3, 1), (262, 3, 2),
            (273, 16, [0]), (277, 3, 3), (278, 4, height), (279, 16, [0]),
        ])  # fmt: skip

    def tiny() -> bytes:
        import io

        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, np.full((1, 1, 3), 200, np.uint8), photometric="rgb")
        return buf.getvalue()

    svs_src = sources[TIFF_SOURCES[0]]
    dcm = sources[DICOM_SOURCES[0]].data
    rows = _find_element(dcm, 0x0028, 0x0010, "US", sources[DICOM_SOURCES[0]].dicom_pixels)
    dcm_rows0 = dcm[: rows + 8] + b"\0\0" + dcm[rows + 10 :]
    return [
        ("head-c-4", ".svs", lambda: svs[:4]),
        ("tiff-header-only", ".tif", lambda: b"II*\x00\x08\x00\x00\x00"),
        ("ifd-at-zero", ".tif", lambda: b"II*\x00\x00\x00\x00\x00" + b"\0" * 64),
        ("svs-width-0", ".svs", lambda: patch(svs_src, 256, "value", 0)),
        ("svs-width-double", ".svs", lambda: patch(svs_src, 256, "type", 12)),
        ("svs-tileoffsets-count-16", ".svs", lambda: patch(svs_src, 324, "count", 16)),
        ("svs-tileoffset-65-is-1", ".svs", lambda: patch(svs_src, 324, "value", 1, 65)),
        ("svs-tile-1px", ".svs", lambda: patch(patch_src(svs_src, 322, 1), 323, "value", 1)),
        ("ome-width-2^31-1", ".ome.tif", lambda: patch(ome, 256, "value", 2**31 - 1)),
        ("ome-height-2^31-1", ".ome.tif", lambda: patch(ome, 257, "value", 2**31 - 1)),
        ("bigtiff-offset-2^63", ".tif", lambda: patch(big, 324, "value", 2**63, 3)),
        ("bigtiff-offset-2^64-1", ".tif", lambda: patch(big, 324, "value", 2**64 - 1)),
        ("bigtiff-count-2^63", ".tif", lambda: patch(big, 325, "value", 2**63, 1)),
        ("sparse-10^6-px", ".tif", lambda: _sparse_tiff(10**6, 10**6, 1024)),
        ("sparse-2^31-px", ".tif", lambda: _sparse_tiff(2**31 - 1, 2**31 - 1, 1024, 16)),
        ("sparse-2^20+1-px", ".tif", lambda: _sparse_tiff(2**20 + 1, 4096, 1024)),
        ("sparse-tile-65536", ".tif", lambda: _sparse_tiff(70000, 70000, 65536)),
        ("one-strip-60000-px", ".tif", lambda: stripped(60000, 60000)),
        ("tiny-1px", ".tif", tiny),
        ("dicom-rows-0", ".dcm", lambda: dcm_rows0),
        ("dicom-preamble-only", ".dcm", lambda: b"\0" * 128 + b"DICM"),
        ("dicom-header-cut", ".dcm", lambda: dcm[:300]),
    ]


def patch_src(src: Source, code: int, value: int) -> Source:
    """``src`` with the first ``code`` entry's inline value set (layout unchanged)."""
    lay = src.tiff
    assert lay is not None
    e = next(e for e in lay.entries if e.code == code)
    buf = bytearray(src.data)
    _put_uint(buf, e.value_at, value, {3: 2, 4: 4, 16: 8}[e.dtype], _bo(lay))
    return Source(src.name, bytes(buf), src.kind, tiff=lay)


MUTATIONS: dict[str, tuple[Callable[[Rng, Source], bytes], str]] = {
    "truncate": (m_truncate, "any"),
    "flip_header": (m_flip_header, "any"),
    "flip_data": (m_flip_data, "any"),
    "tag_value": (m_tag_value, "tiff"),
    "tag_type": (m_tag_type, "tiff"),
    "tag_count": (m_tag_count, "tiff"),
    "ifd_pointer": (m_ifd_pointer, "tiff"),
    "ifd_entry_count": (m_ifd_entry_count, "tiff"),
    "offset_table": (m_offset_table, "tiff"),
    "dicom_element": (m_dicom_element, "dicom"),
    "dicom_frames": (m_dicom_frames, "dicom"),
}
CLASSES = (*MUTATIONS, "handmade")


def case_file(index: int, seed: int, sources: dict[str, Source]) -> tuple[str, str, str, bytes]:
    """``(class, source, suffix, bytes)`` of case ``index``: the same in every process."""
    rng = np.random.default_rng([seed, index])
    cls = CLASSES[index % len(CLASSES)]
    if cls == "handmade":
        made = _handmade(sources)
        name, suffix, make = made[(index // len(CLASSES)) % len(made)]
        return cls, name, suffix, make()
    fn, kind = MUTATIONS[cls]
    names = [n for n, s in sources.items() if kind in ("any", s.kind)]
    src = sources[_pick(rng, names)]
    suffix = ".dcm" if src.kind == "dicom" else Path(src.name.lstrip("@")).suffix or ".tif"
    return cls, src.name, suffix, fn(rng, src)


# --- running a case -----------------------------------------------------------------------------
def _read_everything(slide: Any, rng: Rng) -> None:
    """Read a few regions of every level (direct and through dask) and the associated images."""
    from histolens.region import Region

    for k, (h, w) in enumerate(slide.level_shapes):
        f = slide.downsamples[k]
        size = max(1, min(256, int(READ_SPAN // f)))
        corners = [(0, 0), (max(0, h - size), max(0, w - size))]
        corners.append(
            (int(rng.integers(0, max(1, h - size))), int(rng.integers(0, max(1, w - size))))
        )
        for y, x in corners:
            box = Region(int(y * f), int(x * f), int((y + size) * f), int((x + size) * f))
            slide.read_region(box, level=k)
        # Through dask too (as napari reads), where one chunk spans a bounded level-0 area:
        # a chunk of a derived level of a 10^6 px slide covers the whole slide.
        if max(slide.levels[k].chunksize[:2]) * f <= 2 * READ_SPAN:
            y, x = corners[-1]
            np.asarray(slide.levels[k][y : y + size, x : x + size])
    for key in list(slide.associated):
        slide.associated[key]
    slide.facts()


def run_case(path: Path, rng: Rng) -> dict[str, Any]:
    """Open and read ``path``; the outcome as a small dict (``ok``, ``slide_error`` or bad)."""
    import warnings

    from histolens.slide import SlideError, open_slide

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slide = open_slide(path)
            try:
                _read_everything(slide, rng)
            finally:
                slide.close()
        return {"outcome": "ok"}
    except SlideError as exc:
        text = str(exc)
        if str(path) not in text:
            return {"outcome": "bad:SlideError-without-path", "message": text[:400]}
        kind = "slide_error_net" if "cannot be read as a slide (" in text else "slide_error"
        return {"outcome": kind, "message": text[:300]}
    except BaseException as exc:  # noqa: BLE001 - every other outcome is what we look for
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return {
            "outcome": f"bad:{type(exc).__name__}",
            "message": str(exc)[:400],
            "where": "".join(tb[-3:])[-800:],
        }


def worker(seed: int) -> None:
    """Run the case indices read from stdin (one JSON list); print one JSON line per case."""
    import dask

    dask.config.set(scheduler="synchronous")
    cases = json.loads(sys.stdin.readline())
    tmp = Path(tempfile.mkdtemp(prefix="slide-fuzz-"))
    sources = load_sources(Path(os.environ["SLIDE_FUZZ_CACHE"]))
    for index in cases:
        print(json.dumps({"start": index}), flush=True)
        cls, source, suffix, data = case_file(index, seed, sources)
        path = tmp / f"case-{index}{suffix}"
        path.write_bytes(data)
        t0 = time.perf_counter()
        result = run_case(path, np.random.default_rng([seed, index, 1]))
        path.unlink()
        result.update(index=index, cls=cls, source=source, seconds=time.perf_counter() - t0)
        print(json.dumps(result), flush=True)
    os.rmdir(tmp)


def _limit_memory(cap: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return apply


def _run_worker(
    cases: list[int], seed: int, cache: Path, cap: int, timeout: float
) -> Iterator[dict]:
    """Yield results of ``cases`` from one worker; stop at the first hang or crash (yielded)."""
    env = dict(os.environ, SLIDE_FUZZ_CACHE=str(cache), MALLOC_ARENA_MAX="2",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--seed", str(seed)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, preexec_fn=_limit_memory(cap), text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(cases) + "\n")
    proc.stdin.close()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    current, deadline = None, time.monotonic() + timeout + 30.0  # imports and source loading
    try:
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                yield {"index": current, "outcome": "bad:hang", "message": f"> {timeout} s"}
                return
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                if current is not None:
                    err = (proc.stderr.read() if proc.stderr else "")[-600:]
                    yield {"index": current, "outcome": f"bad:crash(exit {code})", "message": err}
                return
            msg = json.loads(line)
            if "start" in msg:
                current, deadline = msg["start"], time.monotonic() + timeout
                continue
            current = None
            yield msg
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_fuzz(
    n_cases: int, seed: int = 0, *, start: int = 0, workers: int = 1, cap: int = MEMORY_CAP,
    timeout: float = TIMEOUT_S, cache: Path | None = None, classes: tuple[str, ...] = CLASSES,
) -> list[dict]:  # fmt: skip
    """Run ``n_cases`` cases from ``start`` on, of ``classes`` only; one result dict per case.

    Case ``i`` is of class ``CLASSES[i % len(CLASSES)]`` whatever ``classes`` holds, so a
    filtered run repeats exactly the cases of those classes in an unfiltered one.
    """
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown mutation classes {unknown}; choose among {list(CLASSES)}")
    cache = cache or Path(tempfile.gettempdir()) / "histolens-slide-fuzz-cache"
    cache.mkdir(exist_ok=True)
    wanted = itertools.count(start)
    todo = list(itertools.islice((i for i in wanted if CLASSES[i % len(CLASSES)] in classes),
                                 n_cases))  # fmt: skip
    chunks = [todo[i::workers] for i in range(workers)]
    results: dict[int, dict] = {}
    from concurrent.futures import ThreadPoolExecutor

    def drive(pending: list[int]) -> None:
        while pending:
            for res in _run_worker(pending, seed, cache, cap, timeout):
                index = res["index"]
                if index is None:  # the worker died before its first case
                    res["index"] = index = pending[0]
                res.setdefault("cls", CLASSES[index % len(CLASSES)])
                results[index] = res
                pending = [i for i in pending if i != index]
                if res["outcome"].startswith(("bad:hang", "bad:crash")):
                    break

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(drive, chunks))
    return [results[i] for i in todo]


def summarize(results: list[dict]) -> str:
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        table[r["cls"]][r["outcome"]] += 1
    kinds = ["ok", "slide_error", "slide_error_net"]
    bad = sorted({o for c in table.values() for o in c if o.startswith("bad")})
    head = f"{'class':<16} {'cases':>6} " + " ".join(f"{k:>15}" for k in kinds + bad)
    lines = [head]
    for cls in CLASSES:
        c = table.get(cls, collections.Counter())
        row = f"{cls:<16} {sum(c.values()):>6} " + " ".join(f"{c[k]:>15}" for k in kinds + bad)
        lines.append(row)
    total = collections.Counter()
    for c in table.values():
        total.update(c)
    lines.append(
        f"{'total':<16} {sum(total.values()):>6} "
        + " ".join(f"{total[k]:>15}" for k in kinds + bad)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument(
        "--classes", default=",".join(CLASSES),
        help="comma-separated mutation classes to run (e.g. dicom_element,dicom_frames)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)
    parser.add_argument("--memory-gb", type=float, default=MEMORY_CAP / 2**30)
    parser.add_argument("--keep", type=Path, help="write the files of bad cases here")
    parser.add_argument("--replay", type=int, help="run one case in this process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seed)
        return 0
    cache = Path(tempfile.gettempdir()) / "histolens-slide-fuzz-cache"
    cache.mkdir(exist_ok=True)
    if args.replay is not None:
        sys.path.insert(0, str(REPO / "src"))  # this worktree's histolens, as the workers use
        sources = load_sources(cache)
        cls, source, suffix, data = case_file(args.replay, args.seed, sources)
        path = Path(tempfile.mkdtemp()) / f"case-{args.replay}{suffix}"
        path.write_bytes(data)
        print(cls, source, path, run_case(path, np.random.default_rng([args.seed, args.replay, 1])))
        return 0
    t0 = time.perf_counter()
    results = run_fuzz(
        args.cases, args.seed, start=args.start, workers=args.workers,
        cap=int(args.memory_gb * 2**30), timeout=args.timeout, cache=cache,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    print(summarize(results))
    bad = [r for r in results if r["outcome"].startswith("bad")]
    print(f"\n{len(results)} cases in {elapsed:.1f} s (seed {args.seed}), {len(bad)} bad")
    for r in bad[:40]:
        print(f"  case {r['index']} {r.get('cls')} {r.get('source')}: {r['outcome']} "
              f"{r.get('message', '')[:200]!r}\n    {r.get('where', '')[-300:]!r}")  # fmt: skip
    net = [r for r in results if r["outcome"] == "slide_error_net"]
    for r in net[:10]:  # allowed, but each is a check a backend could make itself
        print(f"  net: case {r['index']} {r['cls']} {r.get('source')}: {r['message'][:240]!r}")
    if args.keep and bad:
        args.keep.mkdir(parents=True, exist_ok=True)
        sources = load_sources(cache)
        for r in bad:
            _, _, suffix, data = case_file(r["index"], args.seed, sources)
            (args.keep / f"case-{r['index']}{suffix}").write_bytes(data)
    slow = sorted(results, key=lambda r: -r.get("seconds", 0))[:3]
    print("slowest:", [(r["index"], r.get("cls"), round(r.get("seconds", 0), 2)) for r in slow])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
