"""Region reads: histolens (tifffile + zarr + dask) vs openslide-python, same files, same boxes.

Files: the bundled CMU-1-Small-Region.svs and a synthetic JPEG pyramid written here (levels in
the main IFD chain, which OpenSlide's generic-TIFF reader understands). For each file and
level, N random boxes of SIZE x SIZE pixels (of that level) are read by both readers in
alternation and the median/mean times and the ratio are printed.

    python benchmarks/slide_read.py            # 65,536 px synthetic pyramid, 20 boxes
    python benchmarks/slide_read.py --quick    # 16,384 px, 8 boxes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _openslide_read(osr, level: int, y0: int, x0: int, size: int, down: float) -> np.ndarray:
    # OpenSlide takes the corner in level-0 pixels and the size in level pixels; RGBA out.
    img = osr.read_region((int(x0 * down), int(y0 * down)), level, (size, size))
    return np.asarray(img)[..., :3]


def bench_file(path: Path, levels: list[int], n: int, size: int, seed: int) -> list[dict]:
    import openslide

    from histolens.region import Region
    from histolens.slide import open_slide

    t0 = time.perf_counter()
    slide = open_slide(path)
    t_open_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    osr = openslide.OpenSlide(str(path))
    t_open_os = time.perf_counter() - t0
    print(
        f"\n{path.name}: level-0 {slide.shape[1]} x {slide.shape[0]} px, "
        f"{len(slide.levels)} levels "
        f"(openslide: {osr.level_count}); open: histolens {t_open_ours * 1e3:.1f} ms, "
        f"openslide {t_open_os * 1e3:.1f} ms"
    )
    rng = np.random.default_rng(seed)
    rows = []
    for level in levels:
        f = slide.downsamples[level]
        h, w = slide.level_shapes[level]
        s = min(size, h, w)
        # OpenSlide has the same level only for a stored pyramid; for a single-level file
        # (SVS here) it must read level 0 and downsample, which is what a user would do.
        os_level = next((i for i, d in enumerate(osr.level_downsamples) if abs(d - f) < 0.01), None)
        ours, theirs, equal = [], [], []
        for _ in range(n):
            y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            region = Region(int(y0 * f), int(x0 * f), int((y0 + s) * f), int((x0 + s) * f))
            t0 = time.perf_counter()
            a = slide.read_region(region, level=level)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            if os_level is not None:
                b = _openslide_read(osr, os_level, y0, x0, s, f)
            else:
                k = int(f)
                big = _openslide_read(osr, 0, y0 * k, x0 * k, s * k, 1.0).astype(np.float32)
                b = (big.reshape(s, k, s, k, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
            theirs.append(time.perf_counter() - t0)
            equal.append(float(np.mean(np.abs(a.astype(int) - b.astype(int)))))
        row = {
            "file": path.name, "level": level, "downsample": f, "box": s, "n": n,
            "ours_ms": 1e3 * statistics.median(ours), "os_ms": 1e3 * statistics.median(theirs),
            "ours_mean_ms": 1e3 * statistics.fmean(ours),
            "os_mean_ms": 1e3 * statistics.fmean(theirs),
            "mean_abs_diff": statistics.fmean(equal),
            "os_how": "stored level" if os_level is not None else "level 0 + mean",
        }  # fmt: skip
        rows.append(row)
        print(
            f"  level {level} (x{f:g}) {s}x{s} px, {n} boxes: histolens median "
            f"{row['ours_ms']:.1f} ms (mean {row['ours_mean_ms']:.1f}), openslide "
            f"[{row['os_how']}] median {row['os_ms']:.1f} ms (mean {row['os_mean_ms']:.1f}); "
            f"openslide/histolens = {row['os_ms'] / row['ours_ms']:.2f}; "
            f"mean |diff| {row['mean_abs_diff']:.2f} grey levels"
        )
    slide.close()
    osr.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16,384 px synthetic slide, 8 boxes")
    parser.add_argument("--n", type=int, default=None, help="boxes per level (default 20, quick 8)")
    parser.add_argument("--size", type=int, default=1024, help="box side in level pixels")
    parser.add_argument("--synthetic-size", type=int, default=None, help="synthetic slide side")
    parser.add_argument("--threads", type=int, default=2, help="dask threads for histolens reads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import openslide  # noqa: F401
    except ImportError:
        print(
            "openslide-python is needed: pip install napari-histolens[openslide]", file=sys.stderr
        )
        return 2
    import dask

    from histolens.slide import sample_slide_path, write_synthetic_pyramid

    n = args.n or (8 if args.quick else 20)
    side = args.synthetic_size or (16384 if args.quick else 65536)
    dask.config.set(scheduler="threads", num_workers=args.threads)
    print(
        f"{n} random {args.size} x {args.size} boxes per level; histolens on {args.threads} "
        "dask threads, openslide single-threaded; times include decoding, not file opening"
    )
    # Warm-up: the first open pays for importing zarr/imagecodecs; keep that out of the figures.
    from histolens.slide import open_slide

    open_slide(sample_slide_path()).close()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        syn = write_synthetic_pyramid(Path(tmp) / "synthetic.tif", side, tile=512)
        size_mb = syn.path.stat().st_size / 1e6
        print(
            f"wrote {side} x {side} px synthetic pyramid ({len(syn.level_shapes)} levels, "
            f"{size_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s"
        )
        bench_file(sample_slide_path(), [0, 1], n, args.size, args.seed)
        bench_file(syn.path, [0, 2], n, args.size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
