"""Capture what is on screen, and map level-0 pixels to napari world coordinates.

This is the viewer boundary of the GUI: the camera is read once into a frozen
:class:`CameraState`, and everything after that is pure arithmetic delegated to
:func:`histolens.region.visible_region`. It deliberately does **not** use
``layer.corner_pixels``: since napari 0.9 that box is expanded to whole chunks and does
not shrink on zoom-in, so it is the region napari *loaded*, not the region on screen.

Frames: "world" is napari's world frame (micrometres when the slide layer has
``scale=(mpp, mpp)``); "level-0" is level-0 pixels of the slide, ``(y, x)``.
This module imports no Qt, so it is testable on a bare ``napari.components.ViewerModel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from histolens.region import Region, visible_region

__all__ = [
    "CameraState",
    "LayerFrame",
    "level0_to_world",
    "rebase_transform",
    "view_region",
]


@dataclass(frozen=True)
class CameraState:
    """A 2D camera snapshot: centre ``(y, x)`` in world units, zoom in screen px per world
    unit, canvas ``(height, width)`` in screen px."""

    center: tuple[float, float]
    zoom: float
    canvas_size: tuple[int, int]

    @classmethod
    def from_viewer(cls, viewer: Any) -> CameraState:
        """Read ``viewer.scene.camera`` and ``viewer.canvas.size`` (napari >= 0.9)."""
        scene = getattr(viewer, "scene", None)
        camera = scene.camera if scene is not None else viewer.camera
        canvas = getattr(viewer, "canvas", None)
        size = getattr(canvas, "size", None)
        if size is None:  # napari < 0.9 kept it private
            size = viewer._canvas_size
        cy, cx = (float(v) for v in tuple(camera.center)[-2:])
        h, w = (int(v) for v in tuple(size)[-2:])
        return cls(center=(cy, cx), zoom=float(camera.zoom), canvas_size=(h, w))


@dataclass(frozen=True)
class LayerFrame:
    """How the slide layer puts level-0 pixels in the world: ``world = translate + scale * px``.

    ``scale`` is world units per level-0 pixel (um/px for a calibrated slide layer),
    ``shape`` the level-0 ``(height, width)``.
    """

    scale: tuple[float, float]
    translate: tuple[float, float]
    shape: tuple[int, int]

    @classmethod
    def from_layer(cls, layer: Any) -> LayerFrame:
        """The frame of a napari image layer (multiscale: its level 0)."""
        sy, sx = (float(v) for v in tuple(layer.scale)[-2:])
        ty, tx = (float(v) for v in tuple(layer.translate)[-2:])
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        # RGB(A) images carry a trailing channel axis that is not a spatial axis
        spatial = data.shape[:-1] if getattr(layer, "rgb", False) else data.shape
        h, w = (int(v) for v in spatial[-2:])
        return cls(scale=(sy, sx), translate=(ty, tx), shape=(h, w))


def view_region(camera: CameraState, frame: LayerFrame) -> Region:
    """The level-0 box of the slide that is on screen for ``camera`` (clipped to the slide)."""
    return visible_region(
        camera.center,
        camera.zoom,
        camera.canvas_size,
        layer_scale=frame.scale,
        layer_translate=frame.translate,
        level0_shape=frame.shape,
    )


def level0_to_world(point: Sequence[float], frame: LayerFrame) -> tuple[float, float]:
    """World ``(y, x)`` of the centre of level-0 pixel ``point = (y, x)`` on the slide layer."""
    y, x = (float(v) for v in point)
    return (frame.translate[0] + frame.scale[0] * y, frame.translate[1] + frame.scale[1] * x)


def rebase_transform(
    scale: Sequence[float], translate: Sequence[float], mpp: float, frame: LayerFrame
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Move an overlay's ``(scale, translate)`` from the micrometre frame to the slide layer's.

    ``histolens.region.layer_transform`` places overlays for a slide layer at
    ``scale=(mpp, mpp)`` with no translate. A slide layer shown another way (an image
    without calibration at ``scale=1``, or one moved by the user) has world =
    ``frame.translate + frame.scale * level-0 px``; this maps ``um -> level-0 px -> world``
    so the overlay stays on the pixels it was computed from. Identity for the usual layer.
    """
    m = float(mpp)
    if not (m > 0):
        msg = f"mpp must be a positive number of micrometres per pixel, got {mpp!r}"
        raise ValueError(msg)
    out_scale = tuple(float(s) / m * fs for s, fs in zip(scale[-2:], frame.scale, strict=True))
    out_translate = tuple(
        ft + float(t) / m * fs
        for t, ft, fs in zip(translate[-2:], frame.translate, frame.scale, strict=True)
    )
    return (out_scale[0], out_scale[1]), (out_translate[0], out_translate[1])
