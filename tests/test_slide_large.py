"""A synthetic 65,536 x 65,536 px JPEG pyramid: lazy open, exact pixels, bounded memory."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from histolens.region import Region
from histolens.slide import SyntheticPyramid, open_slide, write_synthetic_pyramid

SIZE = 65536


@pytest.fixture(scope="session")
def big_pyramid(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPyramid:
    path = tmp_path_factory.mktemp("big") / "big.tif"
    return write_synthetic_pyramid(path, SIZE, tile=512, mpp=0.25)


def test_big_file_is_really_big(big_pyramid: SyntheticPyramid) -> None:
    assert big_pyramid.level_shapes[0] == (SIZE, SIZE)
    assert big_pyramid.level_shapes[-1] == (512, 512)
    # Compressed tiles only: the file is far smaller than the 12.9 GB of raw pixels.
    assert Path(big_pyramid.path).stat().st_size < 600e6


def test_open_is_lazy_and_fast(big_pyramid: SyntheticPyramid) -> None:
    t0 = time.perf_counter()
    slide = open_slide(big_pyramid.path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # generous sanity bound; timings live in benchmarks/slide_read.py
    assert slide.shape == (SIZE, SIZE)
    assert slide.level_shapes == big_pyramid.level_shapes
    assert slide.downsamples == tuple(float(2**k) for k in range(len(slide.levels)))
    assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "tiff-resolution"
    assert slide.tile_shape == (512, 512)  # chunks are the native tiles


@pytest.mark.parametrize("level", [0, 3, 7])
def test_regions_are_exact_at_several_levels(big_pyramid: SyntheticPyramid, level: int) -> None:
    slide = open_slide(big_pyramid.path)
    f = int(slide.downsamples[level])
    region = Region(40_000 // f * f + 37 * f, 12_345 // f * f, 40_000 + 700 * f, 12_345 + 300 * f)
    y0, x0, y1, x1 = region.at_downsample(f)
    y1, x1 = min(y1, slide.level_shapes[level][0]), min(x1, slide.level_shapes[level][1])
    got = slide.read_region(region, level=level)[: y1 - y0, : x1 - x0]
    np.testing.assert_array_equal(got, big_pyramid.expected(level, y0, x0, y1, x1))


def test_2048_read_touches_only_its_tiles(big_pyramid: SyntheticPyramid) -> None:
    slide = open_slide(big_pyramid.path)
    region = Region(30_000, 50_001, 32_048, 52_049)  # not tile-aligned: 5 x 5 tiles
    slide.read_region(Region(0, 0, 16, 16))  # warm up imports and caches
    tracemalloc.start()
    try:
        got = slide.read_region(region)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.shape == (2048, 2048, 3)
    # The result is 12.6 MB; decoding 25 tiles of 0.75 MB adds little. A level-wide read
    # would need 12.9 GB.
    assert peak < 300e6, f"peak {peak / 1e6:.0f} MB"
    np.testing.assert_array_equal(got, big_pyramid.expected(0, *region.as_tuple()))
