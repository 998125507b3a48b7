"""The dock stays readable in 1440 x 900 and 1280 x 800 windows (run under ``xvfb-run -a``).

Every section is expanded and the review panel holds a full result (4 nucleus types, 8 tile
classes); then no control may reach past the dock's right edge or overlap another one.
Screenshots of the whole dock content go to ``HISTOLENS_SCREENSHOTS`` (default: tmp_path).
"""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histolens.models._zoo import CONSEP_TYPES, KATHER_CLASSES
from histolens.region import Region
from histolens.result import NUCLEI_COLUMNS, NucleiResult, Provenance, RegionResult, TileClassResult

pytestmark = pytest.mark.gui
qtpy = pytest.importorskip("qtpy")
from qtpy.QtCore import QPoint, QRect  # noqa: E402
from qtpy.QtWidgets import (  # noqa: E402
    QAbstractButton,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QLabel,
    QListWidget,
    QProgressBar,
    QSlider,
    QTableWidget,
)

from histolens._qt import HistoLensWidget  # noqa: E402

LEAVES = (
    QLabel,
    QAbstractButton,
    QAbstractSpinBox,
    QComboBox,
    QSlider,
    QProgressBar,
    QListWidget,
    QTableWidget,
)
TYPES = CONSEP_TYPES  # the default model's vocabulary: the longest names it shows
TISSUE = KATHER_CLASSES


def full_result() -> RegionResult:
    """A result with every legend row filled (counts of four digits, long class names)."""
    rng = np.random.default_rng(0)
    n = 1200
    feats = pd.DataFrame(
        {
            "label": np.arange(1, n + 1, dtype=np.uint32),
            "centroid_y": rng.uniform(0, 2048, n),
            "centroid_x": rng.uniform(0, 2048, n),
            "area_um2": rng.uniform(10, 80, n),
            "class_id": rng.integers(0, 4, n).astype(np.int32),
            "probability": rng.uniform(0.5, 1, n).astype(np.float32),
        }
    )
    feats["class_name"] = [TYPES[i] for i in feats["class_id"]]
    nuclei = NucleiResult(
        np.zeros((512, 512), np.uint32), feats[list(NUCLEI_COLUMNS)], 4.0, (0.0, 0.0), TYPES,
        ("#ffa500", "#ff0000", "#00ff00", "#0000ff"),
    )  # fmt: skip
    classes = rng.integers(0, 9, (32, 32)).astype(np.int32)
    tiles = TileClassResult(
        classes, np.zeros((32, 32, 8), np.float32), None, 64.0, (0.0, 0.0), TISSUE,
        tuple(f"#{v:06x}" for v in rng.integers(0, 2**24, 8)),
    )  # fmt: skip
    region = Region(0, 0, 2048, 2048)
    prov = Provenance(
        slide_path="", slide_name="s", region=region, level=0, level_downsample=1.0,
        slide_mpp=0.499, mpp_source="slide", analysis_mpp=0.5, model_name="histolens-default",
        model_card={}, device="cpu", precision="fp32", started="", tiles_total=24, tiles_done=24,
    )  # fmt: skip
    return RegionResult(region, 0.5, nuclei, tiles, [], prov)


def _leaf_rects(inner) -> list[tuple[object, QRect]]:
    rects = []
    for w in inner.findChildren(LEAVES):
        if not w.isVisibleTo(inner) or isinstance(w.parent(), (QComboBox, QAbstractSpinBox)):
            continue
        if any(isinstance(p, (QTableWidget, QListWidget)) for p in _ancestors(w, inner)):
            continue
        rects.append((w, QRect(w.mapTo(inner, QPoint(0, 0)), w.size())))
    return rects


def _ancestors(w, stop):
    p = w.parentWidget()
    while p is not None and p is not stop:
        yield p
        p = p.parentWidget()


@pytest.mark.parametrize("window", [(1440, 900), (1280, 800)])
def test_dock_fits_without_clipping_or_overlap(make_napari_viewer, qtbot, tmp_path, window):
    viewer = make_napari_viewer(show=True)
    dock = HistoLensWidget(viewer)
    viewer.window.add_dock_widget(dock, name="HistoLens", area="right")
    viewer.window._qt_window.resize(*window)
    for section in dock.sections.values():
        section.expand()
    dock.review.show_result(full_result())
    dock.teach.add_class("a rather long class name")
    dock.teach.add_class("dermis")
    for _ in range(10):
        QApplication.processEvents()
    scroll = dock.findChild(qtpy.QtWidgets.QScrollArea)
    inner = scroll.widget()
    width = scroll.viewport().width()
    out = Path(os.environ.get("HISTOLENS_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    inner.grab().save(str(out / f"dock_{window[0]}x{window[1]}.png"))
    viewer.window._qt_window.grab().save(str(out / f"window_{window[0]}x{window[1]}.png"))
    assert inner.width() <= width, f"dock content {inner.width()} px wider than {width} px"
    rects = _leaf_rects(inner)
    assert len(rects) > 30
    clipped = [
        type(w).__name__ + ":" + getattr(w, "text", str)() for w, r in rects if r.right() >= width
    ]
    assert not clipped, f"cut off at the right ({width} px): {clipped}"
    overlapping = [
        (getattr(a, "text", str)(), getattr(b, "text", str)())
        for (a, ra), (b, rb) in combinations(rects, 2)
        if ra.intersects(rb) and a not in _ancestors(b, inner) and b not in _ancestors(a, inner)
    ]
    assert not overlapping, f"overlapping controls: {overlapping[:5]}"
    cut = [
        w.text()
        for w, _r in rects
        if isinstance(w, QLabel)
        and w.text()
        and (
            w.height() < w.heightForWidth(w.width())
            if w.wordWrap()
            else w.width() < w.sizeHint().width()
        )
    ]
    assert not cut, f"labels too small for their text: {cut}"
