"""open_slide on the real files in ../shared/data/wsi, in-memory slides, and bad input."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histolens.region import Region
from histolens.slide import Slide, SlideError, open_slide, sample_slide_path
from histolens.slide._read import DIRECT_READ_ATTR

SVS = "CMU-1-Small-Region.svs"
OME = "OS-1-detail.ome.tif"
PYRAMID = "derived/CMU-1-Small-Region.pyramid.ome.tif"
DICOM = "small_dicom.dcm"


def _open(path: Path, **kw) -> Slide:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated files must not warn
        return open_slide(path, **kw)


@pytest.fixture(scope="module")
def svs(wsi_dir: Path) -> Slide:
    return _open(wsi_dir / SVS)


def test_svs_facts(svs: Slide) -> None:
    assert svs.mpp == pytest.approx(0.499)
    assert svs.mpp_source == "aperio"
    assert svs.vendor == "aperio"
    assert svs.shape == (2967, 2220)
    assert svs.tile_shape == (240, 240)
    assert svs.metadata["aperio.AppMag"] == "20"
    assert svs.name == "CMU-1-Small-Region"


def test_svs_single_level_gets_lazy_coarser_levels(svs: Slide) -> None:
    assert svs.downsamples == (1.0, 2.0, 4.0, 8.0)
    assert svs.level_shapes == ((2967, 2220), (1483, 1110), (741, 555), (370, 277))
    assert max(svs.level_shapes[-1]) < 512
    for lvl in svs.levels:
        assert lvl.dtype == np.uint8 and lvl.shape[2] == 3
        # Chunks stay the native 240 px tiles, so napari loads small pieces at every level.
        assert lvl.chunksize[:2] == (240, 240)


def _reference_halvings(level0: np.ndarray, n: int) -> list[np.ndarray]:
    out = [level0]
    for _ in range(n):
        a = out[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        m = a[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        out.append((m + 0.5).astype(np.uint8))
    return out


def test_svs_regions_equal_tifffile_at_every_level(svs: Slide, wsi_dir: Path) -> None:
    full = tifffile.imread(wsi_dir / SVS)
    refs = _reference_halvings(full, 3)
    region = Region(333, 517, 1700, 2001)  # not tile-aligned, crosses many tiles
    for level, ref in enumerate(refs):
        f = int(svs.downsamples[level])
        y0, x0, y1, x1 = region.at_downsample(f)
        got = svs.read_region(region, level=level)
        np.testing.assert_array_equal(got, ref[y0:y1, x0:x1], err_msg=f"level {level}")


def test_derived_levels_close_to_the_shared_pyramid(svs: Slide, wsi_dir: Path) -> None:
    # The shared pyramid was built by the same halving, then JPEG re-encoded (q90): close, not
    # equal. A one-pixel shift costs ~4x more error, so this also checks the alignment.
    other = _open(wsi_dir / PYRAMID)
    for level in (1, 3):
        a = np.asarray(svs.levels[level]).astype(int)
        b = np.asarray(other.levels[level]).astype(int)
        assert a.shape == b.shape
        aligned = np.abs(a - b).mean()
        shifted = np.abs(a[1:, 1:] - b[:-1, :-1]).mean()
        assert aligned < 4.0 and shifted > 2 * aligned


def test_ome_tiff(wsi_dir: Path) -> None:
    slide = _open(wsi_dir / OME)
    assert slide.mpp == pytest.approx(0.227, abs=5e-4)
    assert slide.mpp_source == "ome"
    assert slide.shape == (1101, 1101)
    full = tifffile.imread(wsi_dir / OME)
    region = Region(100, 450, 1101, 1000)
    np.testing.assert_array_equal(slide.read_region(region), full[100:1101, 450:1000])


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_subifd_pyramid_levels_equal_tifffile(wsi_dir: Path, level: int) -> None:
    slide = _open(wsi_dir / PYRAMID)
    assert slide.downsamples == (1.0, 2.0, 4.0, 8.0)
    assert slide.mpp == pytest.approx(0.499)
    ref = tifffile.imread(wsi_dir / PYRAMID, level=level)
    assert slide.level_shapes[level] == ref.shape[:2]
    region = Region(250, 130, 2900, 2100)
    y0, x0, y1, x1 = region.at_downsample(2**level)
    np.testing.assert_array_equal(slide.read_region(region, level=level), ref[y0:y1, x0:x1])


def test_dicom_full_size_and_pixels(wsi_dir: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    with pytest.warns(UserWarning, match="no pixel size"):
        slide = open_slide(wsi_dir / DICOM)
    assert slide.vendor == "dicom"
    # TotalPixelMatrixColumns 3236 is the width, TotalPixelMatrixRows 2638 the height.
    assert slide.shape == (2638, 3236)
    assert slide.mpp is None and slide.mpp_source == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom notes the JFIF/RGB photometric mismatch
        frames = pydicom.dcmread(wsi_dir / DICOM).pixel_array  # (42, 500, 500, 3) TILED_FULL
    across = 7  # ceil(3236 / 500) tiles per row
    # Level-0 box (700, 1200)-(1300, 2100) spans tile rows 1..2 and columns 2..4.
    mosaic = np.concatenate(
        [np.concatenate([frames[r * across + c] for c in range(2, 5)], axis=1) for r in (1, 2)]
    )
    got = slide.read_region(Region(700, 1200, 1300, 2100)).astype(int)
    # Same JPEG frames; pydicom decodes through Pillow's libjpeg, we through imagecodecs':
    # equal except for rare rounding (+-1) in the chroma upsampling.
    diff = np.abs(got - mosaic[200:800, 200:1100])
    assert diff.max() <= 1 and (diff == 0).mean() > 0.9999
    # The right-most partial tile column is cropped to the matrix width.
    edge = slide.read_region(Region(0, 3100, 500, 3236))
    assert np.abs(edge.astype(int) - frames[6][:, 100:236]).max() <= 1


def test_dicom_mpp_override(wsi_dir: Path) -> None:
    slide = _open(wsi_dir / DICOM, mpp=0.5)
    assert (slide.mpp, slide.mpp_source) == (0.5, "user")


def test_mpp_override_and_with_mpp(svs: Slide, wsi_dir: Path) -> None:
    assert _open(wsi_dir / SVS, mpp=0.25).mpp_source == "user"
    other = svs.with_mpp(0.3)
    assert (other.mpp, other.mpp_source, svs.mpp) == (0.3, "user", pytest.approx(0.499))
    assert other.levels is svs.levels
    with pytest.raises(ValueError, match="positive"):
        svs.with_mpp(-1)


def test_associated_images_are_lazy_rgb(svs: Slide) -> None:
    assert sorted(svs.associated) == ["label", "macro", "thumbnail"]
    thumb = svs.associated["thumbnail"]
    assert thumb.shape == (768, 574, 3) and thumb.dtype == np.uint8


def test_read_region_outside_is_filled_and_shape_is_stable(svs: Slide) -> None:
    out = svs.read_region(Region(2900, 2200, 3000, 2300))
    assert out.shape == (100, 100, 3)
    assert (out[67:] == 255).all() and (out[:, 20:] == 255).all()
    np.testing.assert_array_equal(out[:67, :20], np.asarray(svs.levels[0][2900:, 2200:]))
    with pytest.raises(IndexError, match="levels 0..3"):
        svs.read_region(Region(0, 0, 10, 10), level=4)


def test_pickle_reopens_from_path(svs: Slide) -> None:
    clone = pickle.loads(pickle.dumps(svs.with_mpp(0.42)))
    assert clone.path == svs.path and clone.mpp == 0.42 and clone.mpp_source == "user"
    np.testing.assert_array_equal(
        clone.read_region(Region(0, 0, 64, 64)), svs.read_region(Region(0, 0, 64, 64))
    )


def test_sample_slide_is_the_shared_svs(wsi_dir: Path) -> None:
    path = sample_slide_path()
    assert path.name == SVS and path.read_bytes() == (wsi_dir / SVS).read_bytes()


def test_from_array_pyramid_and_layouts() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (1100, 700, 3), dtype=np.uint8)
    slide = Slide.from_array(rgb, mpp=0.5, name="x")
    assert (slide.mpp, slide.mpp_source, slide.vendor) == (0.5, "user", "memory")
    assert slide.downsamples == (1.0, 2.0, 4.0)
    np.testing.assert_array_equal(slide.read_region(Region(3, 5, 900, 650)), rgb[3:900, 5:650])
    ref = _reference_halvings(rgb, 2)[2]
    np.testing.assert_array_equal(np.asarray(slide.levels[2]), ref)
    grey = Slide.from_array(rgb[..., 0])
    np.testing.assert_array_equal(np.asarray(grey.levels[0])[..., 2], rgb[..., 0])
    rgba = np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=-1)  # fully transparent
    assert (np.asarray(Slide.from_array(rgba).levels[0]) == 255).all()
    planar = Slide.from_array(np.moveaxis(rgb, -1, 0), axes="CYX")
    np.testing.assert_array_equal(np.asarray(planar.levels[0]), rgb)
    with pytest.raises(ValueError, match="colour samples"):
        Slide.from_array(np.zeros((10, 10, 5), np.uint8))


# --- bad input ---------------------------------------------------------------------------


def _assert_slide_error(path: Path, match: str) -> SlideError:
    with pytest.raises(SlideError, match=match) as info:
        open_slide(path)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)
    return info.value


def test_missing_path(tmp_path: Path) -> None:
    _assert_slide_error(tmp_path / "nope.svs", "no such file")


def test_plain_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    _assert_slide_error(tmp_path, "folder")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    _assert_slide_error(p, "empty")


def test_garbage_file(tmp_path: Path) -> None:
    p = tmp_path / "garbage.svs"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _assert_slide_error(p, "not a whole-slide image")


def test_text_file_named_tif(tmp_path: Path) -> None:
    p = tmp_path / "notes.tif"
    p.write_text("just some text, not an image\n" * 10)
    _assert_slide_error(p, "not a whole-slide image")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_svs(wsi_dir: Path, tmp_path: Path, keep: float) -> None:
    data = (wsi_dir / SVS).read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: int(len(data) * keep)])
    _assert_slide_error(p, "truncated|cannot parse|damaged")


def test_truncated_header(wsi_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "head.svs"
    p.write_bytes((wsi_dir / SVS).read_bytes()[:16])
    _assert_slide_error(p, "cannot parse|damaged|truncated")


def test_truncated_dicom(wsi_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "cut.dcm"
    p.write_bytes((wsi_dir / DICOM).read_bytes()[:700_000])
    _assert_slide_error(p, "damaged|past the file end|cannot")


def test_stack_tiff_is_not_a_slide(tmp_path: Path) -> None:
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, np.zeros((5, 64, 64), np.uint16))
    _assert_slide_error(p, "no 2-D RGB or grey image plane")


def test_unsupported_compression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate an imagecodecs build without the LZW codec, as tifffile's own tests do.
    p = tmp_path / "lzw.tif"
    tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), tile=(32, 32), compression="lzw")
    import imagecodecs

    def broken(*args, **kwargs):
        raise imagecodecs.DelayedImportError("imagecodecs.lzw_decode")

    monkeypatch.setattr(imagecodecs, "lzw_decode", broken)
    # tifffile caches decoders per compression code: give this test a private cache so the
    # broken codec neither comes from nor leaks into other tests' reads.
    decoders = tifffile.TIFF.DECOMPRESSORS
    monkeypatch.setattr(decoders, "_codecs", {1: decoders._codecs[1]})
    err = _assert_slide_error(p, "cannot be decoded")
    assert "imagecodecs" in err.fix


def test_missing_mpp_warns(tmp_path: Path) -> None:
    p = tmp_path / "nompp.tif"
    tifffile.imwrite(p, np.full((300, 300, 3), 200, np.uint8), tile=(64, 64), photometric="rgb")
    with pytest.warns(UserWarning, match="mpp"):
        slide = open_slide(p)
    assert slide.mpp is None and slide.mpp_source == "none"


def test_tiff_resolution_mpp(tmp_path: Path) -> None:
    p = tmp_path / "res.tif"
    tifffile.imwrite(
        p, np.zeros((64, 64, 3), np.uint8), photometric="rgb",
        resolution=(1e4 / 0.3, 1e4 / 0.3), resolutionunit="CENTIMETER",
    )  # fmt: skip
    slide = _open(p)
    assert slide.mpp == pytest.approx(0.3) and slide.mpp_source == "tiff-resolution"


def test_region_reads_of_plain_rgb_levels_bypass_dask_and_match_it(wsi_dir: Path) -> None:
    """The fast path (slicing the zarr store) gives exactly what the lazy dask level gives."""
    slide = open_slide(wsi_dir / "derived" / "CMU-1-Small-Region.pyramid.ome.tif")
    for level, arr in enumerate(slide.levels):
        assert getattr(arr, DIRECT_READ_ATTR, None) is not None
        f = slide.downsamples[level]
        box = Region(int(30 * f), int(20 * f), int(71 * f), int(53 * f))  # inside every level
        y0, x0, y1, x1 = box.at_downsample(f)
        np.testing.assert_array_equal(slide.read_region(box, level), arr[y0:y1, x0:x1].compute())
