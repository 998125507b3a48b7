"""Fuzz: seeded mutations of the shared slides open and read, or fail with a SlideError
naming the file; never another exception, a hang or unbounded memory.

The engine is ``benchmarks/slide_fuzz.py`` (cases run in memory-capped worker processes with
a per-case timeout). The default run covers every mutation class and every handmade file;
``-m slow`` runs thousands more.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from histolens.region import Region
from histolens.slide import SlideError, open_slide
from histolens.slide._read import DIRECT_READ_ATTR


def _check(slide_fuzz: ModuleType, results: list[dict]) -> None:
    bad = [r for r in results if r["outcome"].startswith("bad")]
    assert not bad, slide_fuzz.summarize(results) + "\n" + "\n".join(map(str, bad[:10]))
    outcomes = {r["outcome"] for r in results}
    # Both allowed outcomes occur: the mutations are neither all harmless nor all fatal.
    assert {"ok", "slide_error"} <= outcomes


def test_fuzz_default_run(slide_fuzz: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> None:
    # One full round of the handmade files: every class gets as many cases.
    n = len(slide_fuzz.CLASSES) * len(
        slide_fuzz._handmade(slide_fuzz.load_sources(tmp_path_factory.mktemp("c")))
    )
    results = slide_fuzz.run_fuzz(n, seed=0, cache=tmp_path_factory.mktemp("cache"))
    assert {r["cls"] for r in results} == set(slide_fuzz.CLASSES)
    _check(slide_fuzz, results)


@pytest.mark.slow
def test_fuzz_thousands(slide_fuzz: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> None:
    results = slide_fuzz.run_fuzz(3000, seed=1, workers=2, cache=tmp_path_factory.mktemp("cache"))
    _check(slide_fuzz, results)


def _handmade_file(slide_fuzz: ModuleType, name: str, tmp_path: Path) -> Path:
    sources = slide_fuzz.load_sources(tmp_path)
    _, suffix, make = next(m for m in slide_fuzz._handmade(sources) if m[0] == name)
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(make())
    return path


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("head-c-4", "cannot parse it as TIFF"),
        ("svs-width-0", "declares 0 x 2967 pixels"),
        ("svs-width-double", "ImageWidth tag has TIFF data type 12"),
        ("svs-tileoffsets-count-16", "needs 130 tiles/strips but its tables list 16 offsets"),
        ("bigtiff-offset-2^63", r"negative or >= 2\*\*63"),
        ("ome-width-2^31-1", "2147483647 x 1101 pixels; a slide level must be 1 to 1,048,576"),
        ("sparse-tile-65536", "65536 x 65536 pixels; they must be at least 1 pixel and at most"),
        ("one-strip-60000-px", "at most 256 MB decoded"),
        ("dicom-rows-0", "declares tiles"),
    ],
)
def test_damaged_files_are_refused_at_open_with_the_cause(
    slide_fuzz: ModuleType, tmp_path: Path, name: str, match: str
) -> None:
    path = _handmade_file(slide_fuzz, name, tmp_path)
    with pytest.raises(SlideError, match=match) as info:
        open_slide(path)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_a_bad_tile_fails_at_read_time_naming_file_and_tile(
    slide_fuzz: ModuleType, tmp_path: Path
) -> None:
    path = _handmade_file(slide_fuzz, "svs-tileoffset-65-is-1", tmp_path)  # tile 65 -> byte 1
    slide = open_slide(path)  # only the tables and one tile are checked at open
    good = slide.read_region(Region(0, 0, 240, 240))
    assert good.shape == (240, 240, 3)
    where = "tile row 6, column 5, at byte 1"  # 10 tiles per row: tile 65 is row 6, column 5
    with pytest.raises(SlideError, match=where) as info:
        slide.read_region(Region(1400, 1100, 1700, 1500))  # direct (zarr) path
    assert str(path) in str(info.value) and "Jpeg8Error" in str(info.value)
    with pytest.raises(SlideError, match=where):
        slide.levels[0][1440:1680, 1200:1440].compute()  # dask path, as napari reads
    with pytest.raises(SlideError, match=where):
        slide.read_region(Region(1400, 1100, 1700, 1500), level=2)  # a derived level


def test_dicom_without_matrix_size_names_the_element(wsi_dir: Path, tmp_path: Path) -> None:
    data = (wsi_dir / "small_dicom.dcm").read_bytes()
    pos = data.find(b"\x48\x00\x06\x00UL\x04\x00")  # (0048,0006) TotalPixelMatrixColumns
    path = tmp_path / "no-columns.dcm"
    path.write_bytes(data[:pos] + data[pos + 12 :])
    with pytest.raises(SlideError, match="lacks the TotalPixelMatrixColumns element"):
        open_slide(path)


def test_huge_single_level_tiff_opens_lazily(slide_fuzz: ModuleType, tmp_path: Path) -> None:
    """100k x 200k px, 256 px tiles (all absent): derived levels are views, not graphs."""
    path = tmp_path / "huge.tif"
    path.write_bytes(slide_fuzz._sparse_tiff(100_000, 200_000, 256))
    with pytest.warns(UserWarning, match="no pixel size"):
        slide = open_slide(path)
    assert slide.shape == (100_000, 200_000) and slide.level_count == 10
    for level in slide.levels[1:]:
        assert getattr(level, DIRECT_READ_ATTR, None) is not None
        assert len(level.dask.layers) == 1  # no rechunk/coarsen layers over every chunk
    box = Region(51_000, 99_000, 53_048, 101_048)
    for k in (0, 3, 9):
        # Absent tiles read as tifffile's fill value 0, at every level and through dask.
        assert not slide.read_region(box, level=k).any()
    assert not np.asarray(slide.levels[3][100:300, 200:400]).any()


def test_default_model_on_a_damaged_real_slide(
    slide_fuzz: ModuleType, tmp_path: Path, default_model
) -> None:
    """The real default model: a region away from the bad tile is analysed; a region over it
    fails with the SlideError naming the file and tile, not an error deep in inference."""
    torch = pytest.importorskip("torch")
    from histolens.inference import analyze_region

    torch.set_num_threads(1)
    path = _handmade_file(slide_fuzz, "svs-tileoffset-65-is-1", tmp_path)  # tile row 6, column 5
    slide = open_slide(path)
    model = default_model
    result = analyze_region(slide, Region(0, 0, 384, 384), model=model, cache=False)
    assert result.nuclei.labels.max() > 0  # tissue with nuclei in the undamaged corner
    with pytest.raises(SlideError, match="tile row 6, column 5") as info:
        analyze_region(slide, Region(1500, 1250, 1628, 1378), model=model, cache=False)
    assert str(path) in str(info.value)
