"""Find the :class:`~histolens.slide.Slide` behind a napari image layer.

Layers opened by the HistoLens reader carry the slide (or at least its path) in
``layer.metadata["histolens"]``; any other image layer becomes an in-memory slide whose
mpp is the layer's scale when the layer is calibrated (``scale != 1``), else unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["slide_for_layer"]


def _is_slide(obj: Any) -> bool:
    return hasattr(obj, "read_region") and hasattr(obj, "levels") and hasattr(obj, "downsamples")


def _from_metadata(metadata: Mapping[str, Any]) -> Any | None:
    # The reader's convention may put the Slide itself, or its facts() with a path, under
    # "histolens"; accept both, plus a top-level "slide" object.
    candidates: list[Any] = [metadata.get("slide"), metadata.get("histolens")]
    hl = metadata.get("histolens")
    if isinstance(hl, Mapping):
        candidates.extend([hl.get("slide"), hl.get("object")])
    for obj in candidates:
        if _is_slide(obj):
            return obj
    path = hl.get("path") if isinstance(hl, Mapping) else None
    if path:
        from histolens.slide import open_slide

        slide = open_slide(path)
        mpp = hl.get("mpp") if isinstance(hl, Mapping) else None
        if slide.mpp is None and mpp:
            slide = slide.with_mpp(float(mpp))
        return slide
    return None


def slide_for_layer(layer: Any) -> Any:
    """The slide shown by ``layer`` (a napari Image layer, multiscale or not)."""
    found = _from_metadata(layer.metadata or {})
    if found is not None:
        return found
    from histolens.slide import Slide

    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    sy, sx = (float(v) for v in tuple(layer.scale)[-2:])
    # An uncalibrated layer has scale 1 (one world unit per pixel): its mpp is unknown,
    # and the dock asks for the override instead of guessing.
    mpp = sy if (sy == sx and sy != 1.0 and sy > 0) else None
    return Slide.from_array(data, mpp=mpp, name=layer.name)
