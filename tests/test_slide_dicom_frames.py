"""The direct DICOM frame reader (pydicom's encapsulation parser): every offset-table layout
of the encapsulated pixel data, damage named at open or at read, and the real default model
on the real DICOM slide."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from histolens.region import Region
from histolens.slide import SlideError, open_slide

pydicom = pytest.importorskip("pydicom")
imagecodecs = pytest.importorskip("imagecodecs")

TILE = 64
ACROSS, DOWN = 3, 2  # a 3 x 2 grid of 64 px frames, each a different colour


def _tiles() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        np.clip(rng.normal(40 * k + 30, 5, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
        for k in range(ACROSS * DOWN)
    ]


def _write(dicom_open, path: Path, layout: str) -> tuple[Path, list[np.ndarray]]:
    """The real DICOM's header over synthetic frames, encapsulated as ``layout`` says (by the
    benchmark's writer); returns the path and the frames as a decoder gives them back."""
    encoded = [bytes(imagecodecs.jpeg8_encode(t, level=95)) for t in _tiles()]
    decoded = [np.asarray(imagecodecs.jpeg8_decode(e)) for e in encoded]
    dicom_open.write_frames(path, encoded, (DOWN, ACROSS), TILE, layout, width=ACROSS * TILE - 10)
    return path, decoded


def _open(path: Path):
    with pytest.warns(UserWarning, match="no pixel size"):
        return open_slide(path)


@pytest.mark.parametrize("layout", ["bot", "no-bot", "extended", "bot-2-fragments"])
def test_every_offset_table_layout_reads_the_frames_in_place(
    dicom_open, tmp_path: Path, layout: str
) -> None:
    path, frames = _write(dicom_open, tmp_path / f"{layout}.dcm", layout)
    slide = _open(path)
    assert slide.metadata["reader"] == "histolens-frames"
    assert slide.shape == (DOWN * TILE, ACROSS * TILE - 10)
    rows = [np.concatenate(frames[r * ACROSS : (r + 1) * ACROSS], axis=1) for r in range(DOWN)]
    mosaic = np.concatenate(rows)[:, : ACROSS * TILE - 10]
    np.testing.assert_array_equal(slide.read_region(Region(0, 0, *slide.shape)), mosaic)
    np.testing.assert_array_equal(
        slide.read_region(Region(50, 70, 100, 150)), mosaic[50:100, 70:150]
    )
    slide.close()


def _item_positions(data: bytes) -> list[int]:
    """File offsets of the item tags after the Basic Offset Table item."""
    start = data.find(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    pos = start + 8 + struct.unpack_from("<I", data, start + 4)[0]
    items = []
    while struct.unpack_from("<I", data, pos)[0] == 0xE000FFFE:
        items.append(pos)
        pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
    return items


@pytest.mark.parametrize(
    ("entry", "moved_to", "message"),
    [
        (1, "between items", "Basic Offset Table points between fragment items"),
        (0, "second item", "Basic Offset Table does not start at the first fragment"),
    ],
)
def test_a_bad_basic_offset_table_is_refused_at_open(
    dicom_open, tmp_path: Path, entry: int, moved_to: str, message: str
) -> None:
    path, _ = _write(dicom_open, tmp_path / "two.dcm", "bot-2-fragments")
    data = bytearray(path.read_bytes())
    bot = data.find(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12 + 8
    if moved_to == "between items":
        offset = struct.unpack_from("<I", data, bot + 4 * entry)[0] + 2
    else:  # a valid item, but not the first: frame 0 would lose its first fragment
        first_item = bot + 4 * len(_tiles())
        offset = 8 + struct.unpack_from("<I", data, first_item + 4)[0]
    struct.pack_into("<I", data, bot + 4 * entry, offset)
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=message) as e:
        open_slide(path)
    assert str(path) in str(e.value)


def test_a_damaged_frame_item_fails_at_read_naming_the_frame(dicom_open, tmp_path: Path) -> None:
    # With an Extended Offset Table nothing but the table is read at open: frame 4's broken
    # item tag shows when a read reaches it, as a SlideError naming the file and the frame.
    path, _ = _write(dicom_open, tmp_path / "ext.dcm", "extended")
    data = bytearray(path.read_bytes())
    item = _item_positions(bytes(data))[4]
    struct.pack_into("<I", data, item, 0x12345678)
    path.write_bytes(bytes(data))
    slide = _open(path)
    assert slide.read_region(Region(0, 0, TILE, TILE)).shape == (TILE, TILE, 3)
    with pytest.raises(SlideError, match=f"DICOM frame 4 at byte {item}") as e:
        slide.read_region(Region(TILE, TILE, 2 * TILE, 2 * TILE))  # frame row 1, column 1
    assert str(path) in str(e.value)


def test_truncated_frame_data_names_the_byte(dicom_open, tmp_path: Path) -> None:
    path, _ = _write(dicom_open, tmp_path / "cut.dcm", "no-bot")
    data = path.read_bytes()
    path.write_bytes(data[: _item_positions(data)[-1] + 20])
    with pytest.raises(SlideError, match="past the file end"):
        open_slide(path)


def test_default_model_on_the_real_dicom_slide(wsi_dir: Path, default_model) -> None:
    """The real default model analyses a region of the real DICOM through the frame reader."""
    from histolens.inference import analyze_region

    slide = open_slide(wsi_dir / "small_dicom.dcm", mpp=0.5)
    assert slide.metadata["reader"] == "histolens-frames"
    # 500 px frames: this box spans frames 16 and 17 (row 2, columns 2 and 3).
    region = Region(1200, 1436, 1328, 1564)
    result = analyze_region(slide, region, model=default_model, cache=False)
    assert result.nuclei is not None and result.tiles is not None
    assert result.tiles.classes.size > 0
