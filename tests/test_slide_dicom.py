"""The wsidicom path: the shared DICOM made standard-complete in tmp_path, read both ways."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from histolens.region import Region
from histolens.slide import open_slide

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("wsidicom")


@pytest.fixture(scope="module")
def complete_dicom(slide_fuzz, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_dicom.dcm`` plus the attributes wsidicom requires, and a 0.5 um pixel spacing
    (the fuzzer's copy, alone in its folder).

    The source labels its JPEG frames RGB although they are JFIF YCbCr; the copy says
    YBR_FULL_422 so that wsidicom's decoder converts colours as the frames require.
    """
    return slide_fuzz._complete_dicom(tmp_path_factory.mktemp("dicom"))


def test_wsidicom_reads_pixel_spacing_and_same_pixels(complete_dicom: Path, wsi_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the spacing is there: no mpp warning
        slide = open_slide(complete_dicom)
    assert slide.metadata["reader"] == "wsidicom"
    assert slide.shape == (2638, 3236)
    assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "dicom"  # 0.0005 mm
    assert slide.tile_shape == (500, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = open_slide(wsi_dir / "small_dicom.dcm")
    assert direct.metadata["reader"] == "histolens-frames"
    region = Region(700, 1200, 1300, 2100)
    for level in (0, 2):
        a = slide.read_region(region, level=level).astype(int)
        b = direct.read_region(region, level=level).astype(int)
        # Two JPEG decoders (Pillow's in wsidicom, imagecodecs' here): equal up to rounding.
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05


def test_folder_of_instances_opens_and_reader_claims_it(complete_dicom: Path) -> None:
    from histolens._reader import napari_get_reader

    folder = complete_dicom.parent
    slide = open_slide(folder)
    assert slide.shape == (2638, 3236) and slide.metadata["reader"] == "wsidicom"
    assert napari_get_reader(str(folder)) is not None
