"""Teaching tile classes in the dock, end to end, on the real sample with the real default model.

Run under ``xvfb-run -a``. The scenario (view, classes, example cells) is the one that makes
the quickstart's screenshots, ``docs/images/make_teach_screenshots.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui  # ~10-60 s; in the default run: it is the feature's real path
pytest.importorskip("qtpy")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "images" / "make_teach_screenshots.py"


def _scenario():
    spec = importlib.util.spec_from_file_location("make_teach_screenshots", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _map(dock) -> np.ndarray:
    layer = next(
        lyr for lyr in dock.viewer.layers if lyr.metadata.get("histolens_overlay") == "tile classes"
    )
    return np.asarray(layer.data).copy()


def test_teach_three_classes_undo_save_load_and_batch(make_napari_viewer, qtbot, tmp_path):
    import torch

    torch.set_num_threads(2)
    scenario = _scenario()
    viewer, dock, app = scenario.open_and_analyse(viewer=make_napari_viewer(show=True))
    model_names = dock.result.tiles.class_names
    painted = scenario.teach(dock, app)
    panel = dock.teach
    qtbot.waitUntil(lambda: panel.classifier is not None, timeout=10_000)
    names = tuple(scenario.TEACH)
    assert panel.classifier.class_names == names
    assert panel.classifier.examples_per_class == (7, 7, 7)

    # The tile layer, legend and exported result show the taught classes.
    shown = dock.result.tiles
    assert shown.class_names == names and model_names != names
    taught_map = _map(dock)
    np.testing.assert_array_equal(taught_map, shown.classes)
    for k, name in enumerate(names):
        for cell in painted[name]:
            assert taught_map[cell] == k + 1, (name, cell, taught_map[cell])
    legend = [row[0] for row in dock.review.tile_legend.rows]
    assert legend[:3] == list(names) and legend[3:] in ([], ["unsure"])
    assert len(np.unique(taught_map[taught_map > 0])) == 3

    # napari's own undo removes the last example; redo brings it back.
    teach_layer = panel.layer()
    r, c = scenario.TEACH["keratin"][1][-1]
    teach_layer.undo()
    qtbot.waitUntil(lambda: panel.classifier.examples_per_class == (7, 7, 6), timeout=10_000)
    assert teach_layer.data[r, c] == 0
    teach_layer.redo()
    qtbot.waitUntil(lambda: panel.classifier.examples_per_class == (7, 7, 7), timeout=10_000)
    np.testing.assert_array_equal(_map(dock), taught_map)

    # A cell marked outside the analysed view: just its tiles are analysed, then it joins.
    outside = (42, 15)  # dermis below the view
    r0, c0 = (int(round(v / shown.cell)) for v in shown.origin)
    assert not (0 <= outside[0] - r0 < shown.classes.shape[0])
    panel.select_class(0)
    teach_layer.paint(outside, 1)
    qtbot.waitUntil(lambda: panel.classifier.examples_per_class == (8, 7, 7), timeout=180_000)
    assert outside in panel._embeddings and not panel._pending
    taught_map = _map(dock)

    # Save, switch back to the model's classes, load: the same map.
    saved = panel.save_classifier(str(tmp_path / "skin.safetensors"))
    assert saved is not None and (tmp_path / "skin.card.json").is_file()
    panel.deactivate()
    assert dock.result.tiles.class_names == model_names
    assert panel.load_classifier(saved) is not None
    np.testing.assert_array_equal(_map(dock), taught_map)

    # The command line's batch with --tile-classifier gives the same classes on that region.
    from histolens.batch import BatchOptions, run_batch

    base = panel.base
    got = {}
    options = BatchOptions(
        region=base.region, tasks=("tiles",), tile_classifier=saved, formats=("csv",),
        progress=False,
    )  # fmt: skip
    outcomes = run_batch(
        [base.provenance.slide_path], tmp_path / "batch", options,
        on_result=lambda _p, r: got.setdefault("r", r),
    )  # fmt: skip
    assert outcomes[0].ok, outcomes[0].error
    tiles = got["r"].tiles
    assert tiles.class_names == names and tiles.origin == shown.origin
    both = (tiles.classes > 0) & (taught_map > 0)
    assert both.sum() > 0.8 * (taught_map > 0).sum()
    np.testing.assert_array_equal(tiles.classes[both], taught_map[both])

    # Rename and recolour keep the fitted weights and redraw; the model's classes can seed the list.
    panel.rename_class(0, "collagen")
    panel.recolour_class(0, "#00ffff")
    assert dock.result.tiles.class_names[0] == "collagen"
    assert dock.result.tiles.class_colors[0] == "#00ffff"
    np.testing.assert_array_equal(_map(dock), taught_map)
    panel.start_from_model()
    assert panel.names == ["collagen", "epidermis", "keratin", *model_names]
    panel.delete_class(3)
    assert len(panel.names) == 3 + len(model_names) - 1
