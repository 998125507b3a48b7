"""RegionResult -> napari LayerDataTuples: valid for napari and aligned at every pyramid level."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import histolens.inference as inference
from histolens.colors import rgba
from histolens.layers import result_to_layer_data
from histolens.region import Region
from histolens.result import (
    NUCLEI_COLUMNS,
    AttentionMap,
    NucleiResult,
    Provenance,
    RegionResult,
    TileClassResult,
)

napari_layers = pytest.importorskip(
    "napari.layers", reason="napari is needed to validate the tuples"
)

MPP = 0.25


def _slide_layer(shape=(64, 64)):
    return napari_layers.Image(
        np.zeros((*shape, 3), np.uint8), rgb=True, scale=(MPP, MPP), units=("um", "um")
    )


def _result(f: float, origin: tuple[int, int]) -> RegionResult:
    """A hand-made result whose arrays sit at downsample ``f`` from level-0 ``origin``."""
    labels = np.zeros((6, 7), np.uint32)
    labels[1:3, 2:4] = 1
    labels[4, 5] = 2
    feats = pd.DataFrame(
        {
            "label": np.array([1, 2], np.uint32),
            "centroid_y": [0.0, 0.0],
            "centroid_x": [0.0, 0.0],
            "area_um2": [4.0, 1.0],
            "class_id": np.array([1, 0], np.int32),
            "class_name": ["b", "a"],
            "probability": np.array([0.9, 0.6], np.float32),
        },
        columns=list(NUCLEI_COLUMNS),
    )
    nuclei = NucleiResult(labels, feats, f, origin, ("a", "b"), ("#ff0000", "#0000ff"))
    tiles = TileClassResult(
        classes=np.array([[0, 1], [2, 1]], np.int32),
        probabilities=np.zeros((2, 2, 2), np.float32),
        embeddings=None,
        cell=4 * f,
        origin=origin,
        class_names=("x", "y"),
        class_colors=("#00ff00", "#ffff00"),
    )
    att = AttentionMap(np.random.default_rng(0).random((3, 3)).astype(np.float32), 2 * f, origin, 0)
    prov = Provenance(
        "", "t", Region(0, 0, 1, 1), 0, f, MPP, "test", MPP * f, "fake", {}, "cpu", "fp32", "now"
    )
    return RegionResult(
        Region(*origin, origin[0] + 6, origin[1] + 7), MPP * f, nuclei, tiles, [att], prov
    )


@pytest.mark.parametrize("f", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("origin", [(0, 0), (40, 16)])
def test_every_layer_pixel_lands_on_its_slide_pixels(f, origin):
    """Output pixel (i, j) covers level-0 [y0 + i f, y0 + (i+1) f): its centre is level-0
    index y0 + i f + (f - 1) / 2 in the slide layer, in world (um) coordinates."""
    slide_layer = _slide_layer()
    tuples = result_to_layer_data(_result(f, origin))
    assert [t[1]["name"] for t in tuples] == ["nuclei", "tile classes", "attention s0"]
    y0, x0 = origin
    for data, meta, kind in tuples:
        layer = napari_layers.Layer.create(data, meta, kind)
        assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
        per_px = {"nuclei": f, "tile classes": 4 * f, "attention s0": 2 * f}[meta["name"]]
        for i, j in [(0, 0), (1, 2), (data.shape[0] - 1, data.shape[1] - 1)]:
            want = slide_layer.data_to_world(
                (y0 + i * per_px + (per_px - 1) / 2, x0 + j * per_px + (per_px - 1) / 2)
            )
            np.testing.assert_allclose(layer.data_to_world((i, j)), want, atol=1e-9)


def test_nuclei_layer_colours_features_and_legend():
    data, meta, kind = result_to_layer_data(_result(2.0, (0, 0)), names=["nuclei"])[0]
    layer = napari_layers.Layer.create(data, meta, kind)
    assert kind == "labels" and layer.data.dtype == np.uint32
    assert list(layer.features["index"]) == [1, 2] and list(layer.features["class_name"]) == [
        "b",
        "a",
    ]
    # label 1 is class 1 ('b', blue), label 2 is class 0 ('a', red); background transparent
    np.testing.assert_allclose(layer.colormap.map(np.array([1]))[0], rgba("#0000ff"))
    np.testing.assert_allclose(layer.colormap.map(np.array([2]))[0], rgba("#ff0000"))
    assert layer.colormap.map(np.array([0]))[0][3] == 0


def test_tile_class_layer_is_direct_and_transparent_where_unknown():
    data, meta, kind = result_to_layer_data(_result(1.0, (0, 0)), names=["tile classes"])[0]
    layer = napari_layers.Layer.create(data, meta, kind)
    np.testing.assert_allclose(layer.colormap.map(np.array([1]))[0], rgba("#00ff00"))
    np.testing.assert_allclose(layer.colormap.map(np.array([2]))[0], rgba("#ffff00"))
    assert layer.colormap.map(np.array([0]))[0][3] == 0
    assert meta["metadata"]["legend"] == {"x": "#00ff00", "y": "#ffff00"}
    att = result_to_layer_data(_result(1.0, (0, 0)), names=["attention s0"])[0]
    img = napari_layers.Layer.create(*att)
    assert (
        tuple(img.contrast_limits) == (0.0, 1.0)
        and img.opacity == 0.5
        and img.blending == "translucent"
    )
    assert img.colormap.map(np.array([0.0]))[0][3] == 0  # glass and low attention stay see-through


def test_rgba_accepts_the_colour_forms_in_cards():
    assert rgba("#ff000080") == pytest.approx((1, 0, 0, 128 / 255))
    assert rgba((255, 128, 0)) == pytest.approx((1, 128 / 255, 0, 1))
    with pytest.raises(ValueError, match="#rrggbb"):
        rgba("red-ish")


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_engine_output_aligns_with_the_slide_at_each_level(
    level, fake_model, fake_card, pyramid_slide, simple_postprocess, synthetic_image
):
    """End to end: analyse at pyramid level k (downsample 2^k); every detected nucleus, taken
    from the napari Labels layer, sits on a painted disk of the slide layer in world um."""
    img, centres = synthetic_image(1024, n=40, radius=16.0, seed=5)
    slide = pyramid_slide(img, mpp=MPP)
    res = inference.analyze_region(
        slide,
        Region(96, 160, 1000, 900),
        model=fake_model(fake_card(mpp=MPP * 2**level)),
        tile_size=64,
        cache=False,
    )
    assert res.nuclei.downsample == 2**level
    data, meta, kind = result_to_layer_data(res, names=["nuclei"])[0]
    layer = napari_layers.Layer.create(data, meta, kind)
    slide_layer = _slide_layer(img.shape[:2])
    true_world = np.array([slide_layer.data_to_world(c) for c in centres])
    ids = np.unique(data[data > 0])
    assert len(ids) >= 20
    errors = []
    for k in ids:
        yy, xx = np.nonzero(data == k)
        if (
            yy.min() == 0
            or xx.min() == 0
            or yy.max() == data.shape[0] - 1
            or xx.max() == data.shape[1] - 1
        ):
            continue  # cut by the region's own border
        w = np.asarray(layer.data_to_world((yy.mean(), xx.mean())))
        errors.append(np.sqrt(((true_world - w) ** 2).sum(axis=1)).min())
    # within a quarter of a level pixel (in um), plus the level-0 pixel of disk rasterisation
    assert np.median(errors) < 0.25 * MPP * 2**level + MPP
    assert np.max(errors) < 0.75 * MPP * 2**level + MPP
