"""Hostile GeoJSON through the reader and ``geojson_to_layer_data``: clear errors naming the
file and the feature, bounded work, and a polygon fill equal to scikit-image's (issue 17)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from histolens._reader import read_slides
from histolens.export import GeoJSONError
from histolens.export._geojson_read import fill_polygon
from histolens.layers import geojson_to_layer_data


def _square(x: float, y: float, s: float = 10.0) -> list[list[float]]:
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def _fc(*features, **extra) -> dict:
    return {"type": "FeatureCollection", "features": list(features), **extra}


def _poly(coords, **props) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords}, **props}


GOOD = _poly([_square(0, 0)])

#: name -> (file text, words the error must hold besides the file name)
HOSTILE: dict[str, tuple[str, str]] = {
    "null-feature": (json.dumps(_fc(None)), "feature 0"),
    "number-feature": (json.dumps(_fc(GOOD, 7)), "feature 1"),
    "string-features": (json.dumps({"type": "FeatureCollection", "features": "x"}), "features"),
    "no-coordinates": (
        json.dumps(_fc(GOOD, {"type": "Feature", "geometry": {"type": "Polygon"}})),
        "feature 1",
    ),
    "coordinates-string": (json.dumps(_fc(_poly("abc"))), "feature 0"),
    "ring-of-strings": (json.dumps(_fc(_poly([[["a", "b"], ["c", "d"], ["e", "f"]]]))), "pairs"),
    "ragged-ring": (json.dumps(_fc(_poly([[[0, 0], [1], [2, 2], [0, 0]]]))), "feature 0"),
    "empty-polygon": (json.dumps(_fc(_poly([]))), "feature 0"),
    "ring-not-list": (json.dumps(_fc(_poly([5]))), "feature 0"),
    "nested-too-deep-coords": (json.dumps(_fc(_poly([[[[[[0, 0]]]]]]))), "feature 0"),
    "nan-vertex": (json.dumps(_fc(GOOD, _poly([[[0, 0], [float("nan"), 1], [2, 2]]]))), "NaN"),
    "inf-vertex": (  # 1e400 parses as float inf
        json.dumps(_fc(_poly([[[0, 0], [1, 1], [2, 2]]]))).replace("[1, 1]", "[1e400, 1]"),
        "infinite",
    ),
    "geometry-list": (json.dumps(_fc({"type": "Feature", "geometry": [1, 2]})), "feature 0"),
    "multipolygon-junk": (
        json.dumps(
            _fc({"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [1]}})
        ),
        "feature 0",
    ),  # fmt: skip
    "deep-nesting": ("[" * 100_000 + "]" * 100_000, "too deeply"),
    "string-document": (json.dumps("hello"), "JSON str"),
    "point-collection": (json.dumps({"type": "Point", "coordinates": [0, 0]}), "'Point'"),
    "not-json": ("{ this is not json", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "histolens-list": (json.dumps(_fc(GOOD, histolens=[1])), "'histolens'"),
    "mpp-negative": (json.dumps(_fc(GOOD, histolens={"mpp": -0.25})), "histolens.mpp"),
    "mpp-nan": (json.dumps(_fc(GOOD, histolens={"mpp": float("nan")})), "histolens.mpp"),
    "mpp-text": (json.dumps(_fc(GOOD, histolens={"mpp": "fast"})), "histolens.mpp"),
    "mpp-zero": (json.dumps(_fc(GOOD, histolens={"mpp": 0})), "histolens.mpp"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_geojson_gives_one_clear_error(tmp_path: Path, name: str):
    text, words = HOSTILE[name]
    path = tmp_path / f"{name}.geojson"
    path.write_text(text)
    for as_labels in (False, True):
        with pytest.raises(GeoJSONError) as err:
            geojson_to_layer_data(path, as_labels=as_labels)
        message = str(err.value)
        assert str(path) in message and words in message, message
    with pytest.raises(GeoJSONError):  # the napari reader path too
        read_slides(path)


def test_binary_files_are_refused_by_name(tmp_path: Path):
    path = tmp_path / "slide.geojson"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(GeoJSONError, match="not UTF-8") as err:
        geojson_to_layer_data(path)
    assert str(path) in str(err.value)


def test_labels_far_apart_are_refused_before_allocating(tmp_path: Path):
    path = tmp_path / "apart.geojson"
    path.write_text(json.dumps(_fc(GOOD, _poly([_square(1e5, 1e5)]))))
    t0 = time.perf_counter()
    with pytest.raises(GeoJSONError, match="larger downsample"):
        geojson_to_layer_data(path, as_labels=True)
    assert time.perf_counter() - t0 < 5
    ((data, _, kind),) = geojson_to_layer_data(path)  # as shapes it is fine
    assert kind == "shapes" and len(data) == 2
    ((labels, _, _),) = geojson_to_layer_data(path, as_labels=True, downsample=64)
    assert labels.max() == 2
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(GeoJSONError, match="downsample"):
            geojson_to_layer_data(path, as_labels=True, downsample=bad)
        with pytest.raises(GeoJSONError, match="mpp"):
            geojson_to_layer_data(path, mpp=bad)


def test_decorations_that_are_not_objects_are_ignored(tmp_path: Path):
    """Classification as a string, null properties, junk measurements, an int colour."""
    features = [
        _poly([_square(0, 0)], properties=None),
        _poly([_square(20, 0)], properties={"classification": "Tumor"}),
        _poly([_square(40, 0)], properties={"classification": {"name": "Stroma", "color": -1}}),
        _poly([_square(60, 0)], properties={"measurements": [1, {"name": "a", "value": 2}]}),
        {"type": "Feature", "geometry": None},  # no geometry: skipped, like points
    ]
    path = tmp_path / "loose.geojson"
    path.write_text(json.dumps(_fc(*features, histolens={"mpp": 0.5})))
    ((data, meta, _),) = geojson_to_layer_data(path)
    assert len(data) == 4 and meta["scale"] == (0.5, 0.5)
    assert list(meta["features"]["class_name"])[1:3] == ["Tumor", "Stroma"]
    assert meta["features"]["a"].iloc[3] == 2


def test_the_polygon_fill_equals_scikit_image_and_is_linear(tmp_path: Path):
    from skimage.draw import polygon

    rng = np.random.default_rng(0)
    for i in range(200):
        n = int(rng.integers(3, 12))
        if i % 2:  # star-shaped, like nuclei
            ang, rad = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(3, 20, n)
            r, c = 25 + rad * np.sin(ang), 25 + rad * np.cos(ang)
        else:  # self-intersecting, partly outside the array
            r, c = rng.uniform(-5, 55, n), rng.uniform(-5, 55, n)
        want = np.zeros((50, 50), np.uint32)
        rr, cc = polygon(r, c, shape=want.shape)
        want[rr, cc] = 3
        got = np.zeros_like(want)
        fill_polygon(got, r, c, 3)
        np.testing.assert_array_equal(got, want)
    # 10^5 vertices over a 2000^2 box: scikit-image's O(pixels x vertices) took minutes
    ang = np.linspace(0, 2 * np.pi, 100_000, endpoint=False)
    ring = np.stack([1000 + 900 * np.cos(ang), 1000 + 900 * np.sin(ang)], 1)
    path = tmp_path / "big.geojson"
    path.write_text(json.dumps(_fc(_poly([ring.tolist()]))))
    ((labels, _, _),) = geojson_to_layer_data(path, as_labels=True)
    assert labels.shape == (1800, 1800)
    assert (labels > 0).sum() == pytest.approx(np.pi * 900**2, rel=1e-3)
