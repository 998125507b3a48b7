"""``histolens nuclei`` on small images: seconds per image, old engine vs new, same labels?

Segments 256 x 256 px CoNSeP patches at 0.25 um/px (``../shared/data/consep``, the format of
the CoNSeP test split) with :func:`histolens.nuclei.segment_nuclei`, the
function behind ``histolens nuclei``, once with the engine before issue 15
(``crop_decoder=False``: the nuclei decoder and post-processing run over the whole padded
model input) and once with the current one, alternating image by image in one process
(one model, loaded once, as the command does), with and without test-time augmentation.
Prints seconds per image (wall and CPU), the old/new ratio and how many label images are
identical.

Usage: ``python benchmarks/small_images.py [--images 12] [--threads 1] [--precision auto]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONSEP = REPO.parent / "shared" / "data" / "consep" / "images" / "train"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12, help="patches to segment")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = ap.parse_args(argv)
    files = sorted(CONSEP.glob("*.jpg"))[: args.images]
    if not files:
        print(f"no CoNSeP patches under {CONSEP}; nothing to measure")
        return 1
    from histolens.cpu import configure_cpu
    from histolens.models import create_model
    from histolens.nuclei import read_rgb, segment_nuclei

    sys.path.insert(0, str(REPO / "benchmarks"))
    from inference_speed import cpu_name

    configure_cpu(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(None, device="cpu")
    images = [read_rgb(f) for f in files]
    print(f"CPU: {cpu_name()}; load average {os.getloadavg()}; {args.threads} thread(s)")
    print(
        f"{len(images)} CoNSeP patches {images[0].shape[1]}x{images[0].shape[0]} px at 0.25 um/px"
    )
    kw = {"mpp": 0.25, "model": model, "precision": args.precision}
    segment_nuclei(images[0], **kw)  # one-time costs (inference copy, kernels) off the clock
    for tta in (False, True):
        wall = {True: 0.0, False: 0.0}
        cpu = {True: 0.0, False: 0.0}
        same = 0
        for img in images:
            labels = {}
            for crop in (False, True):
                t0, c0 = time.perf_counter(), time.process_time()
                labels[crop], _ = segment_nuclei(img, tta=tta, crop_decoder=crop, **kw)
                wall[crop] += time.perf_counter() - t0
                cpu[crop] += time.process_time() - c0
            same += bool(np.array_equal(labels[False], labels[True]))
        n = len(images)
        print(
            f"TTA {'on ' if tta else 'off'}: old {wall[False] / n:.3f} s/image "
            f"(CPU {cpu[False] / n:.3f}), new {wall[True] / n:.3f} s/image (CPU {cpu[True] / n:.3f}); "
            f"old/new {wall[False] / wall[True]:.2f}x wall, {cpu[False] / cpu[True]:.2f}x CPU; "
            f"identical labels {same}/{n}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
