"""The optional OpenSlide backend, exercised on the SVS (the tifffile path reads it by default)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histolens.region import Region
from histolens.slide import Slide
from histolens.slide._openslide import import_openslide, open_openslide


def test_openslide_backend_matches_tifffile(wsi_dir: Path) -> None:
    pytest.importorskip("openslide")
    path = wsi_dir / "CMU-1-Small-Region.svs"
    parts = open_openslide(path)
    closers = parts.pop("closers")
    slide = Slide(**parts, path=path, name="os", _closers=closers)
    try:
        assert slide.vendor == "openslide:aperio"
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "openslide"
        assert slide.shape == (2967, 2220) and slide.tile_shape == (240, 240)
        assert {"thumbnail", "label", "macro"} <= set(slide.associated)
        full = tifffile.imread(path)
        got = slide.read_region(Region(333, 517, 1700, 2001))
        # Same JPEG tiles, two libjpeg builds: equal up to decoder rounding.
        diff = np.abs(got.astype(int) - full[333:1700, 517:2001])
        assert diff.max() <= 2 and diff.mean() < 0.05
    finally:
        slide.close()


def test_missing_openslide_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install napari-histolens\[openslide\]"):
        import_openslide()
