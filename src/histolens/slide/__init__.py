"""Slides: ``open_slide(path) -> Slide``, a pyramid of lazy ``(Y, X, 3) uint8`` dask arrays.

Backends: tifffile (SVS, NDPI, OME-TIFF, SCN, BIF, Philips, generic tiled TIFF), DICOM WSI
(wsidicom, or a direct frame reader for single files), and optional OpenSlide (MRXS, VMS, ...).
Coordinates are level-0 pixels ``(y, x)``; ``Slide.mpp`` is micrometres per level-0 pixel.
"""

from __future__ import annotations

from ._open import SLIDE_SUFFIXES, open_slide
from ._sample import sample_slide_path
from ._slide import Slide, SlideError
from ._synthetic import SyntheticPyramid, write_synthetic_pyramid

__all__ = [
    "SLIDE_SUFFIXES",
    "Slide",
    "SlideError",
    "SyntheticPyramid",
    "open_slide",
    "sample_slide_path",
    "write_synthetic_pyramid",
]

# Public objects report their public home (histolens.slide.Slide in reprs, docs and pickles).
for _obj in (
    Slide,
    SlideError,
    SyntheticPyramid,
    open_slide,
    sample_slide_path,
    write_synthetic_pyramid,
):
    _obj.__module__ = __name__
del _obj
