"""The HistoLens dock on a real Qt viewer (run under ``xvfb-run -a``).

The real CMU-1-Small-Region.svs is opened through the plugin's reader, the dock analyses
the view with the fast ``test-tiny`` model, and the overlays must sit on the analysed region.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from histolens.region import Region

pytestmark = pytest.mark.gui

qtpy = pytest.importorskip("qtpy")
from qtpy.QtCore import Qt  # noqa: E402

from histolens._qt import HistoLensWidget  # noqa: E402
from histolens._qt import _widget as widget_module  # noqa: E402
from histolens._qt._viewport import (  # noqa: E402
    CameraState,
    LayerFrame,
    level0_to_world,
    view_region,
)

TIMEOUT_MS = 90_000


@pytest.fixture
def cmu_path(wsi_dir: Path) -> Path:
    path = wsi_dir / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is absent (real Aperio sample from ../shared/data/wsi)")
    return path


def _open_with_plugin_reader(viewer, path: Path):
    """Add the layers the HistoLens reader contribution returns for ``path``."""
    reader_mod = pytest.importorskip("histolens._reader")
    from napari.layers import Layer

    reader = reader_mod.napari_get_reader(str(path))
    assert reader is not None, f"the HistoLens reader refused {path}"
    added = []
    for data, meta, layer_type in reader(str(path)):
        added.append(viewer.add_layer(Layer.create(data, meta, layer_type)))
    return added


@pytest.fixture
def notes(record_notes):
    """Messages the dock sends to napari notifications, by kind."""
    return record_notes(widget_module, ("error", "warning", "info"))


class _DarkNucleiModel:
    """The real test-tiny model with a deterministic nucleus map: dark (haematoxylin) pixels.

    test-tiny is untrained and finds no nuclei on the sample, which would leave the nuclei
    layer, its features and the review table untested. This stand-in keeps the real card,
    tile/attention outputs and the engine's post-processing; ``delay`` (s per batch) lets a
    cancel land mid-run.
    """

    def __init__(self, model, delay: float = 0.0):
        self._model = model
        self.card = model.card
        self.device = model.device
        self.delay = delay

    def predict_tiles(self, tiles, **kwargs):
        if self.delay:
            time.sleep(self.delay)
        out = self._model.predict_tiles(tiles, **kwargs)
        if "nuclei_prob" in out:
            grey = tiles.astype(np.float32).mean(-1) / 255.0
            out["nuclei_prob"] = np.clip((0.55 - grey) * 6.0, 0.0, 1.0).astype(np.float32)
            out["hv"] = np.zeros_like(out["hv"])
        return out


@pytest.fixture
def dock(make_napari_viewer, cmu_path, qtbot):
    models = pytest.importorskip("histolens.models")
    if "test-tiny" not in models.list_models():
        pytest.skip("the test-tiny model is not registered")
    # what the dock does on its first click, here before create_model below (see its doc)
    from histolens._qt._worker import preload_model_stack

    preload_model_stack()
    viewer = make_napari_viewer()
    layers = _open_with_plugin_reader(viewer, cmu_path)
    widget = HistoLensWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoLens")
    widget.select_model("test-tiny")
    widget.device_combo.setCurrentText("cpu")
    tiny = models.create_model("test-tiny", device="cpu")
    widget._models._models[("test-tiny", "cpu")] = _DarkNucleiModel(tiny)
    assert widget.slide_layer() is layers[0]
    yield viewer, widget
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _look_at(viewer, layer, center_px, height_px):
    """Camera on level-0 pixel ``center_px`` showing about ``height_px`` level-0 rows."""
    frame = LayerFrame.from_layer(layer)
    viewer.scene.camera.center = level0_to_world(center_px, frame)
    h = viewer.canvas.size[0]
    viewer.scene.camera.zoom = h / (height_px * frame.scale[0])
    return view_region(CameraState.from_viewer(viewer), frame)


def _world_box(layer):
    """World ``(y0, x0, y1, x1)`` covered by a 2D overlay's pixels (edges, not centres)."""
    scale, translate = np.asarray(layer.scale), np.asarray(layer.translate)
    shape = np.asarray(layer.data.shape[:2])
    lo = translate - scale / 2
    hi = translate + scale * (shape - 0.5)
    return lo, hi, scale


def _check_on_region(layer, region, mpp):
    """The overlay covers exactly the analysed level-0 box, to within one of its pixels."""
    lo, hi, scale = _world_box(layer)
    want_lo = (np.array(region.origin) - 0.5) * mpp
    want_hi = (np.array([region.y1, region.x1]) - 0.5) * mpp
    assert np.all(np.abs(lo - want_lo) <= scale + 1e-6), (layer.name, lo, want_lo)
    assert np.all(hi >= want_hi - scale - 1e-6), (layer.name, hi, want_hi)
    assert np.all(hi <= want_hi + scale + 1e-6), (layer.name, hi, want_hi)


def test_analyze_view_puts_aligned_overlays_on_the_view(dock, qtbot, notes):
    viewer, widget = dock
    slide_layer = widget.slide_layer()
    mpp = float(slide_layer.scale[-1])
    assert mpp == pytest.approx(0.499, abs=1e-3)
    expected = _look_at(viewer, slide_layer, (1100, 1500), 300)
    assert not expected.is_empty

    qtbot.mouseClick(widget.analyze_button, Qt.LeftButton)
    assert widget.analyze_button.text() == "Cancel"
    assert widget.region() == expected  # exactly the box on screen
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert not notes["error"], notes["error"]
    assert widget.analyze_button.text() == "Analyze view"
    result = widget.result
    assert result is not None and result.complete
    assert widget.progress.value() == widget.progress.maximum() == result.tiles_total

    names = [layer.name for layer in viewer.layers]
    assert "nuclei" in names and "tile classes" in names
    attention = [n for n in names if n.startswith("attention s")]
    assert attention, names

    nuclei = viewer.layers["nuclei"]
    labels = np.unique(np.asarray(nuclei.data))
    labels = labels[labels != 0]
    assert len(nuclei.features) == len(labels) == result.nuclei.count
    assert set(nuclei.features["index"]) == set(labels.tolist())
    for name in ["nuclei", "tile classes", *attention]:
        _check_on_region(viewer.layers[name], expected, mpp)

    assert len(labels) > 5, "the dark-pixel nucleus map should find nuclei in this view"
    # A nucleus drawn by the Labels layer sits at its features centroid on the slide.
    row = nuclei.features.iloc[int(np.argmax(nuclei.features["area_um2"]))]
    ys, xs = np.nonzero(np.asarray(nuclei.data) == int(row["index"]))
    world = np.asarray(nuclei.translate) + np.asarray(nuclei.scale) * [ys.mean(), xs.mean()]
    frame = LayerFrame.from_layer(slide_layer)
    want = level0_to_world((row["centroid_y"], row["centroid_x"]), frame)
    assert np.allclose(world, want, atol=float(nuclei.scale[0]) + 1e-6)
    # Hovering that nucleus: napari's status line carries its class, area and probability.
    k = len(ys) // 2
    inside = np.asarray(nuclei.translate) + np.asarray(nuclei.scale) * [ys[k], xs[k]]
    status = nuclei.get_status(inside, world=True)["coordinates"]
    assert f"class_name: {row['class_name']}" in status
    assert "area_um2" in status and "probability" in status

    # Review: counts, histogram and the table; clicking a row centres the camera on it.
    summary = widget.review.summary
    assert summary.n_nuclei == len(labels)
    assert sum(c.count for c in summary.nuclei_by_class) == len(labels)
    assert int(widget.review.histogram.counts.sum()) == len(labels)
    table = widget.review.table
    assert table.rowCount() == min(len(labels), 5000)
    widget.review._on_cell_clicked(3, 0)
    y = float(table.item(3, 4).data(Qt.DisplayRole))
    x = float(table.item(3, 5).data(Qt.DisplayRole))
    center = viewer.scene.camera.center[-2:]
    assert np.allclose(center, (y * mpp, x * mpp), atol=0.1 * mpp)
    assert str(result.nuclei.count) in widget.review.header.text()

    # Re-analysing another view updates the same layers instead of stacking new ones.
    before = {layer.name: id(layer) for layer in viewer.layers}
    second = _look_at(viewer, slide_layer, (600, 900), 200)
    widget.analyze_view()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert not notes["error"], notes["error"]
    assert {layer.name: id(layer) for layer in viewer.layers} == before
    for name in ["nuclei", "tile classes", *attention]:
        _check_on_region(viewer.layers[name], second, mpp)


def test_cancel_midway_leaves_consistent_ui_and_layers(dock, qtbot, notes):
    viewer, widget = dock
    widget._models._models[("test-tiny", "cpu")].delay = 0.3
    viewer.reset_view()  # the whole slide: many tiles
    widget.analyze_view()
    assert widget.analyze_button.text() == "Cancel"
    qtbot.waitUntil(lambda: widget.progress.value() >= 1, timeout=TIMEOUT_MS)
    qtbot.mouseClick(widget.analyze_button, Qt.LeftButton)  # "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)

    assert not notes["error"], notes["error"]
    assert widget.analyze_button.text() == "Analyze view"
    result = widget.result
    assert result is not None
    assert not result.complete and result.provenance.cancelled
    assert 0 < result.tiles_done < result.tiles_total
    assert "cancelled" in widget.status.text()
    nuclei = viewer.layers["nuclei"]
    labels = np.unique(np.asarray(nuclei.data))
    # The layer shows exactly the result the review panel describes.
    assert len(nuclei.features) == len(labels[labels != 0]) == result.nuclei.count
    assert widget.review.summary is not None
    assert widget.review.summary.n_nuclei == result.nuclei.count
    assert widget.review.summary.tiles_done == result.tiles_done
    # and a new analysis starts cleanly afterwards
    widget._models._models[("test-tiny", "cpu")].delay = 0.0
    _look_at(viewer, widget.slide_layer(), (1100, 1500), 256)
    widget.analyze_view()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.result.complete


def test_live_mode_debounces_and_latest_view_wins(dock, qtbot, notes):
    viewer, widget = dock
    layer = widget.slide_layer()
    _look_at(viewer, layer, (800, 800), 256)
    stamp0 = widget.runner.stamp
    widget.live_box.setChecked(True)  # analyses the current view at once
    assert widget.runner.stamp == stamp0 + 1
    # A burst of camera moves inside the debounce window -> a single new request. (Moves
    # are back to back: on a loaded 2-core machine a worker can stall the event loop past
    # the debounce between spaced-out moves, which would rightly count as two views.)
    start = time.perf_counter()
    for i in range(5):
        frame = LayerFrame.from_layer(layer)
        viewer.scene.camera.center = level0_to_world((900 + 40 * i, 1200), frame)
    assert time.perf_counter() - start < widget_module.LIVE_DEBOUNCE_MS / 1000
    final_view = view_region(CameraState.from_viewer(viewer), LayerFrame.from_layer(layer))
    qtbot.waitUntil(lambda: widget.runner.stamp == stamp0 + 2, timeout=5_000)
    qtbot.wait(widget_module.LIVE_DEBOUNCE_MS + 200)
    assert widget.runner.stamp == stamp0 + 2
    assert widget.region() == final_view
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert not notes["error"], notes["error"]
    assert widget.result is not None and widget.result.region == final_view
    widget.live_box.setChecked(False)


def test_form_changes_during_a_run_do_not_reach_the_running_request(dock, qtbot, notes):
    viewer, widget = dock
    widget._models._models[("test-tiny", "cpu")].delay = 0.3
    _look_at(viewer, widget.slide_layer(), (1100, 1500), 256)
    request = widget.analyze_view()
    assert request is not None and widget.running
    # edits that would fail (no CUDA here) or drop the nuclei if the worker read the form
    widget.device_combo.setCurrentText("cuda")
    widget.controls.task_boxes["nuclei"].setChecked(False)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert not notes["error"], notes["error"]
    assert widget.runner.request is request
    assert (request.device, request.tasks) == ("cpu", ("nuclei", "tiles", "attention"))
    result = widget.result
    assert result.complete and result.region == request.region
    assert result.provenance.device == "cpu" and result.nuclei is not None
    widget.device_combo.setCurrentText("cpu")


def test_a_new_view_supersedes_the_running_one_through_the_runner(dock, qtbot, notes):
    viewer, widget = dock
    widget._models._models[("test-tiny", "cpu")].delay = 0.3
    shown = []
    widget.runner.result_ready.connect(lambda result, _final: shown.append(result.region))
    first = widget.analyze_view()  # the view at open: the whole sample, many tiles
    qtbot.waitUntil(lambda: widget.progress.value() >= 1, timeout=TIMEOUT_MS)
    second_view = _look_at(viewer, widget.slide_layer(), (1100, 1500), 256)
    second = widget.analyze_view()
    assert first.cancel.is_set() and second.stamp == first.stamp + 1
    shown.clear()  # from here on, nothing of the first request may arrive
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    qtbot.wait(500)  # the first worker's last signals, had they not been dropped
    assert not notes["error"], notes["error"]
    assert shown and set(shown) == {second_view}
    assert widget.result.region == second_view and widget.result.complete
    assert widget.status.text().startswith("complete")
    mpp = float(widget.slide_layer().scale[-1])
    for name in ("nuclei", "tile classes"):
        _check_on_region(viewer.layers[name], second_view, mpp)


def test_errors_become_notifications(dock, qtbot, notes):
    viewer, widget = dock
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to provoke a device error")
    _look_at(viewer, widget.slide_layer(), (1000, 1000), 256)
    widget.device_combo.setCurrentText("cuda")
    widget.analyze_view()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.analyze_button.text() == "Analyze view"
    assert notes["error"] and "could not analyse" in notes["error"][0]


def test_image_without_mpp_asks_for_the_override(make_napari_viewer, qtbot, notes):
    models = pytest.importorskip("histolens.models")
    if "test-tiny" not in models.list_models():
        pytest.skip("the test-tiny model is not registered")
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), name="plain")
    widget = HistoLensWidget(viewer)
    assert "override" in widget.mpp_label.text()
    assert widget.analyze_view() is None
    assert notes["warning"] and "mpp override" in notes["warning"][0]
    assert widget.analyze_button.text() == "Analyze view"

    # With the override, the analysis runs and its overlays land on the uncalibrated
    # (scale 1, world = level-0 pixels) layer, not at micrometre coordinates.
    widget.mpp_spin.setValue(0.5)
    widget.select_model("test-tiny")
    widget.device_combo.setCurrentText("cpu")
    viewer.reset_view()
    request = widget.analyze_view()
    assert request is not None and request.region == Region(0, 0, 300, 400)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert not notes["error"], notes["error"]
    assert widget.result.provenance.mpp_source == "user"
    for name in ("nuclei", "tile classes"):
        _check_on_region(viewer.layers[name], request.region, 1.0)


def test_export_writes_the_shown_result(dock, qtbot, tmp_path, notes):
    viewer, widget = dock
    _look_at(viewer, widget.slide_layer(), (1100, 1500), 256)
    widget.analyze_view()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    worker = widget.export_to(str(tmp_path / "out"))
    assert worker is not None
    qtbot.waitUntil(lambda: widget.export_button.isEnabled(), timeout=TIMEOUT_MS)
    assert not notes["error"], notes["error"]
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert "summary.json" in written and "nuclei.csv" in written


def test_view_command_opens_the_slide_with_the_dock(make_napari_viewer, cmu_path):
    from histolens._qt._launch import open_viewer

    viewer, dock = open_viewer(cmu_path, model="test-tiny", viewer=make_napari_viewer())
    assert dock.slide_layer() is viewer.layers[0]
    assert dock.model_combo.currentText() == "test-tiny"
    assert viewer.layers[0].multiscale
    assert viewer.layers[0].scale[-1] == pytest.approx(0.499, abs=1e-3)
    with pytest.raises(ValueError, match="unknown model"):
        open_viewer(cmu_path, model="no-such-model", viewer=make_napari_viewer())


def test_untrained_models_are_hidden_but_selectable_by_name_with_a_warning(
    make_napari_viewer, notes
):
    from histolens.models import list_models

    widget = HistoLensWidget(make_napari_viewer())
    shown = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert shown == list_models(trained=True)
    widget.select_model("atlas-small")
    assert widget.model_combo.currentText() == "atlas-small"
    assert notes["warning"] and "no trained weights" in notes["warning"][-1]
    with pytest.raises(ValueError, match="unknown model"):
        widget.select_model("no-such-model")
