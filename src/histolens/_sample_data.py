"""napari sample data: the bundled ``CMU-1-Small-Region.svs`` (Aperio, H&E, 0.499 um/px)."""

from __future__ import annotations

from typing import Any

from .layers import slide_to_layer_data
from .slide import open_slide, sample_slide_path

__all__ = ["make_sample_slide"]


def make_sample_slide() -> list[tuple[Any, dict[str, Any], str]]:
    """The sample slide as one multiscale RGB layer in micrometres (same tuple as the reader)."""
    return [slide_to_layer_data(open_slide(sample_slide_path()))]
