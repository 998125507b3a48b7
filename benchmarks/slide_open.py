"""Open time of large single-level TIFFs (derived levels must be lazy, not a graph per chunk).

Files, written to a temp dir: a realistic 100,000 x 200,000 px single-level TIFF with 256 px
JPEG tiles (every tile present: one encoded tile repeated, 0.5 GB), and a sparse
1,000,000 x 1,000,000 px TIFF with 1024 px tiles, all absent. Each is opened ``--repeat``
times in this process (imports warmed up first); the median and the range are printed.

    python benchmarks/slide_open.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_jpeg_tiff(path: Path, height: int, width: int, tile: int) -> None:
    import imagecodecs
    import tifffile

    encoded = imagecodecs.jpeg8_encode(np.full((tile, tile, 3), 230, np.uint8), level=80)
    n = -(-height // tile) * -(-width // tile)
    tifffile.imwrite(
        path, (encoded for _ in range(n)), shape=(height, width, 3), dtype=np.uint8,
        tile=(tile, tile), photometric="rgb", compression="jpeg", bigtiff=True,
        resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER",
    )  # fmt: skip


def time_open(path: Path, repeat: int) -> list[float]:
    from histolens.slide import open_slide

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the sparse file records no mpp
            slide = open_slide(path)
        times.append(time.perf_counter() - t0)
        slide.close()
    print(f"{path.name}: {slide.shape[1]} x {slide.shape[0]} px, {slide.level_count} levels "
          f"({slide.level_count - 1} derived), tiles {slide.tile_shape}")  # fmt: skip
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from slide_fuzz import _sparse_tiff

    from histolens.slide import open_slide

    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.tif"
        write_jpeg_tiff(small, 512, 512, 256)
        open_slide(small).close()  # warm up imports (zarr, codecs)
        big = Path(tmp) / "100k-x-200k.tif"
        write_jpeg_tiff(big, 100_000, 200_000, 256)
        sparse = Path(tmp) / "sparse-1e6.tif"
        sparse.write_bytes(_sparse_tiff(10**6, 10**6, 1024))
        for path in (big, sparse):
            t = time_open(path, args.repeat)
            print(f"  open_slide: median {statistics.median(t) * 1e3:.0f} ms "
                  f"(min {min(t) * 1e3:.0f}, max {max(t) * 1e3:.0f}, n={len(t)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
