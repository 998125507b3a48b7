"""The dock's Explain mode on a real Qt viewer (``xvfb-run -a``), the real sample slide and the
real default model: a click shows aligned "looked at" layers, replaces them on the next
click, bad clicks only notify, and leaving the mode removes everything."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

qtpy = pytest.importorskip("qtpy")
torch = pytest.importorskip("torch")
from qtpy.QtCore import QPoint, Qt  # noqa: E402

from histolens._qt import HistoLensWidget  # noqa: E402
from histolens._qt import _explain as explain_module  # noqa: E402
from histolens._qt._viewport import LayerFrame, level0_to_world  # noqa: E402
from histolens.region import Region  # noqa: E402
from histolens.slide._sample import sample_slide_path  # noqa: E402

TIMEOUT_MS = 120_000
#: Level-0 (y, x) the camera looks at: tumour glands in the middle of the sample slide.
CENTRE = (1040, 1552)


@pytest.fixture
def notes(record_notes):
    """Messages the Explain panel sends to napari notifications, by kind."""
    return record_notes(explain_module, ("error", "warning"))


@pytest.fixture
def analysed(make_napari_viewer, qtbot):
    """The sample slide opened by the plugin's reader, a ~250 px view analysed by the default
    model with the dock."""
    from napari.layers import Layer

    from histolens._qt._worker import preload_model_stack
    from histolens._reader import napari_get_reader

    torch.set_num_threads(2)
    preload_model_stack()
    viewer = make_napari_viewer()
    path = str(sample_slide_path())
    for data, meta, layer_type in napari_get_reader(path)(path):
        viewer.add_layer(Layer.create(data, meta, layer_type))
    dock = HistoLensWidget(viewer)
    viewer.window.add_dock_widget(dock, name="HistoLens")
    dock.device_combo.setCurrentText("cpu")
    frame = LayerFrame.from_layer(dock.slide_layer())
    viewer.scene.camera.center = level0_to_world(CENTRE, frame)
    viewer.scene.camera.zoom = viewer.canvas.size[0] / (250 * frame.scale[0])
    dock.analyze_view()
    qtbot.waitUntil(lambda: not dock.running, timeout=TIMEOUT_MS)
    assert dock.result is not None and dock.result.complete
    yield viewer, dock, frame
    qtbot.waitUntil(lambda: not dock.explain.pending, timeout=TIMEOUT_MS)
    dock.explain.set_active(False)


def _wait_explained(qtbot, panel):
    """Until the click's layers (or its notification) are shown on the main thread."""
    qtbot.waitUntil(lambda: not panel.pending, timeout=TIMEOUT_MS)


def _click_canvas_centre(viewer, qtbot):
    """A real left click in the middle of the canvas (world point = camera centre)."""
    native = viewer.window._qt_viewer.canvas.native
    centre = QPoint(native.width() // 2, native.height() // 2)
    qtbot.mouseClick(native, Qt.LeftButton, pos=centre)


def _edges(layer):
    """World (y0, x0), (y1, x1) of an image layer's pixel edges."""
    scale, translate = np.asarray(layer.scale), np.asarray(layer.translate)
    shape = np.asarray(layer.data.shape[:2])
    return translate - scale / 2, translate + scale * (shape - 0.5)


def test_explain_click_shows_aligned_layers_and_replaces_them(analysed, qtbot, notes):
    viewer, dock, frame = analysed
    panel = dock.explain
    assert not panel.active and panel._on_mouse not in viewer.mouse_drag_callbacks
    n_before = len(viewer.layers)
    panel.toggle.setChecked(True)
    assert panel._on_mouse in viewer.mouse_drag_callbacks
    _click_canvas_centre(viewer, qtbot)
    assert panel.pending or panel.explanation is not None  # the click reached Explain
    _wait_explained(qtbot, panel)
    assert not notes["error"] and not notes["warning"], notes
    expl = panel.explanation
    assert expl is not None
    names = sorted(lyr.name for lyr in panel.explain_layers())
    assert names == sorted(
        [
            "looked at (scale 1)",
            "looked at (scale 2)",
            "same scale",
            "explain windows",
        ]
    )
    # The clicked pixel lies in the analysed view and inside the explained token.
    y, x = (int(v) for v in expl.point)
    assert dock.result.region.contains(Region(y, x, y + 1, x + 1))
    assert expl.token_box.contains(Region(y, x, y + 1, x + 1))
    # Each heat layer covers its window's level-0 box on the slide layer, edge to edge.
    mpp = frame.scale[0]
    for w in expl.scales:
        layer = viewer.layers["same scale" if w.scale == 0 else f"looked at (scale {w.scale})"]
        lo, hi = _edges(layer)
        np.testing.assert_allclose(lo / mpp, np.array(w.box.origin) - 0.5, atol=1e-6)
        np.testing.assert_allclose(hi / mpp, np.array([w.box.y1, w.box.x1]) - 0.5, atol=1e-6)
        np.testing.assert_allclose(layer.data, w.heat(), rtol=1e-6)
    # Outlines: the clicked token first, then one window per scale, in level-0 px edges.
    outlines = viewer.layers["explain windows"]
    assert len(outlines.data) == 1 + len(expl.scales)
    for box, rect in zip(
        [expl.token_box, *(w.box for w in expl.scales)], outlines.data, strict=True
    ):
        np.testing.assert_allclose(rect.min(0) * outlines.scale / mpp, np.array(box.origin) - 0.5)
        np.testing.assert_allclose(rect.max(0) * outlines.scale / mpp, [box.y1 - 0.5, box.x1 - 0.5])
    # Dock read-out: one bar per scale (shares sum to 100 %), predictions from the result.
    bars = [panel._bars.itemAt(i).widget() for i in range(panel._bars.count())]
    assert len(bars) == 3 and abs(sum(b.value() for b in bars) - 1000) <= 2
    assert "tile class:" in panel.predictions.text() and "nucleus:" in panel.predictions.text()
    assert expl.tissue_class is not None

    # One head instead of the mean: same layers, other data.
    mean_same = viewer.layers["same scale"].data.copy()
    panel.head_spin.setValue(2)
    assert not np.allclose(viewer.layers["same scale"].data, mean_same)
    assert len(panel.explain_layers()) == 4

    # A second click replaces the layers' contents in place (never stacked).
    ids = {lyr.name: id(lyr) for lyr in panel.explain_layers()}
    r = dock.result.region
    other = level0_to_world((r.y0 + 5, r.x0 + 5), frame)
    panel.explain_at(other)
    _wait_explained(qtbot, panel)
    assert len(panel.explain_layers()) == 4 and len(viewer.layers) == n_before + 4
    assert panel.explanation is not expl and panel.explanation.token_box != expl.token_box
    assert {lyr.name: id(lyr) for lyr in panel.explain_layers()} == ids
    np.testing.assert_allclose(
        viewer.layers["same scale"].data, panel.explanation.scales[0].heat(2), rtol=1e-6
    )

    # Leaving Explain mode removes them and the click handler.
    panel.toggle.setChecked(False)
    assert panel.explain_layers() == [] and len(viewer.layers) == n_before
    assert panel._on_mouse not in viewer.mouse_drag_callbacks
    assert panel.predictions.text() == ""

    # A new analysis of the view prunes the explanation (it may no longer match); the panel
    # then waits for the next click.
    panel.toggle.setChecked(True)
    panel.explain_at(level0_to_world(CENTRE, frame))
    _wait_explained(qtbot, panel)
    assert len(panel.explain_layers()) == 4
    dock.analyze_view()  # same view: every tile comes from the cache
    qtbot.waitUntil(lambda: not dock.running, timeout=TIMEOUT_MS)
    assert panel.explain_layers() == [] and panel.explanation is None
    assert panel.status.text() == "click an analysed spot on the slide" and panel._bars.count() == 0


def test_bad_clicks_only_notify(analysed, qtbot, notes, monkeypatch):
    viewer, dock, frame = analysed
    panel = dock.explain
    panel.toggle.setChecked(True)
    panel.explain_at(level0_to_world(CENTRE, frame))
    _wait_explained(qtbot, panel)
    shown = [(lyr.name, id(lyr)) for lyr in viewer.layers]
    before = panel.explanation

    # A drag pans: the press-move-release reaches the handler but explains nothing.
    class _Drag:
        button, modifiers, type = 1, (), "mouse_press"
        position = level0_to_world(CENTRE, frame)

    drag = _Drag()
    steps = panel._on_mouse(viewer, drag)
    next(steps)
    drag.type, drag.position = "mouse_move", level0_to_world((CENTRE[0] + 80, CENTRE[1]), frame)
    next(steps)
    drag.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(steps)
    assert not panel.pending and panel.explanation is before

    assert panel.explain_at(level0_to_world((-50, 100), frame)) is None
    assert "outside the slide" in notes["warning"][-1]
    assert panel.explain_at(level0_to_world((100, 100), frame)) is None  # slide, not analysed
    assert "not analysed" in notes["warning"][-1]

    # A model without cross-scale attention (a plain ViT): a notification, nothing else.
    from histolens.models import create_model

    vit = create_model("pluto-s16", device="cpu")
    key = (dock.result.provenance.model_name, "cpu")
    monkeypatch.setitem(dock._models._models, key, vit)
    panel.explain_at(level0_to_world(CENTRE, frame))
    _wait_explained(qtbot, panel)
    assert "no cross-scale attention" in notes["warning"][-1]
    assert not notes["error"], notes["error"]
    assert [(lyr.name, id(lyr)) for lyr in viewer.layers] == shown
    assert panel.explanation is before


def test_click_before_any_analysis_asks_to_analyse(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    dock = HistoLensWidget(viewer)
    assert dock.explain.explain_at((10.0, 10.0)) is None
    assert "Analyze view" in notes["warning"][-1]
    assert len(viewer.layers) == 0
