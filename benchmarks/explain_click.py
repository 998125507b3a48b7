"""Explain mode: click-to-layers time on an analysed view, and its ratio to that view's analysis.

Opens the packaged sample slide (CMU-1-Small-Region.svs) in napari with the HistoLens dock, as
``histolens view`` does, analyses one view with the dock (the first analysis of that view: an
empty tile cache), then switches Explain mode on and "clicks" several spots of that view
(``ExplainPanel.explain_at``, what a click on the canvas calls). For each click it times, in
the same run:

- click -> layers: from the click until the explanation layers and the dock's read-out are
  shown (the thread worker, :func:`histolens.explain_point`, the layers added on the main
  thread);
- the engine alone (``PointExplanation.seconds``: read the block, re-run the model on it).

Explain runs in the analysis's precision (bf16 where the CPU is faster at it); the first click
(first query run: kernel selection, allocations) is reported apart from the others. Run under a display:
``xvfb-run -a python benchmarks/explain_click.py [--threads 1] [--view-px 760] [--clicks 6]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _cpu_name() -> str:
    """Model name, family and the matrix/bf16 instruction sets the precision choice depends on."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            info = dict(
                line.split(":", 1)
                for line in fh.read().split("\n\n")[0].splitlines()
                if ":" in line
            )
    except OSError:
        return "unknown CPU"
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}), "
        f"{' '.join(isa) or 'no AVX-512'}{'' if 'amx_bf16' in flags else ', no AMX'}"
    )


def _spin(app, until, timeout_s: float = 600.0) -> float:
    """Process Qt events until ``until()``; returns the seconds waited."""
    t0 = time.perf_counter()
    while not until():
        app.processEvents()
        time.sleep(0.002)
        if time.perf_counter() - t0 > timeout_s:
            msg = f"still waiting after {timeout_s:.0f} s"
            raise TimeoutError(msg)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--view-px", type=float, default=760, help="level-0 rows on screen")
    parser.add_argument("--clicks", type=int, default=6, help="clicks after the first one")
    parser.add_argument("--model", default=None, help="model name (default: histolens-default)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from qtpy.QtWidgets import QApplication

    from histolens._qt._launch import open_viewer
    from histolens._qt._viewport import LayerFrame, level0_to_world

    viewer, dock = open_viewer(None, model=args.model)
    viewer.window._qt_window.resize(1440, 900)
    viewer.window._qt_window.show()
    app = QApplication.instance()
    _spin(app, lambda: True)
    dock.device_combo.setCurrentText("cpu")
    frame = LayerFrame.from_layer(dock.slide_layer())
    viewer.scene.camera.center = level0_to_world((1150, 1500), frame)
    viewer.scene.camera.zoom = viewer.canvas.size[0] / (args.view_px * frame.scale[0])

    t0 = time.perf_counter()
    dock.analyze_view()
    _spin(app, lambda: not dock.running)
    analysis_s = time.perf_counter() - t0
    result = dock.result
    r = result.region
    prov = result.provenance
    print(
        f"first analysis of the view {r.as_tuple()} ({r.width} x {r.height} level-0 px, "
        f"{prov.tiles_total} tiles, {prov.precision}): {analysis_s:.2f} s click-to-result "
        f"({prov.seconds:.2f} s in the engine)"
    )

    panel = dock.explain
    panel.toggle.setChecked(True)
    rng = np.random.default_rng(0)
    points = [((r.y0 + r.y1) // 2, (r.x0 + r.x1) // 2)] + [
        (int(rng.integers(r.y0, r.y1)), int(rng.integers(r.x0, r.x1))) for _ in range(args.clicks)
    ]
    totals, engine = [], []
    for point in points:
        t0 = time.perf_counter()
        if panel.explain_at(level0_to_world(point, frame)) is None:
            print(f"click at {point} refused", file=sys.stderr)
            return 1
        _spin(app, lambda: not panel.pending)
        totals.append(time.perf_counter() - t0)
        engine.append(panel.explanation.seconds)
        shares = ", ".join(f"s{k} {v:.0%}" for k, v in panel.explanation.shares().items())
        print(
            f"click {point}: {totals[-1]:.3f} s to layers "
            f"(engine {engine[-1]:.3f} s; input {panel.explanation.input_box.shape}); {shares}"
        )
    first, rest = totals[0], totals[1:]
    median = statistics.median(rest) if rest else first
    print(
        f"\nclick -> layers: first {first:.3f} s, then median "
        f"{median:.3f} s (min {min(rest or [first]):.3f}, max {max(rest or [first]):.3f}) over "
        f"{len(rest)} clicks; engine median {statistics.median(engine[1:] or engine):.3f} s"
    )
    print(
        f"ratio to the first analysis of that view: {median / analysis_s:.3f} "
        f"({median:.3f} s / {analysis_s:.2f} s)"
    )
    n_layers = len(panel.explain_layers())
    t0 = time.perf_counter()
    panel.toggle.setChecked(False)  # leaving Explain mode removes the layers
    _spin(app, lambda: True)
    print(f"leaving Explain mode, {n_layers} layers removed: {time.perf_counter() - t0:.2f} s")
    print(
        f"CPU: {_cpu_name()}, torch threads {args.threads}, torch {torch.__version__} "
        "(shared, loaded machine: figures vary)"
    )
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
