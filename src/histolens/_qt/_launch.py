"""``histolens view [SLIDE]``: napari with a slide (default: the packaged sample) and the dock."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "launch_viewer", "open_viewer", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slide",
        nargs="?",
        type=Path,
        default=None,
        help="whole-slide image to open (default: the packaged CMU-1-Small-Region sample)",
    )
    parser.add_argument("--model", default=None, help="model to preselect (see `histolens models`)")
    parser.add_argument(
        "--mpp", type=float, default=None, help="um per level-0 pixel, if the slide has none"
    )
    parser.add_argument(
        "--live", action="store_true", help="start with live re-analysis on pan/zoom"
    )


def open_viewer(
    slide_path: str | Path | None = None,
    *,
    model: str | None = None,
    mpp: float | None = None,
    live: bool = False,
    viewer: Any = None,
) -> tuple[Any, Any]:
    """Open ``slide_path`` through the HistoLens reader and dock the widget.

    Returns ``(viewer, dock)``; ``viewer`` may be given (tests), else a new one is made.
    """
    import napari
    from napari.layers import Layer

    from histolens._reader import read_slides
    from histolens.slide import sample_slide_path

    from ._widget import HistoLensWidget
    from ._worker import preload_model_stack

    path = Path(slide_path) if slide_path is not None else Path(sample_slide_path())
    if not path.exists():
        msg = (
            f"slide {path} does not exist; give a path to a whole-slide image (e.g. .svs, .ome.tif)"
        )
        raise FileNotFoundError(msg)
    # torch/timm before the first GL context: see preload_model_stack for the crash it avoids
    preload_model_stack()
    viewer = viewer if viewer is not None else napari.Viewer(title=f"HistoLens - {path.name}")
    # The reader contribution's own function, called directly: it does not depend on the
    # manifest being discoverable (an editable install does not package napari.yaml).
    for data, meta, layer_type in read_slides(path):
        viewer.add_layer(Layer.create(data, meta, layer_type))
    dock = HistoLensWidget(viewer)
    viewer.window.add_dock_widget(dock, name="HistoLens", area="right")
    if model is not None:
        dock.select_model(model)
    if mpp is not None:
        dock.mpp_spin.setValue(float(mpp))
    if live:
        dock.live_box.setChecked(True)
    return viewer, dock


def launch_viewer(
    slide_path: str | Path | None = None, *, model: str | None = None, **kwargs: Any
) -> None:
    """Open the viewer with the dock and run the Qt event loop until the window closes."""
    import napari

    open_viewer(slide_path, model=model, **kwargs)
    napari.run()


def run(args: argparse.Namespace) -> int:
    try:
        launch_viewer(args.slide, model=args.model, mpp=args.mpp, live=args.live)
    except (FileNotFoundError, ValueError) as exc:
        print(f"histolens view: {exc}")
        return 2
    return 0
