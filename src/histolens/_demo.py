"""``histolens demo``: the main job on the packaged sample slide.

With a display it opens napari with the sample slide and the HistoLens dock, ready to click
"Analyze view". Headless (``--headless``, or no display) it runs the same analysis on the
sample slide and writes the exports (GeoJSON, CSV, masks, summary.json) and a rendered PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import ResultSummary

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headless", action="store_true", help="no GUI: analyse and write files")
    parser.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="output folder (headless)"
    )
    parser.add_argument(
        "--model", default=None, help="registered model name (default: the embedded model)"
    )
    parser.add_argument(
        "--region",
        default=None,
        help="y0,x0,y1,x1 in level-0 pixels (default: the whole sample slide)",
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda or mps")


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in (
        "darwin",
        "win32",
    )


def run(args: argparse.Namespace) -> int:
    if not args.headless and _has_display():
        from ._qt._launch import launch_viewer

        launch_viewer(None, model=args.model)
        return 0
    return _run_headless(args)


def _run_headless(args: argparse.Namespace) -> int:
    from .cpu import configure_cpu
    from .export import render_overview_png, write_result
    from .inference import analyze
    from .progress import ProgressPrinter
    from .region import Region
    from .slide import open_slide, sample_slide_path

    configure_cpu()  # threads: $HISTOLENS_THREADS or the physical cores
    slide = open_slide(sample_slide_path())
    region = Region.from_string(args.region) if args.region else Region.full(slide.shape)
    print(f"slide   {slide.path.name}: {slide.shape[1]} x {slide.shape[0]} px, {slide.mpp} um/px")
    print(f"region  {region.as_tuple()} (level-0 px)")
    start = time.perf_counter()
    result = None
    progress = ProgressPrinter(stream=sys.stdout, every=5.0)
    for partial in analyze(slide, region, model=args.model, device=args.device):
        result = partial
        if partial.tiles_total != progress.total:
            progress.set_total(partial.tiles_total)
        progress.update(partial.tiles_done - progress.done)
    progress.close()
    assert result is not None
    seconds = time.perf_counter() - start
    paths = write_result(result, args.out, slide=slide)
    png = render_overview_png(slide, result, args.out / "overview.png")
    print(
        f"done    {_counts_line(result.summary())} in {seconds:.1f} s on {result.provenance.device}"
    )
    for _name, path in sorted({**paths, "overview": png}.items()):
        print(f"wrote   {path}")
    return 0


def _counts_line(s: ResultSummary) -> str:
    """``N nuclei (D per mm^2 of A mm^2 tissue)``; ASCII, for any terminal or log."""
    if s.density_per_mm2 is None:
        return f"{s.n_nuclei} nuclei"
    return (
        f"{s.n_nuclei} nuclei ({s.density_per_mm2:.0f} per mm^2 of {s.tissue_mm2:.3f} mm^2 tissue)"
    )
