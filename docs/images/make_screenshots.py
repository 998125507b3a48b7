"""Render the README/quickstart screenshots of the HistoLens dock on the real sample slide.

Run under a display (``xvfb-run -a .venv/bin/python docs/images/make_screenshots.py``). It
opens the packaged CMU-1-Small-Region.svs exactly as ``histolens view`` does, analyses two
views with the dock and saves what napari rendered (``viewer.screenshot``):

- ``dock_analyze_view.png``: the whole window, overlays on a ~700 px wide view, dock + review;
- ``nuclei_zoom.png``: canvas only, zoomed on the epithelium, nuclei outlined by class;
- ``attention_s0.png``: canvas only, the finest attention map over the tissue.

The model is the embedded default when its weights are built, else ``test-tiny`` (whose
outputs are untrained: the pictures then show layout and alignment, not pathology).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _default_model() -> str:
    from histolens.models import create_model

    try:
        return create_model().card.name
    except Exception as exc:  # noqa: BLE001 (report and fall back, this is a docs script)
        print(f"default model unavailable ({type(exc).__name__}): using test-tiny", file=sys.stderr)
        return "test-tiny"


def _wait(dock, app, timeout_s: float = 600.0) -> None:
    start = time.perf_counter()
    while dock.running and time.perf_counter() - start < timeout_s:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):  # let the last repaint land
        app.processEvents()
        time.sleep(0.02)
    if dock.running:
        msg = f"analysis still running after {timeout_s:.0f} s"
        raise TimeoutError(msg)


def _look_at(viewer, dock, center_px: tuple[float, float], height_px: float) -> None:
    from histolens._qt._viewport import LayerFrame, level0_to_world

    frame = LayerFrame.from_layer(dock.slide_layer())
    viewer.scene.camera.center = level0_to_world(center_px, frame)
    viewer.scene.camera.zoom = viewer.canvas.size[0] / (height_px * frame.scale[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model name (default: embedded, else test-tiny)"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)  # a shared 2-core machine
    from qtpy.QtWidgets import QApplication

    from histolens._qt._launch import open_viewer

    model = args.model or _default_model()
    viewer, dock = open_viewer(None, model=model)
    viewer.window._qt_window.resize(1700, 1050)
    viewer.window._qt_window.show()
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)

    args.out.mkdir(parents=True, exist_ok=True)
    _look_at(viewer, dock, (1150, 1500), 760)
    dock.analyze_view()
    _wait(dock, app)
    result = dock.result
    print(
        f"model {model}: view {result.region.as_tuple()} (level-0 px), "
        f"{result.nuclei.count if result.nuclei else 0} nuclei, "
        f"{result.provenance.seconds:.1f} s on {result.provenance.device}"
    )
    viewer.layers.selection.active = viewer.layers["nuclei"]
    viewer.screenshot(str(args.out / "dock_analyze_view.png"), canvas_only=False)

    # nuclei alone, on the epithelium at the top left of the analysed view
    for layer in viewer.layers:
        if layer.name.startswith("attention") or layer.name == "tile classes":
            layer.visible = False
    dock.outline_box.setChecked(True)  # outlines keep the chromatin visible when zoomed in
    _look_at(viewer, dock, (900, 1290), 240)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(args.out / "nuclei_zoom.png"), canvas_only=True)

    _look_at(viewer, dock, (1150, 1500), 760)
    for layer in viewer.layers:
        if layer.name.startswith("attention") or layer.name in ("nuclei", "tile classes"):
            layer.visible = layer.name == "attention s0"
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(args.out / "attention_s0.png"), canvas_only=True)
    for name in ("dock_analyze_view.png", "nuclei_zoom.png", "attention_s0.png"):
        print(f"wrote {args.out / name}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
