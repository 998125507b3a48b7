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
    layer = viewer.add_image(
        levels, multiscale=True, rgb=True, scale=scale, translate=translate, name="slide"
    )
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


# --- overlays and review numbers on a Qt-free ViewerModel ------------------------------


def _result(origin=(100, 200), shape=(64, 96), mpp=0.5, n_classes=2, attention=(0, 1)):
    """A small hand-made RegionResult: two square nuclei, a 2x3 tile map, attention maps."""
    import pandas as pd

    from histolens.result import (
        NUCLEI_COLUMNS,
        AttentionMap,
        NucleiResult,
        Provenance,
        RegionResult,
        TileClassResult,
    )

    y0, x0 = origin
    region = Region(y0, x0, y0 + shape[0], x0 + shape[1])
    labels = np.zeros(shape, np.uint32)
    labels[4:12, 4:12] = 1  # 64 px
    labels[30:34, 50:54] = 2  # 16 px
    feats = pd.DataFrame(
        {
            "label": [1, 2],
            "centroid_y": [y0 + 7.5, y0 + 31.5],
            "centroid_x": [x0 + 7.5, x0 + 51.5],
            "area_um2": [64 * mpp**2, 16 * mpp**2],
            "class_id": [0, 1],
            "class_name": ["tumour", "immune"],
            "probability": [0.9, 0.7],
        }
    )[list(NUCLEI_COLUMNS)]
    nuclei = NucleiResult(labels, feats, 1.0, origin, ("tumour", "immune"), ("#ff0000", "#00ff00"))
    classes = np.array([[1, 1, 2], [0, 2, 2]], np.int32)
    tiles = TileClassResult(
        classes,
        np.zeros((2, 3, n_classes), np.float32),
        None,
        32.0,
        origin,
        ("epithelium", "stroma"),
        ("#aa0000", "#0000aa"),
    )
    maps = [AttentionMap(np.full((8, 12), 0.5, np.float32), 8.0, origin, s) for s in attention]
    prov = Provenance(
        "",
        "t",
        region,
        0,
        1.0,
        mpp,
        "user",
        mpp,
        "hand",
        {},
        "cpu",
        "fp32",
        "",
        tiles_total=4,
        tiles_done=4,
    )
    return RegionResult(region, mpp, nuclei, tiles, maps, prov, complete=True)


def test_update_overlays_updates_in_place_and_prunes():
    from histolens._qt._overlays import OVERLAY_TAG, update_overlays
    from histolens.layers import result_to_layer_data

    viewer, slide_layer = _viewer(scale=(0.5, 0.5))
    frame = LayerFrame.from_layer(slide_layer)
    first = _result()
    layers = update_overlays(
        viewer,
        result_to_layer_data(first),
        mpp=first.slide_mpp,
        frame=frame,
        opacity={"nuclei": 0.3, "attention": 0.2},
        prune=True,
    )
    names = [lyr.name for lyr in viewer.layers]
    assert names == ["slide", "nuclei", "tile classes", "attention s0", "attention s1"]
    nuclei = viewer.layers["nuclei"]
    assert nuclei.opacity == pytest.approx(0.3)
    # over nuclei and tile classes, heat maps start hidden (they would wash the slide out)
    assert not viewer.layers["attention s0"].visible and not viewer.layers["attention s1"].visible
    # pixel (4, 4) of the labels is level-0 (104, 204): world (52, 102) um on the slide layer
    assert np.allclose(np.asarray(nuclei.translate) + np.asarray(nuclei.scale) * 4, (52.0, 102.0))
    assert nuclei.get_value((52.0, 102.0), world=True) == 1
    assert len(nuclei.features) == 2

    nuclei.opacity = 0.8  # a user choice survives re-analysis
    second = _result(origin=(400, 40), attention=(0,))
    again = update_overlays(viewer, result_to_layer_data(second), mpp=0.5, frame=frame, prune=True)
    names = [lyr.name for lyr in viewer.layers]
    assert names == ["slide", "nuclei", "tile classes", "attention s0"]
    assert again[0] is layers[0] and again[0].opacity == pytest.approx(0.8)
    assert nuclei.get_value(((400 + 4) * 0.5, (40 + 4) * 0.5), world=True) == 1
    tiles = viewer.layers["tile classes"]
    # tile cell (0, 0) covers level-0 [400, 432): its centre 415.5 px is at world 207.75 um
    assert tiles.translate[0] == pytest.approx(0.5 * (400 + 15.5))
    assert all(lyr.metadata[OVERLAY_TAG] for lyr in viewer.layers if lyr.name != "slide")


def test_update_overlays_on_uncalibrated_layer_and_name_clash():
    from histolens._qt._overlays import update_overlays
    from histolens.layers import result_to_layer_data

    viewer, slide_layer = _viewer(scale=(1.0, 1.0), translate=(10.0, 20.0))
    viewer.add_points([[0, 0]], name="nuclei")  # a user layer holding the name
    frame = LayerFrame.from_layer(slide_layer)
    res = _result(mpp=0.25)
    for _ in range(2):  # twice: the second call must find our layer, not add another
        update_overlays(viewer, result_to_layer_data(res), mpp=0.25, frame=frame)
    names = [lyr.name for lyr in viewer.layers]
    assert names.count("nuclei (HistoLens)") == 1 and "nuclei" in names
    ours = viewer.layers["nuclei (HistoLens)"]
    # on a scale-1 layer moved by (10, 20), labels pixel (4, 4) = level-0 (104, 204)
    assert ours.get_value((10 + 104, 20 + 204), world=True) == 1
    assert tuple(ours.scale) == (1.0, 1.0)


def test_summary_counts_density_and_tile_shares():
    s = _result(mpp=0.5).summary()
    assert s.n_nuclei == 2
    assert [(c.name, c.count, c.color) for c in s.nuclei_by_class] == [
        ("tumour", 1, "#ff0000"),
        ("immune", 1, "#00ff00"),
    ]
    # 5 tissue cells of 32 px at 0.5 um/px = 5 * 16 um * 16 um = 1280 um^2
    assert s.tissue_mm2 == pytest.approx(1280e-6)
    assert s.density_per_mm2 == pytest.approx(2 / 1280e-6)
    assert [(c.name, c.count) for c in s.tiles_by_class] == [("epithelium", 2), ("stroma", 3)]
    assert s.tiles_by_class[1].fraction == pytest.approx(0.6)
    assert np.allclose(np.sort(s.nucleus_areas_um2), [4.0, 16.0])


def test_summary_without_level0_mpp_counts_but_gives_no_areas():
    """No level-0 mpp: counts and shares stay, areas and densities are unknown (None), never
    computed with the analysis mpp instead."""
    import dataclasses

    res = _result(mpp=0.5)
    res = dataclasses.replace(res, provenance=dataclasses.replace(res.provenance, slide_mpp=None))
    s = res.summary()
    assert s.n_nuclei == 2 and s.analysed_cells == 5
    assert s.tissue_mm2 is None and s.density_per_mm2 is None and s.region_mm2 is None
    assert all(c.per_mm2 is None for c in s.nuclei_by_class)
    assert all(c.area_mm2 is None for c in s.tiles_by_class)
    assert s.tiles_by_class[1].fraction == pytest.approx(0.6)


def test_summary_density_uses_level0_mpp_when_analysed_at_a_downsample():
    """Regression: a 0.25 um/px slide analysed at 0.5 um/px (f = 2) gave a tissue area 4x too
    large (level-0 cell sizes times the analysis mpp), so densities were 4x too small."""
    from histolens.inference import analyze_region
    from histolens.slide import Slide

    pink = np.zeros((512, 512, 3), np.uint8)
    pink[...] = (200, 120, 170)  # stained everywhere: every tile cell holds tissue
    slide = Slide.from_array(pink, mpp=0.25, name="pink")
    result = analyze_region(
        slide, Region(0, 0, 512, 512), model="test-tiny", tasks=("tiles",), cache=False
    )
    assert result.analysis_mpp == pytest.approx(
        0.5
    ) and result.provenance.slide_mpp == pytest.approx(0.25)
    # 512 x 512 level-0 px at 0.25 um/px = 128 um x 128 um
    assert result.summary().tissue_mm2 == pytest.approx(128 * 128 / 1e6)
