"""Visible-region capture on a Qt-free ``napari.components.ViewerModel``.

The box on screen must come from camera centre, zoom and canvas size (not from
``layer.corner_pixels``), mapped through the slide layer's scale and translate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from histolens._qt._viewport import (
    CameraState,
    LayerFrame,
    level0_to_world,
    rebase_transform,
    view_region,
)
from histolens.region import Region, layer_transform

napari_components = pytest.importorskip("napari.components")

MPP = 0.499  # um/px, the CMU-1-Small-Region calibration
SHAPE = (2220, 2967)  # level-0 (height, width) of CMU-1-Small-Region


def _viewer(scale=(MPP, MPP), translate=(0.0, 0.0), shape=SHAPE):
    viewer = napari_components.ViewerModel()
    # a tiny 2-level RGB pyramid with the real level-0 shape; the pixels do not matter here
    import dask.array as da

    levels = [
        da.zeros((*shape, 3), dtype=np.uint8, chunks=(256, 256, 3)),
        da.zeros((shape[0] // 4, shape[1] // 4, 3), dtype=np.uint8, chunks=(256, 256, 3)),
    ]
    layer = viewer.add_image(levels, multiscale=True, rgb=True, scale=scale, translate=translate)
    return viewer, layer


def _expected(center, zoom, canvas, scale, translate, shape):
    """The box by hand: level-0 pixel k covers world [t + s*(k-0.5), t + s*(k+0.5))."""
    out = []
    for axis in (0, 1):
        half = canvas[axis] / (2.0 * zoom)
        lo = (center[axis] - half - translate[axis]) / scale[axis]
        hi = (center[axis] + half - translate[axis]) / scale[axis]
        k0 = min(max(math.floor(lo + 0.5), 0), shape[axis])
        k1 = min(max(math.floor(hi + 0.5) + 1, k0), shape[axis])
        out.append((k0, k1))
    (y0, y1), (x0, x1) = out
    return Region(y0, x0, y1, x1)


@pytest.mark.parametrize("zoom", [0.3, 1.0, 2.5, 8.0])
@pytest.mark.parametrize("canvas", [(600, 800), (900, 1600), (333, 517)])
def test_view_region_matches_camera_box(zoom, canvas):
    viewer, layer = _viewer()
    viewer.canvas.size = canvas
    viewer.scene.camera.center = (0.0, 540.0, 700.0)
    viewer.scene.camera.zoom = zoom

    camera = CameraState.from_viewer(viewer)
    assert camera.canvas_size == canvas
    assert camera.center == (540.0, 700.0)
    frame = LayerFrame.from_layer(layer)
    assert frame.shape == SHAPE
    assert frame.scale == (MPP, MPP)

    got = view_region(camera, frame)
    want = _expected((540.0, 700.0), zoom, canvas, (MPP, MPP), (0.0, 0.0), SHAPE)
    assert got == want
    # Unclipped, the box spans the canvas in level-0 px plus at most the two partly
    # visible edge pixels; never a chunk-rounded superset as corner_pixels would be.
    span = canvas[0] / zoom / MPP
    if want.y0 > 0 and want.y1 < SHAPE[0]:
        assert span <= got.height <= span + 2


def test_view_region_agrees_with_napari_world_to_data():
    """The same corners through napari's own world->data mapping (translate included)."""
    viewer, layer = _viewer(scale=(0.25, 0.25), translate=(30.0, -12.0))
    viewer.canvas.size = (480, 640)
    viewer.scene.camera.center = (0.0, 200.0, 300.0)
    viewer.scene.camera.zoom = 3.0
    got = view_region(CameraState.from_viewer(viewer), LayerFrame.from_layer(layer))

    half = np.array([480, 640]) / (2 * 3.0)
    lo = np.asarray(layer.world_to_data(np.array([200.0, 300.0]) - half))[-2:]
    hi = np.asarray(layer.world_to_data(np.array([200.0, 300.0]) + half))[-2:]
    k0 = np.floor(lo + 0.5).astype(int)
    k1 = np.floor(hi + 0.5).astype(int) + 1
    assert got == Region(int(k0[0]), int(k0[1]), int(k1[0]), int(k1[1]))
    # 480 / 3 / 0.25 = 640 rows + the edge pixel; 640 / 3 / 0.25 = 853.3 columns + 2 partial
    assert (got.height, got.width) == (641, 855)


def test_reset_view_shows_the_whole_slide():
    viewer, layer = _viewer()
    viewer.canvas.size = (700, 900)
    viewer.reset_view()
    got = view_region(CameraState.from_viewer(viewer), LayerFrame.from_layer(layer))
    assert got == Region(0, 0, *SHAPE)


def test_view_off_the_slide_is_empty():
    viewer, layer = _viewer()
    viewer.canvas.size = (400, 400)
    viewer.scene.camera.center = (0.0, -5000.0, -5000.0)
    viewer.scene.camera.zoom = 2.0
    got = view_region(CameraState.from_viewer(viewer), LayerFrame.from_layer(layer))
    assert got.is_empty


def test_level0_to_world_and_rebase_follow_the_slide_layer():
    frame = LayerFrame(scale=(1.0, 1.0), translate=(10.0, 20.0), shape=SHAPE)
    assert level0_to_world((100, 200), frame) == (110.0, 220.0)
    # an overlay at downsample 4 from level-0 origin (64, 128), computed for mpp 0.5,
    # shown on an uncalibrated (scale 1) slide layer moved by (10, 20)
    scale, translate = layer_transform(0.5, 4.0, (64, 128))
    s2, t2 = rebase_transform(scale, translate, 0.5, frame)
    assert s2 == (4.0, 4.0)
    assert t2 == (10.0 + 64 + 1.5, 20.0 + 128 + 1.5)
    # identity on the calibrated layer the reader builds
    calibrated = LayerFrame(scale=(0.5, 0.5), translate=(0.0, 0.0), shape=SHAPE)
    assert rebase_transform(scale, translate, 0.5, calibrated) == (scale, translate)
    with pytest.raises(ValueError, match="mpp"):
        rebase_transform(scale, translate, 0.0, frame)
