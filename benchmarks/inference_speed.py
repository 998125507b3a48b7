"""Inference speed, old engine vs new, side by side: first paint and full result of a fresh view.

Runs :func:`histolens.inference.analyze` on fresh (uncached) 1024 x 1024 and 2048 x 2048 px
views of a real slide at 0.5 um/px (CMU-1-Small-Region.svs from ``../shared/data``, or a
synthetic pyramid when it is absent) with the default model, for each precision and thread
count, once with the engine as it was before issue 15 (``--old``: the nuclei decoder and
post-processing run over every model input's whole halo, glibc's default allocator, 4 inputs
per model call) and once with the current defaults (decoder cropped to the owned area plus
``NUCLEI_MARGIN_UM``, :func:`histolens.cpu.configure_cpu`). Each run is its own child
process, old and new alternating, so neither inherits the other's allocator state or warm
caches and both see the same machine load; the peak RSS is the child's.

Prints per run: seconds to the first partial result (first paint) and to the full result,
the old/new ratio, GFLOP per view (backbone FLOPs per input pixel x input pixels + decoder
FLOPs per decoded pixel x decoded pixels, counted with ``torch.utils.flop_counter``), achieved
GFLOP/s against a matmul peak measured in the same run, the thread count, the time split
(read, model, post-processing) and the peak RSS.

Usage: ``python benchmarks/inference_speed.py [--sizes 1024 2048] [--precisions bf16 fp32]
[--threads 1 2] [--repeats 1] [--json out.json]``. On a CPU shared with other jobs the
absolute figures move with the load; the old/new ratio of one run is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
#: The engine before issue 15: model calls of up to 4 inputs (the analyze default then).
OLD_BATCH = 4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                feats = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
                return f"{name} ({', '.join(feats) or 'no AVX-512'})"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


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


def flops_per_pixel(model, side: int = 1024) -> dict[str, float]:
    """FLOPs per input pixel of the backbone (+ tile head, attention) and per decoded pixel of
    the nuclei decoder, counted by torch on one ``side`` px tile."""
    from torch.utils.flop_counter import FlopCounterMode

    x = np.full((1, side, side, 3), 200, np.uint8)
    counts = {}
    for key, tasks in (("all", ("nuclei", "tiles", "attention")), ("rest", ("tiles", "attention"))):
        counter = FlopCounterMode(display=False)
        with counter:
            model.predict_tiles(x, tasks=tasks, precision="fp32")
        counts[key] = float(counter.get_total_flops())
    return {
        "backbone": counts["rest"] / side**2,
        "decoder": (counts["all"] - counts["rest"]) / side**2,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would also count the
    parent's memory at fork time)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_bench_slide():
    from histolens.slide import open_slide

    svs = SHARED / "wsi" / "CMU-1-Small-Region.svs"
    if svs.is_file():
        return open_slide(svs), "CMU-1-Small-Region.svs (real Aperio JPEG tiles, 0.499 um/px)"
    from histolens.slide import write_synthetic_pyramid

    path = Path("/tmp/histolens_bench_pyramid.tif")
    if not path.is_file():
        write_synthetic_pyramid(path, 4096, mpp=0.5)
    return open_slide(path), "synthetic JPEG pyramid 4096^2 at 0.5 um/px (real slide absent)"


def child(config: dict) -> dict:
    """One fresh-view analysis in this process, as ``config`` says (see :func:`main`)."""
    import torch

    from histolens.inference import analyze
    from histolens.models import create_model
    from histolens.region import Region

    # Variants for ablations: "crop", "keep_memory" and "batch" default to the path's own.
    old = config["old"]
    if config.get("keep_memory", not old):
        from histolens.cpu import configure_cpu

        configure_cpu(config["threads"])
    else:
        torch.set_num_threads(config["threads"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(config["model"], device="cpu")
    slide, _ = open_bench_slide()
    # One-time costs (weights, inference copy, oneDNN kernels) before the clock starts.
    warm = np.full((1, 512, 512, 3), 200, np.uint8)
    model.predict_tiles(warm, precision=config["precision"])
    h, w = slide.shape
    side = min(config["size"], h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    region = Region(y0, x0, y0 + side, x0 + side)
    kwargs = {"crop_decoder": config.get("crop", not old)}
    if "batch" in config or old:
        kwargs["batch_size"] = config.get("batch", OLD_BATCH)
    t0 = time.perf_counter()
    c0 = time.process_time()
    first = None
    result = None
    for result in analyze(  # noqa: B007 (the last one is the full result)
        slide, region, model=model, precision=config["precision"], cache=False, **kwargs
    ):
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    prov = result.provenance
    return {
        "first_s": first,
        "full_s": total,
        "cpu_s": time.process_time() - c0,
        "region_px": side,
        "precision": prov.precision,
        "threads": torch.get_num_threads(),
        "tiles_total": prov.tiles_total,
        "tiles_skipped": prov.tiles_skipped,
        "nuclei": 0 if result.nuclei is None else int(result.nuclei.count),
        "timings": {k: round(v, 4) for k, v in prov.timings.items()},
        "peak_rss_mb": peak_rss_mb(),
    }


def print_summary(runs: list[dict]) -> None:
    """Medians over repeats per (view, precision, threads): old, new and old/new."""
    keys = sorted({(r["region_px"], r["precision"], r["threads"]) for r in runs})
    print(
        "\nmedians: view, precision, threads | first paint old -> new | full old -> new (ratio) | CPU s old -> new (ratio)"
    )
    for key in keys:
        med = {}
        for old in (True, False):
            sel = [
                r
                for r in runs
                if (r["region_px"], r["precision"], r["threads"]) == key and r["old"] == old
            ]
            med[old] = {
                k: float(np.median([r[k] for r in sel])) for k in ("first_s", "full_s", "cpu_s")
            }
        o, n = med[True], med[False]
        print(
            f"{key[0]}^2 {key[1]} {key[2]} thr | {o['first_s']:.2f} -> {n['first_s']:.2f} s | "
            f"{o['full_s']:.2f} -> {n['full_s']:.2f} s ({o['full_s'] / n['full_s']:.2f}x) | "
            f"{o['cpu_s']:.2f} -> {n['cpu_s']:.2f} s ({o['cpu_s'] / n['cpu_s']:.2f}x)"
        )


def run_child(config: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="view sides, px")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="old/new pairs per setting")
    ap.add_argument("--model", default=None, help="registered model name (default model)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch

    from histolens.models import create_model

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(args.model, device="cpu")
    _, slide_note = open_bench_slide()
    per_px = flops_per_pixel(model)
    peaks = {p: matmul_peak_gflops(p) for p in ("fp32", "bf16")}
    report = {
        "cpu": cpu_name(),
        "load_average_at_start": os.getloadavg(),
        "model": model.card.name,
        "slide": slide_note,
        "gflop_per_mpx": {k: v * 1e6 / 1e9 for k, v in per_px.items()},
        "matmul_peak_gflops_1_thread": peaks,
        "runs": [],
    }
    print(f"CPU: {report['cpu']}; load average at start {report['load_average_at_start']}")
    print(
        f"model {model.card.name}; slide {slide_note}; GFLOP per Mpx: backbone "
        f"{per_px['backbone'] / 1e3:.1f} (per input px), decoder {per_px['decoder'] / 1e3:.1f} "
        f"(per decoded px); matmul peak 1 thread: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s"
    )
    for size in args.sizes:
        for prec in args.precisions:
            for threads in args.threads:
                for _ in range(args.repeats):
                    pair = {}
                    for old in (True, False):
                        cfg = {
                            "old": old,
                            "size": size,
                            "precision": prec,
                            "threads": threads,
                            "model": args.model,
                        }
                        r = run_child(cfg)
                        t = r["timings"]
                        gflop = (
                            per_px["backbone"] * t["model_input_px"]
                            + per_px["decoder"] * t["decoded_px"]
                        ) / 1e9
                        r.update(
                            old=old,
                            gflop=gflop,
                            gflops_model=gflop / max(t["model"], 1e-9),
                            gflops_pipeline=gflop / r["full_s"],
                        )
                        r["model_vs_peak"] = r["gflops_model"] / (peaks[prec] * threads)
                        report["runs"].append(r)
                        pair["old" if old else "new"] = r
                        print(
                            f"{r['region_px']}^2 {prec} {threads} thr {'old' if old else 'new'}: "
                            f"first paint {r['first_s']:.2f} s, full {r['full_s']:.2f} s "
                            f"(CPU {r['cpu_s']:.2f} s); "
                            f"{gflop:.0f} GFLOP, model {r['gflops_model']:.0f} GFLOP/s "
                            f"({100 * r['model_vs_peak']:.0f} % of {threads} x matmul peak); "
                            f"read {t['read']:.2f}, model {t['model']:.2f}, post {t['postprocess']:.2f} s; "
                            f"{r['nuclei']} nuclei; peak RSS {r['peak_rss_mb']:.0f} MB",
                            flush=True,
                        )
                    o, n = pair["old"], pair["new"]
                    print(
                        f"   ratio old/new: full {o['full_s'] / n['full_s']:.2f}x "
                        f"(CPU {o['cpu_s'] / n['cpu_s']:.2f}x), first paint "
                        f"{o['first_s'] / n['first_s']:.2f}x, GFLOP {o['gflop'] / n['gflop']:.2f}x",
                        flush=True,
                    )
    print_summary(report["runs"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
