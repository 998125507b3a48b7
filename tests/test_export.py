"""Exports: QuPath GeoJSON in level-0 px, CSV, OME-TIFF/Zarr masks, summary, PNG, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from histolens import export
from histolens.colors import parse_color
from histolens.layers import geojson_to_layer_data
from histolens.region import Region, layer_transform


class FakeSlide:
    """Two-level slide stand-in: a pink-ish gradient, exposes read_region/downsamples."""

    def __init__(self, shape=(2000, 3000)):
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        self.level0 = np.stack([200 + 0 * yy, 120 + (xx % 60), 160 + (yy % 50)], -1).astype(
            np.uint8
        )
        self.levels = (self.level0, self.level0[::4, ::4])
        self.downsamples = (1.0, 4.0)
        self.shape = shape

    def read_region(self, region: Region, level: int = 0) -> np.ndarray:
        y0, x0, y1, x1 = region.at_downsample(self.downsamples[level])
        return self.levels[level][y0:y1, x0:x1]


def _ring_area(ring) -> float:
    x, y = np.asarray(ring).T
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def test_polygons_are_closed_ccw_level0_and_match_area(make_result):
    result = make_result()
    nuc = result.nuclei
    polys = export.labels_to_polygons(
        nuc.labels, downsample=nuc.downsample, origin=nuc.origin, tolerance=0
    )
    assert sorted(polys) == list(range(1, 7))
    for label_id, rings in polys.items():
        assert len(rings) == 1
        ring = rings[0]
        assert np.array_equal(ring[0], ring[-1])
        area = _ring_area(ring)
        assert area > 0  # counter-clockwise by the shoelace sign in (x, y)
        pixel_area = np.count_nonzero(nuc.labels == label_id) * nuc.downsample**2
        # marching squares cuts pixel corners: a bit less than the pixel area, never more
        assert 0.8 * pixel_area < area <= pixel_area
        # ring centre = the features' centroid (x, y order; GeoJSON edges = pixel index + 0.5)
        row = nuc.features.set_index("label").loc[label_id]
        assert abs(ring[:-1, 0].mean() - (row.centroid_x + 0.5)) < 1.0
        assert abs(ring[:-1, 1].mean() - (row.centroid_y + 0.5)) < 1.0


def test_polygon_of_one_pixel_lies_on_that_level0_pixel():
    labels = np.zeros((5, 5), np.uint16)
    labels[2, 3] = 7
    rings = export.labels_to_polygons(labels, downsample=4.0, origin=(100, 200))[7]
    xs, ys = rings[0][:, 0], rings[0][:, 1]
    # array pixel (2, 3) covers level-0 y in [108, 112), x in [212, 216)
    assert 108 <= ys.min() and ys.max() <= 112 and 212 <= xs.min() and xs.max() <= 216
    assert np.isclose(xs.mean(), 214.0, atol=0.5) and np.isclose(ys.mean(), 110.0, atol=0.5)


def test_polygons_of_a_slide_sized_label_image_need_no_copy_of_it():
    import tracemalloc

    lab = np.zeros((8192, 4096), np.uint32)  # 128 MB, four nuclei far apart
    for i, (y, x) in enumerate([(7000, 100), (5000, 3000), (30, 4000), (30, 20)]):
        lab[y - 2 : y + 2, x - 2 : x + 2] = i + 1
    export.labels_to_polygons(lab[:64, :64])  # imports outside the measurement
    tracemalloc.start()
    rings = export.labels_to_polygons(lab)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sorted(rings) == [1, 2, 3, 4]
    assert peak < lab.nbytes / 8, f"labels_to_polygons peaked at {peak / 1e6:.0f} MB"


def test_lazy_geojson_writes_the_same_file_without_holding_every_feature(tmp_path: Path):
    import tracemalloc

    side, step = 16, 14  # 256 nuclei on a grid
    labels = np.zeros((side * step, side * step), np.uint32)
    for k in range(side * side):
        rr, cc = disk(((k // side) * step + 7, (k % side) * step + 7), 5, shape=labels.shape)
        labels[rr, cc] = k + 1
    table = pd.DataFrame(
        {"label": np.arange(1, side * side + 1), "class_name": "epithelial", "area_um2": 20.0}
    )
    peaks = {}
    for lazy in (False, True):
        fc = export.labels_feature_collection(labels[:30, :30], features=table.iloc[:2], lazy=lazy)
        export.save_geojson(tmp_path / "warm.geojson", fc)  # imports outside the measurement
        tracemalloc.start()
        fc = export.labels_feature_collection(labels, features=table, lazy=lazy)
        export.save_geojson(tmp_path / f"{lazy}.geojson", fc)
        peaks[lazy] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (tmp_path / "True.geojson").read_bytes() == (tmp_path / "False.geojson").read_bytes()
    assert peaks[True] < peaks[False] / 3, peaks  # 19,600 nuclei: 379 vs 3,114 B each


def test_split_label_becomes_multipolygon_and_sparse_ids_work():
    labels = np.zeros((20, 20), np.uint32)
    labels[2:5, 2:5] = 4_000_000_000
    labels[10:14, 10:14] = 4_000_000_000
    labels[15:18, 2:6] = 3
    fc = export.labels_feature_collection(labels, default_class="nucleus")
    by_label = {int(f["properties"]["measurements"]["label"]): f for f in fc["features"]}
    assert by_label[4_000_000_000]["geometry"]["type"] == "MultiPolygon"
    assert len(by_label[4_000_000_000]["geometry"]["coordinates"]) == 2
    assert by_label[3]["geometry"]["type"] == "Polygon"


def test_nuclei_geojson_follows_qupath_conventions(tmp_path: Path, make_result):
    result = make_result()
    path = export.save_geojson(
        tmp_path / "nuclei.geojson", export.nuclei_feature_collection(result)
    )
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 6
    assert doc["histolens"]["mpp"] == 0.25
    ids = set()
    region = result.region
    for f in doc["features"]:
        ids.add(f["id"])
        props = f["properties"]
        assert props["objectType"] == "detection"
        name = props["classification"]["name"]
        k = result.nuclei.class_names.index(name)
        assert props["classification"]["color"] == parse_color(result.nuclei.class_colors[k])
        assert set(props["measurements"]) >= {"area_um2", "probability", "label"}
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        xs, ys = np.asarray(ring).T
        assert region.x0 <= xs.min() and xs.max() <= region.x1
        assert region.y0 <= ys.min() and ys.max() <= region.y1
    assert len(ids) == 6
    # deterministic ids: the same result gives the same file, byte for byte
    again = export.save_geojson(
        tmp_path / "again.geojson", export.nuclei_feature_collection(result)
    )
    assert again.read_bytes() == path.read_bytes()


def test_tiles_geojson_squares_cover_their_cells(make_result):
    result = make_result()
    fc = export.tiles_feature_collection(result)
    assert len(fc["features"]) == 5  # one of six cells is 0 = not analysed
    first = fc["features"][0]
    assert first["properties"]["objectType"] == "tile"
    assert first["properties"]["classification"]["name"] == "tumour"
    ring = np.asarray(first["geometry"]["coordinates"][0])
    # cell (0, 0): level-0 [1000, 1064) x [2000, 2064), as (x, y)
    assert ring[:, 0].min() == 2000 and ring[:, 0].max() == 2064
    assert ring[:, 1].min() == 1000 and ring[:, 1].max() == 1064
    assert _ring_area(ring) > 0
    m = first["properties"]["measurements"]
    assert m["prob_tumour"] == pytest.approx(0.8) and m["probability"] == pytest.approx(0.8)


def test_write_result_writes_every_file(tmp_path: Path, make_result):
    import tifffile
    import zarr

    result = make_result()
    files = export.write_result(
        result, tmp_path / "out", formats=("geojson", "csv", "ome-tiff", "ome-zarr", "summary")
    )
    expected = {
        "nuclei.geojson",
        "tiles.geojson",
        "nuclei.csv",
        "tiles.csv",
        "nuclei_labels.ome.tif",
        "tile_classes.ome.tif",
        "nuclei_labels.ome.zarr",
        "tile_classes.ome.zarr",
        "summary.json",
    }
    assert set(files) == expected
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected  # no temporaries left

    csv = pd.read_csv(files["nuclei.csv"])
    pd.testing.assert_frame_equal(csv, result.nuclei.features, check_dtype=False)
    tiles = pd.read_csv(files["tiles.csv"])
    assert len(tiles) == 5 and {"y0", "x0", "y1", "x1", "prob_tumour", "prob_stroma"} <= set(tiles)

    with tifffile.TiffFile(files["nuclei_labels.ome.tif"]) as tif:
        assert tif.is_ome
        np.testing.assert_array_equal(tif.asarray(), result.nuclei.labels)
        ome = tif.ome_metadata
    assert (
        'PhysicalSizeX="0.5"' in ome and 'PositionX="500.0"' in ome
    )  # 0.25 um/px * 2; 2000 px * 0.25

    group = zarr.open_group(str(files["tile_classes.ome.zarr"]), mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    np.testing.assert_array_equal(group[ms["datasets"][0]["path"]][...], result.tiles.classes)
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    # NGFF places pixel centres: the same numbers as the napari layer of the same array
    expected = layer_transform(0.25, result.tiles.cell, result.tiles.origin)
    assert (tuple(scale["scale"]), tuple(translation["translation"])) == expected
    assert "image-label" in group.attrs["ome"]

    summary = json.loads(files["summary.json"].read_text())
    assert summary["nuclei"]["count"] == 6
    assert summary["nuclei"]["per_class"] == {"epithelial": 2, "inflammatory": 2, "stromal": 2}
    assert summary["tiles"]["per_class"]["tumour"]["cells"] == 3
    assert summary["model"]["card"]["tasks"] == ["nuclei", "tiles"]
    assert summary["files"]["nuclei.geojson"] == "nuclei.geojson"


def test_attention_maps_are_written_as_float_images(tmp_path: Path, make_result):
    import tifffile
    import zarr

    from histolens.result import AttentionMap

    result = make_result()
    heat = np.linspace(0, 1, 6 * 8, dtype=np.float32).reshape(6, 8)
    result.attention.append(AttentionMap(heat, 32.0, (1000, 2000), scale=1))
    files = export.write_result(result, tmp_path, formats=("ome-tiff", "ome-zarr"))
    with tifffile.TiffFile(files["attention_s1.ome.tif"]) as tif:
        np.testing.assert_array_equal(tif.asarray(), heat)
        assert 'PhysicalSizeX="8.0"' in tif.ome_metadata  # 0.25 um/px * 32
    group = zarr.open_group(str(files["attention_s1.ome.zarr"]), mode="r")
    level0 = group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]
    assert level0.dtype == np.float32 and "image-label" not in group.attrs["ome"]


def test_write_result_rejects_unknown_format(tmp_path: Path, make_result):
    with pytest.raises(ValueError, match="unknown export format.*'shapefile'"):
        export.write_result(make_result(), tmp_path, formats=("shapefile",))


def test_failed_write_keeps_the_previous_file(tmp_path: Path, make_result):
    result = make_result()
    target = tmp_path / "nuclei.geojson"
    good = export.save_geojson(target, export.nuclei_feature_collection(result)).read_bytes()
    broken = export.nuclei_feature_collection(result)
    # A value json cannot encode, after several features were already streamed out.
    broken["features"][4]["properties"]["measurements"]["bad"] = object()
    with pytest.raises(TypeError):
        export.save_geojson(target, broken)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.geojson"]


def test_cancelled_folder_write_keeps_the_previous_store(tmp_path: Path):
    target = tmp_path / "mask.ome.zarr"
    target.mkdir()
    (target / "marker").write_text("old")
    with pytest.raises(KeyboardInterrupt), export.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("new")
        raise KeyboardInterrupt
    assert (target / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.ome.zarr"]


def test_geojson_round_trip_keeps_every_polygon(tmp_path: Path, make_result):
    result = make_result()
    path = export.save_geojson(tmp_path / "n.geojson", export.nuclei_feature_collection(result))
    written = json.loads(path.read_text())["features"]
    ((data, meta, kind),) = geojson_to_layer_data(path)
    assert kind == "shapes" and len(data) == len(written) == 6
    for poly, feature in zip(data, written, strict=True):
        ring = np.asarray(feature["geometry"]["coordinates"][0])[:-1]
        # (y, x) napari order, pixel-centre data coordinates = edge coordinates - 0.5
        np.testing.assert_allclose(poly, ring[:, ::-1] - 0.5)
    assert meta["scale"] == (0.25, 0.25)
    assert list(meta["features"]["class_name"]) == [
        f["properties"]["classification"]["name"] for f in written
    ]


def test_geojson_round_trip_to_labels_recovers_masks(tmp_path: Path, make_result):
    result = make_result(downsample=1.0, origin=(300, 400))
    nuc = result.nuclei
    fc = export.labels_feature_collection(
        nuc.labels, origin=nuc.origin, features=nuc.features, tolerance=0
    )
    path = export.save_geojson(tmp_path / "n.geojson", fc)
    ((labels, meta, kind),) = geojson_to_layer_data(path, as_labels=True, mpp=0.25)
    assert kind == "labels"
    oy, ox = meta["metadata"]["origin"]
    # the layer lines up with the slide through the one alignment rule
    assert (meta["scale"], meta["translate"]) == layer_transform(0.25, 1.0, (oy, ox))
    for i, label_id in enumerate(meta["features"]["label"], start=1):
        original = np.argwhere(nuc.labels == label_id) + np.array(nuc.origin)
        back = np.argwhere(labels == i) + np.array([oy, ox])
        a = {tuple(p) for p in original}
        b = {tuple(p) for p in back}
        assert len(a & b) / len(a | b) > 0.9


def test_overview_png_dots_nuclei_too_small_to_outline(tmp_path: Path, monkeypatch, make_result):
    from PIL import Image

    result = make_result()  # nuclei ~10-14 level-0 px across; at max_side 16 about 1 px

    def no_tracing(*args, **kwargs):
        raise AssertionError("outlines traced for nuclei smaller than a pixel")

    monkeypatch.setattr(export._overview, "iter_label_polygons", no_tracing)
    path = export.render_overview_png(None, result, tmp_path / "dots.png", max_side=16)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    s = 16 / 256
    f = result.nuclei.features
    for _, row in f.iterrows():
        y = int((row["centroid_y"] + 0.5 - result.region.y0) * s)
        x = int((row["centroid_x"] + 0.5 - result.region.x0) * s)
        want = parse_color(result.nuclei.class_colors[int(row["class_id"])])
        assert img[y, x].tolist() == list(want), (row["label"], img[y, x], want)


def test_overview_png_shows_outlines_tint_and_legend(tmp_path: Path, make_result):
    from PIL import Image

    result = make_result()
    path = export.render_overview_png(FakeSlide(), result, tmp_path / "overview.png", max_side=128)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (96, 128)  # region 192 x 256 level-0 px, longer side 128
    red = (img[..., 0] > 200) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() > 10  # epithelial outlines drawn in their class colour
    big = export.render_overview_png(FakeSlide(), result, tmp_path / "big.png", max_side=1024)
    assert Image.open(big).size == (256, 192)  # never upsampled beyond level 0
