"""Put a result's LayerDataTuples on the viewer, updating HistoLens layers in place.

Runs on the main thread only (it touches layers). Re-analysing replaces the data, scale,
translate and features of the layers named ``"nuclei"``, ``"tile classes"`` and
``"attention sN"`` rather than stacking new layers, and leaves the user's display choices
(opacity, visibility, blending) alone. No Qt import: testable on a ``ViewerModel``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._viewport import LayerFrame, rebase_transform

__all__ = ["OVERLAY_TAG", "is_overlay", "overlay_group", "update_overlays"]

#: ``layer.metadata`` key that marks a layer as a HistoLens overlay; its value is the
#: overlay's name in the result (``"nuclei"``, ...), even if napari had to rename the layer.
OVERLAY_TAG = "histolens_overlay"

# Properties that describe *what* the data is (so they follow a re-analysis); display
# choices the user may have changed (opacity, visible, blending) are left as they are.
_FOLLOW = ("features", "colormap", "contrast_limits", "units")


def is_overlay(layer: Any) -> bool:
    """True for layers this dock created (they are never offered as the slide layer)."""
    return bool(getattr(layer, "metadata", {}).get(OVERLAY_TAG))


def _find(viewer: Any, name: str, layer_type: str) -> Any | None:
    for layer in viewer.layers:
        if layer.metadata.get(OVERLAY_TAG) == name and layer._type_string == layer_type:
            return layer
    return None


def overlay_group(name: str) -> str:
    """The opacity group of an overlay name: ``nuclei``, ``tile classes`` or ``attention``."""
    return "attention" if name.startswith("attention") else name


def update_overlays(
    viewer: Any,
    layer_data: Iterable[Sequence[Any]],
    *,
    mpp: float,
    frame: LayerFrame,
    opacity: Mapping[str, float] | None = None,
    prune: bool = False,
) -> list[Any]:
    """Create or update one layer per ``(data, meta, layer_type)`` tuple; return the layers.

    ``mpp`` is the level-0 um/px the tuples' ``scale``/``translate`` were computed with;
    they are rebased onto the slide layer's ``frame`` so overlays sit on the pixels they were
    computed from even when the slide layer is not shown at ``scale=(mpp, mpp)``.
    ``opacity`` (by :func:`overlay_group`) applies to layers created here. With ``prune``,
    HistoLens layers absent from ``layer_data`` (a task switched off) are removed so no stale
    overlay stays on screen.
    """
    from napari.layers import Layer

    items = list(layer_data)
    has_primary = any(not str(m["name"]).startswith("attention") for _, m, _ in items)
    touched: list[Any] = []
    for data, meta, layer_type in items:
        meta = dict(meta)
        name = str(meta["name"])
        scale, translate = rebase_transform(
            meta.get("scale", (mpp, mpp)), meta.get("translate", (0.0, 0.0)), mpp, frame
        )
        if (tuple(scale), tuple(translate)) != (
            tuple(meta.get("scale", ())),
            tuple(meta.get("translate", ())),
        ):
            meta.pop("units", None)  # the slide layer is not in micrometres: follow its units
        meta["scale"], meta["translate"] = scale, translate
        metadata = {**dict(meta.get("metadata") or {}), OVERLAY_TAG: name}
        meta["metadata"] = metadata
        existing = _find(viewer, name, layer_type)
        if existing is not None:
            # Transform first, then data: the new data is never drawn at the old place.
            existing.scale = scale
            existing.translate = translate
            existing.data = data
            for key in _FOLLOW:
                if key in meta:
                    setattr(existing, key, meta[key])
            existing.metadata = {**dict(existing.metadata), **metadata}
            touched.append(existing)
            continue
        if name in viewer.layers:
            # A user layer holds the name: keep it, and name ours apart (found by the tag).
            meta["name"] = f"{name} (HistoLens)"
        if opacity is not None and overlay_group(name) in opacity:
            meta["opacity"] = float(opacity[overlay_group(name)])
        if name.startswith("attention") and (name != "attention s0" or has_primary):
            # Heat maps over nuclei and tile classes wash the slide out: they start hidden
            # (one click on the eye in the layer list); alone, the finest scale is shown.
            meta["visible"] = False
        layer = Layer.create(data, meta, layer_type)
        viewer.add_layer(layer)
        touched.append(layer)
    if prune:
        keep = {id(layer) for layer in touched}
        for layer in [lyr for lyr in viewer.layers if is_overlay(lyr) and id(lyr) not in keep]:
            viewer.layers.remove(layer)
    return touched
