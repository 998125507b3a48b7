"""Screenshots of "Teach your own tile classes" on the real sample slide (quickstart).

Run under a display (``xvfb-run -a .venv/bin/python docs/images/make_teach_screenshots.py``).
It opens the packaged CMU-1-Small-Region.svs (skin) as ``histolens view`` does, analyses a
view with the embedded default model, then teaches three classes by painting a few cells
each on the "teach" layer (the same scripted clicks as ``tests/_qt/test_teach_dock.py``):

- ``teach_before.png``: the model's 8 colorectal classes on skin;
- ``teach_after.png``: the taught classes (dermis, epidermis, keratin), the Teach section open.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: View centre and height (level-0 px) and window size of the pictures.
VIEW_CENTER, VIEW_HEIGHT = (1536.0, 1280.0), 1100.0
WINDOW = (1440, 900)
#: Example cells per class on the slide's global grid of 32 um cells (row, col), read off the
#: sample: pink collagen of the dermis, the purple epidermis, the layered keratin of the cyst.
TEACH = {
    "dermis": ("#e377c2", [(19, 12), (21, 12), (23, 13), (25, 12), (27, 12), (29, 13), (31, 12)]),
    "epidermis": (
        "#9467bd",
        [(23, 18), (24, 19), (26, 18), (27, 19), (29, 19), (30, 20), (28, 18)],
    ),
    "keratin": ("#ffd700", [(21, 22), (22, 21), (23, 22), (24, 23), (26, 21), (27, 22), (20, 23)]),
}


def pump(app, seconds: float = 0.4) -> None:
    """Let Qt deliver events (debounced retrain, repaints) for about ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def wait_analysis(dock, app, timeout_s: float = 900.0) -> None:
    start = time.perf_counter()
    while dock.running and time.perf_counter() - start < timeout_s:
        app.processEvents()
        time.sleep(0.02)
    if dock.running:
        msg = f"analysis still running after {timeout_s:.0f} s"
        raise TimeoutError(msg)
    pump(app)


def look_at(viewer, dock, center_px, height_px) -> None:
    from histolens._qt._viewport import LayerFrame, level0_to_world

    frame = LayerFrame.from_layer(dock.slide_layer())
    viewer.scene.camera.center = level0_to_world(center_px, frame)
    viewer.scene.camera.zoom = viewer.canvas.size[0] / (height_px * frame.scale[0])


def open_and_analyse(model: str = "histolens-default", viewer=None):
    """Viewer (``viewer`` or a new one) + dock on the sample at :data:`WINDOW`, view analysed."""
    from qtpy.QtWidgets import QApplication

    from histolens._qt._launch import open_viewer

    viewer, dock = open_viewer(None, model=model, viewer=viewer)
    dock.device_combo.setCurrentText("cpu")
    viewer.window._qt_window.resize(*WINDOW)
    viewer.window._qt_window.show()
    app = QApplication.instance()
    pump(app)
    look_at(viewer, dock, VIEW_CENTER, VIEW_HEIGHT)
    pump(app)
    dock.analyze_view()
    wait_analysis(dock, app)
    return viewer, dock, app


def teach(dock, app, examples=TEACH) -> dict[str, list[tuple[int, int]]]:
    """Add the classes and paint their cells on the teach layer (one click per cell).

    Returns the painted cells per class as pixels of the analysed view's tile grid.
    """
    from histolens.teach import global_cells

    panel = dock.teach
    dock.sections["Teach tile classes"].expand()
    # all classes first: painting with one class only would (rightly) ask for a second one
    index = {name: panel.add_class(name, color) for name, (color, _cells) in examples.items()}
    layer = panel.layer()
    r0, c0 = global_cells(panel.base.tiles)
    painted: dict[str, list[tuple[int, int]]] = {}
    for name, (_color, cells) in examples.items():
        panel.select_class(index[name])
        painted[name] = []
        for r, c in cells:
            layer.paint((r, c), index[name] + 1)  # a click with the 1-cell brush
            painted[name].append((r - r0, c - c0))
        pump(app, 0.1)
    pump(app, 1.0)  # debounced retrain and repaint
    while dock.teach.busy:  # grouped CV in the background
        pump(app, 0.1)
    return painted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    viewer, dock, app = open_and_analyse()
    args.out.mkdir(parents=True, exist_ok=True)
    viewer.layers.selection.active = viewer.layers["tile classes"]
    for layer in viewer.layers:
        if layer.name.startswith("attention") or layer.name == "nuclei":
            layer.visible = False
    dock.opacity_sliders["tile classes"].setValue(45)
    pump(app)
    viewer.screenshot(str(args.out / "teach_before.png"), canvas_only=False)
    teach(dock, app)
    for title in ("Overlay opacity", "Review and export"):
        dock.sections[title].collapse()  # so the Teach section shows beside the map
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    # the "no examples yet" toasts of the first strokes would cover the map in the picture
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    pump(app, 1.0)
    viewer.screenshot(str(args.out / "teach_after.png"), canvas_only=False)
    clf = dock.teach.classifier
    print(f"taught {clf.class_names}, examples {clf.examples_per_class}, CV {clf.cv_accuracy}")
    for name in ("teach_before.png", "teach_after.png"):
        print(f"wrote {args.out / name}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
