"""Whole-slide batch throughput: one process vs a 2-worker loopback dask cluster, same slide.

A synthetic H&E-like JPEG pyramid (pink stroma, purple nuclei, no glass: the Otsu tissue mask
keeps all of it) is written to a temporary folder, then ``histolens.batch.run_batch`` analyses
the whole slide twice: in this process (torch on 2 threads) and on a ``LocalCluster`` of 2
single-threaded worker processes. For each run it prints tiles/s (engine tiles of the model's
grid) and mm^2/min of slide area, and checks that both runs found the same nuclei and tile classes.

    python benchmarks/batch_throughput.py            # 20,480 x 20,480 px at 0.5 um/px (long)
    python benchmarks/batch_throughput.py --quick    # 2,048 x 2,048 px
    python benchmarks/batch_throughput.py --size 8192 --slide-mpp 0.25 --model test-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(slide: Path, out: Path, *, model: str, workers: int, shard_px: int) -> tuple[dict, object]:
    from histolens.batch import BatchOptions, run_batch

    got: dict = {}
    options = BatchOptions(
        model=model, workers=workers, shard_px=shard_px, tasks=("nuclei", "tiles"),
        formats=("geojson", "csv", "summary"), progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    (outcome,) = run_batch(
        [slide], out, options, on_result=lambda p, r: got.setdefault("result", r)
    )
    seconds = time.perf_counter() - t0
    if not outcome.ok:
        msg = f"run with workers={workers} failed: {outcome.error}"
        raise RuntimeError(msg)
    result = got["result"]
    mpp0 = result.provenance.analysis_mpp / result.nuclei.downsample
    area_mm2 = result.region.area * mpp0**2 / 1e6
    row = {
        "workers": workers,
        "seconds": round(seconds, 2),
        "tiles_run": outcome.tiles_run,
        "tiles_total": outcome.tiles_total,
        "tiles_per_s": round(outcome.tiles_run / seconds, 2),
        "mm2": round(area_mm2, 3),
        "mm2_per_min": round(area_mm2 / (seconds / 60.0), 3),
        "nuclei": outcome.nuclei,
        "stage_seconds": {k: round(v, 2) for k, v in result.provenance.timings.items()},
        "out": str(outcome.out_dir),
    }
    return row, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 px slide instead of 20,480 px")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="slide side in level-0 px (power-of-two multiple of 320)",
    )
    parser.add_argument(
        "--slide-mpp", type=float, default=0.5, help="level-0 um/px of the synthetic slide"
    )
    parser.add_argument(
        "--model", default="test-tiny", help="registered model (default: test-tiny)"
    )
    parser.add_argument(
        "--shard-px", "--block-px", type=int, default=1024, help="shard side in analysis px"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures to this JSON file"
    )
    args = parser.parse_args(argv)

    import torch

    from histolens.slide import write_synthetic_pyramid

    # The single-process run gets the same 2 cores the 2 workers get (1 thread each).
    torch.set_num_threads(2)
    size = args.size or (2048 if args.quick else 20480)
    # 320 px JPEG tiles: 20,480 = 320 * 64 halves down to one tile at every level.
    tile = 256 if size % 320 else 320
    with tempfile.TemporaryDirectory(prefix="histolens-bench-") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        slide = write_synthetic_pyramid(
            tmpdir / "synthetic.tif", size, tile=tile, mpp=args.slide_mpp
        )
        print(
            f"slide   {size} x {size} px at {args.slide_mpp} um/px, "
            f"written in {time.perf_counter() - t0:.1f} s"
        )
        rows, results = [], []
        for workers in (0, 2):
            row, result = _run(
                slide.path, tmpdir / f"out{workers}", model=args.model, workers=workers,
                shard_px=args.shard_px,
            )  # fmt: skip
            rows.append(row)
            results.append(result)
            label = (
                "1 process (2 threads)" if workers == 0 else f"{workers} workers (1 thread each)"
            )
            print(
                f"{label:<28} {row['seconds']:8.1f} s  {row['tiles_per_s']:7.2f} tiles/s  "
                f"{row['mm2_per_min']:7.3f} mm^2/min  "
                f"({row['tiles_run']}/{row['tiles_total']} tiles, "
                f"{row['mm2']} mm^2, {row['nuclei']} nuclei)"
            )
        a, b = results
        # Labels and classes must match exactly; float outputs of a torch model may differ in
        # the last bit (BLAS sums depend on the thread count), so report the largest gap.
        same = bool(
            np.array_equal(a.nuclei.labels, b.nuclei.labels)
            and np.array_equal(a.tiles.classes, b.tiles.classes)
            and a.nuclei.features[["label", "class_id"]].equals(
                b.nuclei.features[["label", "class_id"]]
            )
        )
        gap = float(np.abs(a.tiles.probabilities - b.tiles.probabilities).max(initial=0.0))
        print(f"labels, classes and nuclei identical between the two runs: {same}")
        print(f"largest tile-probability difference: {gap:.3g}")
        print(f"speed-up with 2 workers: {rows[0]['seconds'] / rows[1]['seconds']:.2f}x")
        report = {
            "size": size,
            "slide_mpp": args.slide_mpp,
            "model": args.model,
            "identical_labels_classes": same,
            "max_probability_gap": gap,
            "speedup_2_workers": round(rows[0]["seconds"] / rows[1]["seconds"], 3),
            "runs": rows,
        }
        for row in rows:
            row.pop("out")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
