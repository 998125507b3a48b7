"""Teach speed: from a change of example cells to the re-painted tile layer, against the analysis.

Run under a display: ``xvfb-run -a python benchmarks/teach_speed.py [--threads 1]``.

1. Analyses a 2048 x 2048 level-0 px view of the sample slide (CMU-1-Small-Region, 0.499
   um/px: 32 x 32 cells of 32 um) with the default model and all dock tasks, cold cache:
   the *first analysis* time.
2. Shows it in the real dock, teaches 3 classes (7 cells each), then times ``changes`` edits
   of the examples (one cell added or erased each) from the edit on the "teach" layer to the
   re-painted "tile classes" layer: the dock's own sync (examples, probe fit, re-classify,
   layer + legend update) and Qt drawing it. The 300 ms debounce that waits for the end of
   a brush stroke is not included (it is a wait, not work).
3. Writes a classifier for 384-wide embeddings and 20 classes and reports its size.

Prints one line per figure, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGION = (800, 100, 2848, 2148)  # level-0 (y0, x0, y1, x1): tissue from top to bottom


def classifier_file_bytes(dim: int = 384, n_classes: int = 20) -> int:
    import numpy as np

    from histolens.teach import TileClassifier, classifier_paths

    rng = np.random.default_rng(0)
    clf = TileClassifier(
        tuple(f"class {i}" for i in range(n_classes)), ("#123456",) * n_classes,
        rng.normal(size=(n_classes, dim)).astype(np.float32), np.zeros(n_classes, np.float32),
        "some-backbone", "0" * 64, (10,) * n_classes, cv_accuracy=0.9, created="2026-01-01",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        weights, card = classifier_paths(clf.save(Path(tmp) / "c"))
        return weights.stat().st_size + card.stat().st_size


def time_changes(panel, app, toggle, changes: int, *, profile: bool = False) -> list[float]:
    """Seconds from each edit of the teach layer to the re-painted, drawn tile layer."""
    layer = panel.layer()
    # cells to toggle (global grid): dermis cells beside the taught ones, added then erased
    extra = [(r, c + 1) for r, c in toggle]
    times = []
    for i in range(changes):
        cell = extra[i % len(extra)]
        value = 0 if layer.data[cell] else 1
        t0 = time.perf_counter()
        layer.paint(cell, value)  # 0 erases
        panel.sync()
        app.processEvents()  # Qt draws the re-painted layer
        times.append(time.perf_counter() - t0)
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for i in range(4):
            layer.paint(extra[i % len(extra)], 0 if layer.data[extra[i % len(extra)]] else 1)
            panel.sync()
            app.processEvents()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of 4 changes")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "docs" / "images"))
    import make_teach_screenshots as scenario

    from histolens._qt._launch import open_viewer
    from histolens._qt._viewport import LayerFrame
    from histolens.inference import analyze_region
    from histolens.region import Region

    viewer, dock = open_viewer(None, model="histolens-default")
    viewer.window._qt_window.resize(1440, 900)
    viewer.window._qt_window.show()
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    scenario.pump(app)
    slide = dock._slide(dock.slide_layer())
    t0 = time.perf_counter()
    result = analyze_region(slide, Region(*REGION), model="histolens-default", cache=False)
    first = time.perf_counter() - t0
    tiles = result.tiles
    print(
        f"first analysis of the {REGION[2] - REGION[0]} x {REGION[3] - REGION[1]} px view: "
        f"{first:.2f} s ({tiles.classes.size} cells, {int((tiles.classes > 0).sum())} on tissue)"
    )
    dock._frame = LayerFrame.from_layer(dock.slide_layer())
    dock._show(result, final=True)
    scenario.pump(app)
    scenario.teach(dock, app)
    panel = dock.teach
    times = time_changes(
        panel, app, scenario.TEACH["dermis"][1], args.changes, profile=args.profile
    )
    median, worst = statistics.median(times), max(times)
    size = classifier_file_bytes()
    print(
        f"example change -> re-painted tile layer: median {median * 1000:.0f} ms, max {worst * 1000:.0f} ms over {len(times)} changes"
    )
    print(f"ratio to the first analysis: {median / first:.4f} (1/{first / median:.0f})")
    print(f"classifier file, 384-wide embeddings, 20 classes: {size} bytes")
    report = {
        "threads": args.threads,
        "view_px": [REGION[2] - REGION[0], REGION[3] - REGION[1]],
        "cells": int(tiles.classes.size),
        "first_analysis_s": round(first, 3),
        "teach_change_median_s": round(median, 4),
        "teach_change_max_s": round(worst, 4),
        "ratio_median_to_first_analysis": round(median / first, 5),
        "classifier_bytes_384x20": size,
    }
    print(json.dumps(report))
    while panel.busy:  # let the background grouped CV end before closing
        scenario.pump(app, 0.1)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
