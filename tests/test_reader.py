"""napari reader and sample data: layer tuples checked with napari's models (no Qt)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histolens._reader import napari_get_reader
from histolens._sample_data import make_sample_slide
from histolens.layers import slide_to_layer_data
from histolens.slide import Slide, SlideError

napari = pytest.importorskip("napari")


def _add(layer_data):
    viewer = napari.components.ViewerModel()
    data, meta, kind = layer_data
    assert kind == "image"
    return viewer.add_image(data, **meta)


def test_svs_reader_gives_a_multiscale_layer_in_micrometres(wsi_dir: Path) -> None:
    reader = napari_get_reader(str(wsi_dir / "CMU-1-Small-Region.svs"))
    assert reader is not None
    layers = reader(str(wsi_dir / "CMU-1-Small-Region.svs"))
    assert len(layers) == 1
    layer = _add(layers[0])
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    assert str(layer.units[0]) == "micrometer"
    assert [tuple(s) for s in layer.level_shapes] == [
        (2967, 2220),
        (1483, 1110),
        (741, 555),
        (370, 277),
    ]
    meta = layer.metadata
    assert meta["path"] == str(wsi_dir / "CMU-1-Small-Region.svs")
    assert meta["mpp"] == pytest.approx(0.499) and meta["vendor"] == "aperio"
    assert isinstance(meta["slide"], Slide)
    # The facts are plain JSON (logs, provenance).
    json.dumps({k: v for k, v in meta.items() if k != "slide"})
    # World extent spans the level-0 pixel centres, 0 .. (n - 1) * mpp micrometres.
    extent = layer.extent.world
    np.testing.assert_allclose(extent[0], (0, 0))
    np.testing.assert_allclose(extent[1], (np.array([2967, 2220]) - 1) * 0.499)


def test_ome_reader_scale(wsi_dir: Path) -> None:
    path = wsi_dir / "OS-1-detail.ome.tif"
    layer = _add(napari_get_reader(str(path))(str(path))[0])
    np.testing.assert_allclose(layer.scale, (0.227, 0.227), atol=5e-4)


def test_sample_slide_layer() -> None:
    layer = napari.layers.Layer.create(*make_sample_slide()[0])
    assert layer.multiscale and layer.name == "CMU-1-Small-Region"
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))


def test_missing_mpp_gives_scale_one_and_a_warning() -> None:
    slide = Slide.from_array(np.zeros((600, 600, 3), np.uint8), name="plain")
    with pytest.warns(UserWarning, match="mpp"):
        data = slide_to_layer_data(slide)
    layer = _add(data)
    np.testing.assert_allclose(layer.scale, (1.0, 1.0))
    assert layer.multiscale and len(layer.data) == 2


def test_reader_declines_what_it_does_not_handle(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG")
    assert napari_get_reader(str(png)) is None
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 32, 32), np.uint16))
    assert napari_get_reader(str(stack)) is None  # napari's default reader takes stacks
    plain_dir = tmp_path / "folder"
    plain_dir.mkdir()
    assert napari_get_reader(str(plain_dir)) is None
    assert napari_get_reader([str(png), str(png)]) is None


def test_reader_accepts_lists_and_reports_bad_files(tmp_path: Path, wsi_dir: Path) -> None:
    paths = [str(wsi_dir / "CMU-1-Small-Region.svs"), str(wsi_dir / "OS-1-detail.ome.tif")]
    reader = napari_get_reader(paths)
    assert reader is not None and len(reader(paths)) == 2
    bad = tmp_path / "bad.svs"  # claimed by suffix, fails with a clear message
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(SlideError, match="bad.svs"):
        napari_get_reader(str(bad))(str(bad))


def test_geojson_opens_as_a_shapes_layer(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [30, 10], [30, 30], [10, 10]]]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": "tumor", "color": [255, 0, 0]},
        },
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    reader = napari_get_reader(str(path))
    assert reader is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = reader(str(path))
    assert layers and all(len(t) == 3 for t in layers)
    napari.layers.Layer.create(*layers[0])


def test_through_napari_with_the_repository_manifest(wsi_dir: Path) -> None:
    # Goes through npe2 and napari.yaml's python_names, as napari's File > Open does.
    npe2 = pytest.importorskip("npe2")
    manifest = Path(__file__).resolve().parents[1] / "napari.yaml"
    if not manifest.is_file():
        pytest.skip("napari.yaml is not beside the tests (installed package)")
    pm = npe2.PluginManager.instance()
    registered_here = False
    if "napari-histolens" not in pm._manifests:  # editable installs may not expose it
        pm.register(npe2.PluginManifest.from_file(manifest))
        registered_here = True
    try:
        viewer = napari.components.ViewerModel()
        path = str(wsi_dir / "CMU-1-Small-Region.svs")
        (layer,) = viewer.open(path, plugin="napari-histolens")
        assert layer.multiscale and layer.metadata["path"] == path
        np.testing.assert_allclose(layer.scale, (0.499, 0.499))
        (sample,) = viewer.open_sample("napari-histolens", "cmu1_small_region")
        assert sample.data[0].shape == (2967, 2220, 3)
    finally:
        if registered_here:
            pm.unregister("napari-histolens")
