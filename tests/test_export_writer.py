"""The napari writer contribution: Labels layers (scale/translate in um) -> level-0 GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histolens import export
from histolens._writer import level0_geometry, write_geojson
from histolens.layers import geojson_to_layer_data
from histolens.region import layer_transform


def _nuclei_layer(result, *, with_mpp: bool = True):
    nuc = result.nuclei
    scale, translate = layer_transform(result.slide_mpp, nuc.downsample, nuc.origin)
    features = nuc.features.copy()
    features.insert(0, "index", features["label"])
    metadata = {"class_names": nuc.class_names, "class_colors": nuc.class_colors}
    if with_mpp:
        metadata["mpp"] = result.slide_mpp
    meta = {
        "name": "nuclei",
        "scale": scale,
        "translate": translate,
        "features": features,
        "metadata": metadata,
    }
    return (nuc.labels, meta, "labels")


def test_layer_geometry_inverts_the_alignment_rule(make_result):
    result = make_result(downsample=2.0, origin=(1000, 2000), mpp=0.25)
    f, origin, mpp = level0_geometry(_nuclei_layer(result)[1])
    assert f == pytest.approx(2.0) and origin == pytest.approx((1000, 2000)) and mpp == 0.25


def test_writer_matches_the_direct_export(tmp_path: Path, make_result):
    result = make_result(downsample=2.0, origin=(1000, 2000), mpp=0.25)
    (out,) = write_geojson(str(tmp_path / "layers.geojson"), [_nuclei_layer(result)])
    written = json.loads(Path(out).read_text())
    direct = export.nuclei_feature_collection(result)
    assert written["histolens"]["mpp"] == 0.25
    assert len(written["features"]) == len(direct["features"]) == 6
    for a, b in zip(written["features"], direct["features"], strict=True):
        assert a["properties"]["objectType"] == "detection"
        assert a["properties"]["classification"] == b["properties"]["classification"]
        assert a["properties"]["measurements"]["area_um2"] == pytest.approx(
            b["properties"]["measurements"]["area_um2"]
        )
        np.testing.assert_allclose(
            a["geometry"]["coordinates"][0], b["geometry"]["coordinates"][0], atol=0.011
        )


def test_writer_exports_class_maps_as_annotations(tmp_path: Path, make_result):
    result = make_result()
    tiles = result.tiles
    scale, translate = layer_transform(result.slide_mpp, tiles.cell, tiles.origin)
    layer = (
        tiles.classes,
        {
            "name": "tile classes",
            "scale": scale,
            "translate": translate,
            "metadata": {"mpp": result.slide_mpp, "class_names": tiles.class_names},
        },
        "labels",
    )
    (out,) = write_geojson(str(tmp_path / "tiles.geojson"), [layer])
    feats = json.loads(Path(out).read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in feats] == list(tiles.class_names)
    assert all(f["properties"]["objectType"] == "annotation" for f in feats)
    ys = np.concatenate(
        [
            np.asarray(r[0])[:, 1]
            for f in feats
            for r in (
                f["geometry"]["coordinates"]
                if f["geometry"]["type"] == "MultiPolygon"
                else [f["geometry"]["coordinates"]]
            )
        ]
    )
    # the grid covers level-0 y in [1000, 1128); marching squares stays inside it
    assert ys.min() >= 1000 and ys.max() <= 1128


def test_writer_refuses_other_layer_types(tmp_path: Path):
    with pytest.raises(ValueError, match="takes Labels layers"):
        write_geojson(str(tmp_path / "x.geojson"), [(np.zeros((3, 2)), {"name": "pts"}, "points")])


def test_napari_accepts_the_imported_layers(tmp_path: Path, make_result):
    layers = pytest.importorskip("napari.layers")
    result = make_result()
    path = export.save_geojson(tmp_path / "n.geojson", export.nuclei_feature_collection(result))
    ((data, meta, kind),) = geojson_to_layer_data(path)
    shapes = layers.Shapes(data, **meta)
    assert shapes.nshapes == 6 and list(shapes.features["class_name"]) == list(
        meta["features"]["class_name"]
    )
    ((labels, lmeta, _),) = geojson_to_layer_data(path, as_labels=True, downsample=2.0)
    layer = layers.Labels(labels, **lmeta)
    assert layer.data.max() == 6
    # the re-imported labels sit on the same slide pixels as the original (same rule, same frame)
    assert tuple(layer.scale) == pytest.approx(
        layer_transform(result.slide_mpp, 2.0, lmeta["metadata"]["origin"])[0]
    )


def test_writer_takes_the_layers_stage_output(tmp_path: Path, make_result):
    """The tuples histolens.layers makes (what napari hands back) export without loss."""
    from histolens.layers import result_to_layer_data

    result = make_result(downsample=2.0, origin=(1000, 2000), mpp=0.25)
    layers = [t for t in result_to_layer_data(result) if t[2] == "labels"]
    if "mpp" not in layers[0][1]["metadata"]:
        # the writer needs the level-0 mpp to undo the layer transform; without it, it warns
        with pytest.warns(UserWarning, match="no level-0 mpp"):
            write_geojson(str(tmp_path / "warn.geojson"), [layers[0]])
    for _, meta, _ in layers:
        meta["metadata"].setdefault("mpp", result.provenance.slide_mpp)
    (out,) = write_geojson(str(tmp_path / "all.geojson"), layers)
    feats = json.loads(Path(out).read_text())["features"]
    kinds = [f["properties"]["objectType"] for f in feats]
    assert kinds.count("detection") == 6 and kinds.count("annotation") == len(
        result.tiles.class_names
    )
    direct = export.nuclei_feature_collection(result)["features"]
    for a, b in zip(
        [f for f in feats if f["properties"]["objectType"] == "detection"], direct, strict=True
    ):
        np.testing.assert_allclose(
            a["geometry"]["coordinates"][0], b["geometry"]["coordinates"][0], atol=0.011
        )
