"""The sample slide shipped inside the package (OpenSlide test data, see ``_data/CREDITS.md``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["sample_slide_path"]

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    """Path of the bundled ``CMU-1-Small-Region.svs`` (Aperio, 2220 x 2967 px, 0.499 um/px)."""
    resource = files("histolens").joinpath("_data", SAMPLE_SLIDE)
    path = Path(str(resource))
    if not path.is_file():
        msg = (
            f"the sample slide {SAMPLE_SLIDE} is missing from the installed package ({path}); "
            "reinstall napari-histolens (`pip install --force-reinstall napari-histolens`)"
        )
        raise FileNotFoundError(msg)
    return path
