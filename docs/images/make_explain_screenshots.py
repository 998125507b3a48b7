"""Render the quickstart's Explain-mode screenshots: one click on the real sample slide.

Run under a display (``xvfb-run -a .venv/bin/python docs/images/make_explain_screenshots.py``).
It opens the packaged CMU-1-Small-Region.svs as ``histolens view`` does, analyses a view with
the default model, hides the analysis overlays, switches Explain mode on, explains one spot
(what a click there does) and saves the whole window at 1440 x 900 and 1280 x 800
(``explain_click_1440x900.png``, ``explain_click_1280x800.png``). It prints the shares per
scale and the predictions it showed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _settle(app, seconds: float = 0.6) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def _wait(app, until, timeout_s: float = 600.0) -> None:
    start = time.perf_counter()
    while not until():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - start > timeout_s:
            msg = f"still waiting after {timeout_s:.0f} s"
            raise TimeoutError(msg)
    _settle(app)


def _frame_box(viewer, frame, box) -> None:
    """Camera on the widest window the token read (nothing is re-analysed)."""
    from histolens._qt._viewport import level0_to_world

    viewer.scene.camera.center = level0_to_world(
        ((box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2), frame
    )
    fit = min(viewer.canvas.size[0] / box.height, viewer.canvas.size[1] / box.width)
    viewer.scene.camera.zoom = fit / (1.1 * frame.scale[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs")
    parser.add_argument(
        "--point", type=int, nargs=2, default=(1008, 1272), help="level-0 y x to explain"
    )
    parser.add_argument(
        "--view", type=int, nargs=3, default=(1150, 1500, 1300), help="centre y, x and rows"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QScrollArea

    from histolens._qt._launch import open_viewer
    from histolens._qt._viewport import LayerFrame, level0_to_world

    viewer, dock = open_viewer(None)
    window = viewer.window._qt_window
    window.resize(1440, 900)
    window.show()
    app = QApplication.instance()
    _settle(app)
    frame = LayerFrame.from_layer(dock.slide_layer())
    cy, cx, rows = args.view
    viewer.scene.camera.center = level0_to_world((cy, cx), frame)
    viewer.scene.camera.zoom = viewer.canvas.size[0] / (rows * frame.scale[0])
    dock.analyze_view()
    _wait(app, lambda: not dock.running)
    for layer in viewer.layers:  # the explanation alone over the slide
        if layer.name.startswith("attention") or layer.name in ("nuclei", "tile classes"):
            layer.visible = False

    panel = dock.explain
    dock.sections["Explain a spot"].expand()  # collapsed by default, as a user finds it
    panel.toggle.setChecked(True)
    panel.explain_at(level0_to_world(tuple(args.point), frame))
    _wait(app, lambda: not panel.pending)
    expl = panel.explanation
    if expl is None:
        print("the click was refused (see the notification)", file=sys.stderr)
        return 1
    viewer.layers.selection.active = viewer.layers["explain windows"]
    scroll = dock.findChild(QScrollArea)
    args.out.mkdir(parents=True, exist_ok=True)
    dock_widget = viewer.window._dock_widgets["HistoLens"]
    for w, h in ((1440, 900), (1280, 800)):
        window.resize(w, h)
        _settle(app)
        # the review table needs ~340 px; napari's default dock width would clip it
        window.resizeDocks([dock_widget], [360], Qt.Horizontal)
        _settle(app)
        _frame_box(viewer, frame, expl.scales[-1].box)
        _settle(app)
        # scroll down to the Explain panel only (never sideways)
        bar = scroll.verticalScrollBar()
        bar.setValue(min(bar.maximum(), panel.mapTo(scroll.widget(), panel.rect().topLeft()).y()))
        scroll.horizontalScrollBar().setValue(0)
        _settle(app)
        viewer.screenshot(str(args.out / f"explain_click_{w}x{h}.png"), canvas_only=False)
    fov = expl.field_of_view_um()
    shares = ", ".join(f"scale {k} ({fov[k]:.0f} µm) {v:.0%}" for k, v in expl.shares().items())
    print(f"explained {expl.point} in {expl.seconds:.2f} s: {shares}")
    print(f"nucleus {expl.nucleus_type} {expl.nucleus_probability}; tissue {expl.tissue_class}")
    print(f"input block {expl.input_box.as_tuple()}, token {expl.token_box.as_tuple()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
