"""Inference speed: time to first partial and to full result, cached re-run, GFLOP/s vs peak.

Runs :func:`histolens.inference.analyze` on 1024 x 1024 and 2048 x 2048 px regions of a real
slide at 0.5 um/px (CMU-1-Small-Region.svs from ``../shared/data``, or a synthetic pyramid
when it is absent) with the default model in bf16 and fp32, then re-runs each region from the
tile cache. Reports:

- seconds to the first partial result and to the full result, and the cached re-run ratio;
- the time split the engine records (read = I/O + decode + resample through dask,
  preprocess = tissue test, model, postprocess = HoVer watershed + ownership, stitch), and a
  separate raw-I/O vs JPEG-decode split measured on the slide's own tiles;
- achieved GFLOP/s of the whole pipeline and of the model alone (FLOPs counted with
  ``torch.utils.flop_counter`` on one tile) against a matmul peak measured in the same run.

Usage: ``python benchmarks/inference_speed.py [--sizes 1024 2048] [--precisions bf16 fp32]
[--threads 1] [--model NAME] [--weights CKPT.safetensors] [--json out.json]``.

``--weights`` loads a safetensors state dict (a training checkpoint's ``model.`` prefix is
stripped) so the post-processing works on realistic maps; random weights make the watershed
do unusual work. On a CPU shared with another job, ``--threads 1`` is faster and steadier than
2 (OpenMP threads wait for each other when a core is taken).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def matmul_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of ``repeats`` GFLOP/s of an ``n x n`` matmul in ``dtype_name`` on the CPU."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up (oneDNN kernel selection)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def model_flops_per_tile(model, side: int) -> float:
    """FLOPs of one forward pass on a ``side`` x ``side`` tile (all tasks), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = np.full((1, side, side, 3), 200, np.uint8)
    counter = FlopCounterMode(display=False)
    with counter:
        model.predict_tiles(x, precision="fp32")
    return float(counter.get_total_flops())


def raw_read_vs_decode(slide_path: Path, box: tuple[int, int, int, int]) -> dict[str, float]:
    """Seconds to read the compressed level-0 tiles covering ``box`` and to decode them."""
    import tifffile

    with tifffile.TiffFile(slide_path) as tif:
        page = tif.series[0].levels[0].pages[0]
        if not page.is_tiled:
            return {}
        th, tw = page.tilelength, page.tilewidth
        per_row = math.ceil(page.imagewidth / tw)
        y0, x0, y1, x1 = box
        idx = [
            r * per_row + c
            for r in range(y0 // th, math.ceil(y1 / th))
            for c in range(x0 // tw, math.ceil(x1 / tw))
        ]
        fh = tif.filehandle
        t0 = time.perf_counter()
        blobs = []
        for i in idx:
            fh.seek(page.dataoffsets[i])
            blobs.append(fh.read(page.databytecounts[i]))
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, data in zip(idx, blobs, strict=True):
            page.decode(data, i, jpegtables=page.jpegtables)
        t_decode = time.perf_counter() - t0
    return {"tiles": len(idx), "raw_read_s": t_read, "decode_s": t_decode}


def open_bench_slide():
    from histolens.slide import open_slide

    svs = SHARED / "wsi" / "CMU-1-Small-Region.svs"
    if svs.is_file():
        return open_slide(svs), svs, "CMU-1-Small-Region.svs (real Aperio JPEG tiles, 0.499 um/px)"
    from histolens.slide import write_synthetic_pyramid

    path = Path("/tmp/histolens_bench_pyramid.tif")
    if not path.is_file():
        write_synthetic_pyramid(path, 4096, mpp=0.5)
    return open_slide(path), path, "synthetic JPEG pyramid 4096^2 at 0.5 um/px (real slide absent)"


def run_once(slide, region, model, precision: str, cache) -> dict:
    from histolens.inference import analyze

    t0 = time.perf_counter()
    first = None
    result = None
    for result in analyze(slide, region, model=model, precision=precision, cache=cache):  # noqa: B007
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    prov = result.provenance
    return {
        "first_result_s": first,
        "full_s": total,
        "tiles_total": prov.tiles_total,
        "tiles_run": prov.tiles_done - prov.tiles_cached - prov.tiles_skipped,
        "tiles_cached": prov.tiles_cached,
        "tiles_skipped": prov.tiles_skipped,
        "nuclei": 0 if result.nuclei is None else result.nuclei.count,
        "timings": {k: round(v, 4) for k, v in prov.timings.items()},
        "precision": prov.precision,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 2048], help="region sides, level-0 px"
    )
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--model", default=None, help="registered model name (default: the default model)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="safetensors state dict for the model (e.g. a training checkpoint); "
        "'model.' prefix stripped",
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from histolens.inference import TileCache
    from histolens.models import create_model
    from histolens.models.card import WeightsError
    from histolens.region import Region

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = create_model(args.model, device="cpu")
        except WeightsError as exc:
            # Trained weights not built yet: same architecture, random weights (said below).
            print(f"note: {exc}")
            model = create_model(args.model, device="cpu", pretrained=False)
    trained = bool(model.card.weights_sha256)
    if args.weights is not None:
        from histolens.models._model import read_safetensors

        state = read_safetensors(args.weights)
        if any(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        trained = True
    note = (
        (f"weights from {args.weights}" if args.weights else "trained weights")
        if trained
        else (
            "NO trained weights found: random-weight architecture (" + model.card.backbone + "); "
            "speed figures are valid, nuclei counts are not"
        )
    )
    slide, slide_path, slide_note = open_bench_slide()
    grid_side = model.card.tile_size
    import os

    report: dict = {
        "load_average_at_start": os.getloadavg(),
        "model": model.card.name,
        "backbone": model.card.backbone,
        "weights": note,
        "slide": slide_note,
        "threads": args.threads,
        "tile_input_px": grid_side,
        "halo_px": model.card.halo,
        "warnings": sorted({str(w.message) for w in caught}),
        "peak_gflops": {p: round(matmul_peak_gflops(p), 1) for p in ("fp32", "bf16")},
        "runs": [],
    }
    flops = model_flops_per_tile(model, grid_side)
    report["gflop_per_tile"] = round(flops / 1e9, 2)
    print(f"model {model.card.name} ({note}); slide {slide_note}")
    print(
        f"matmul peak GFLOP/s: {report['peak_gflops']}; model GFLOP per {grid_side}^2 tile: {flops / 1e9:.1f}"
    )
    # Warm-up so one-time costs (oneDNN kernels, allocator) do not land on the first run.
    model.predict_tiles(np.full((1, grid_side, grid_side, 3), 200, np.uint8), precision="bf16")
    model.predict_tiles(np.full((1, grid_side, grid_side, 3), 200, np.uint8), precision="fp32")

    for size in args.sizes:
        h, w = slide.shape
        side = min(size, h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        region = Region(y0, x0, y0 + side, x0 + side)
        io = (
            raw_read_vs_decode(slide_path, region.as_tuple())
            if slide_path.suffix in (".svs", ".tif")
            else {}
        )
        for prec in args.precisions:
            cache = TileCache(1 << 30)
            cold = run_once(slide, region, model, prec, cache)
            warm = run_once(slide, region, model, prec, cache)
            # FLOPs scale with input pixels (windowed attention): per-pixel cost x pixels run.
            work = flops / grid_side**2 * cold["timings"]["model_input_px"]
            run = {
                "region_px": side,
                "precision": prec,
                "cold": cold,
                "cached_rerun_s": warm["full_s"],
                "cached_ratio": warm["full_s"] / cold["full_s"],
                "pipeline_gflops": work / cold["full_s"] / 1e9,
                "model_gflops": work / max(cold["timings"]["model"], 1e-9) / 1e9,
                "model_input_mpx": cold["timings"]["model_input_px"] / 1e6,
                "slide_io_split": io,
            }
            run["pipeline_vs_peak"] = run["pipeline_gflops"] / report["peak_gflops"][prec]
            run["model_vs_peak"] = run["model_gflops"] / report["peak_gflops"][prec]
            report["runs"].append(run)
            t = cold["timings"]
            print(
                f"{side}^2 {prec}: first {cold['first_result_s']:.2f} s, full {cold['full_s']:.2f} s "
                f"({cold['tiles_run']} tiles run, {cold['tiles_skipped']} skipped, "
                f"{run['model_input_mpx']:.2f} Mpx into the model), cached re-run "
                f"{warm['full_s']:.3f} s (x{run['cached_ratio']:.4f}); pipeline {run['pipeline_gflops']:.1f} "
                f"GFLOP/s = {100 * run['pipeline_vs_peak']:.1f} % of peak, model alone "
                f"{run['model_gflops']:.1f} GFLOP/s = {100 * run['model_vs_peak']:.1f} %"
            )
            print(
                "   split s: read+decode+resample {read:.2f}, tissue {preprocess:.3f}, model {model:.2f}, "
                "postprocess {postprocess:.2f}, stitch {stitch:.3f}".format(**t)
            )
        if io:
            print(
                f"   slide tiles under the region: {io['tiles']} JPEG tiles, raw read {io['raw_read_s']:.3f} s, "
                f"decode {io['decode_s']:.3f} s"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
