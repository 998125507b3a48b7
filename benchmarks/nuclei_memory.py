"""Peak memory of ``histolens nuclei`` on a large image: does it grow with the image?

Builds an N x N px tiled TIFF from the sample slide (CMU-1-Small-Region, repeated), then runs
``histolens nuclei`` on it in a child process and reports the child's peak RSS and wall time;
the same on a 2048 x 2048 crop at the same mpp gives the baseline (model, activations, torch).
Large TIFFs are read tile by tile and the label TIFF is written in 512 px tiles, so the
difference is the label canvas on the model's grid (4 bytes per analysis pixel).

    python benchmarks/nuclei_memory.py                     # 20000^2 at 0.25 um/px, real model
    python benchmarks/nuclei_memory.py --side 8000 --mpp 0.1 --model test-tiny   # quick

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_test_image(path: Path, side: int, tile: int = 512) -> None:
    """An ``side`` x ``side`` RGB tiled TIFF of sample-slide tissue, written tile by tile."""
    import tifffile

    from histolens.slide import open_slide
    from histolens.slide._sample import sample_slide_path

    with open_slide(sample_slide_path()) as slide:
        src = np.asarray(slide.levels[0][:2048, 512:2560])

    def tiles():
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                out = np.full((tile, tile, 3), 255, np.uint8)
                part = src[y % 2048 : y % 2048 + tile, x % 2048 : x % 2048 + tile]
                out[: part.shape[0], : part.shape[1]] = part
                yield out

    tifffile.imwrite(
        path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
        photometric="rgb", compression="zlib",
    )  # fmt: skip


def run_nuclei(image: Path, out: Path, mpp: float, model: str) -> dict[str, float]:
    """Peak RSS (GB) and wall seconds of one ``histolens nuclei`` child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "histolens", "nuclei", str(image), "--mpp", str(mpp)]
    cmd += ["--out", str(out), "--model", model, "--no-tta", "--threads", "1"]
    subprocess.run(cmd, check=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN is the largest child so far: run the small image first.
    return {"peak_rss_gb": max(peak_kb, before) / 2**20, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--model", default="histolens-default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small, large = folder / "small.tif", folder / "large.tif"
        write_test_image(small, 2048)
        write_test_image(large, args.side)
        base = run_nuclei(small, folder / "out", args.mpp, args.model)
        big = run_nuclei(large, folder / "out", args.mpp, args.model)
    report = {
        "side": args.side, "mpp": args.mpp, "model": args.model,
        "peak_rss_gb_2048": round(base["peak_rss_gb"], 2),
        "peak_rss_gb_large": round(big["peak_rss_gb"], 2),
        "seconds_large": round(big["seconds"], 1),
    }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
