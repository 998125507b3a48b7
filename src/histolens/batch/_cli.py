"""``histolens analyze``: the command line of :func:`histolens.batch.run_batch`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._options import DEFAULT_SHARD_PX, BatchOptions
from ._run import run_batch

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``histolens analyze``."""
    from histolens._args import mpp_value, non_negative_int, positive_int

    add = parser.add_argument
    add("slides", nargs="+", metavar="SLIDE", help="slide files (SVS, NDPI, OME-TIFF, DICOM, ...)")
    add(
        "--out", required=True, type=Path, help="output folder; each slide writes OUT/<slide name>/"
    )
    add("--region", default=None, help="y0,x0,y1,x1 in level-0 pixels (default: the whole slide)")
    add(
        "--tasks", nargs="+", default=["nuclei", "tiles"], choices=["nuclei", "tiles", "attention"],
        help="what to compute (default: nuclei tiles)",
    )  # fmt: skip
    add("--model", default=None, help="registered model name (default: the embedded model)")
    add("--mpp", type=mpp_value, default=None, help="level-0 um/px, for slides that record none")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--workers", type=non_negative_int, default=0,
        help="start a loopback dask LocalCluster of N processes",
    )  # fmt: skip
    scale.add_argument(
        "--scheduler", default=None,
        help="address of a running dask scheduler, e.g. tcp://host:8786",
    )  # fmt: skip
    add("--no-tissue-mask", action="store_true", help="analyse glass too (no Otsu tissue mask)")
    add(
        "--shard-px", type=positive_int, default=DEFAULT_SHARD_PX,
        help="side of a shard (the model blocks one task runs) in analysis px",
    )  # fmt: skip
    # The flag's name before "shard" was the one word for a task's work: still accepted.
    add("--block-px", dest="shard_px", type=positive_int, help=argparse.SUPPRESS)
    add(
        "--batch-size", type=positive_int, default=4,
        help="model inputs (blocks of tiles) per model call",
    )  # fmt: skip
    add(
        "--formats", nargs="+", default=None,
        choices=["geojson", "csv", "ome-tiff", "ome-zarr", "summary", "png"],
        help="what to write (default: geojson csv ome-tiff summary)",
    )  # fmt: skip
    add("--png", action="store_true", help="also render overview.png per slide")
    add(
        "--tile-classifier", type=Path, default=None, metavar="FILE",
        help="tile classes taught in the dock (NAME.safetensors + NAME.card.json)",
    )  # fmt: skip
    add(
        "--threads", type=positive_int, default=None,
        help="torch CPU threads of a local run (default: $HISTOLENS_THREADS or the physical "
        "cores); each dask worker uses one",
    )  # fmt: skip
    add("--quiet", action="store_true", help="no progress output")


def options_from_args(args: argparse.Namespace) -> BatchOptions:
    """The :class:`BatchOptions` of parsed ``histolens analyze`` arguments."""
    return BatchOptions(
        model=args.model, tasks=args.tasks, region=args.region, mpp=args.mpp,
        workers=args.workers, scheduler=args.scheduler, tissue_mask=not args.no_tissue_mask,
        shard_px=args.shard_px, batch_size=args.batch_size, formats=args.formats, png=args.png,
        progress=not args.quiet, tile_classifier=args.tile_classifier,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``histolens analyze``: exit code 0 when every slide was written, 1 when any failed,
    2 for a bad option (one line)."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"histolens analyze: {exc}", file=sys.stderr)
        return 2
    if not options.distributed:
        from histolens.cpu import configure_cpu

        configure_cpu(args.threads)
    outcomes = run_batch(args.slides, args.out, options)
    for o in outcomes:
        if o.ok:
            detail = f"{o.nuclei} nuclei, {o.tiles_run}/{o.tiles_total} tiles -> {o.out_dir}"
            print(f"ok     {o.path}: {detail}")
        else:
            print(f"FAILED {o.path}: {o.error}")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} slide(s) failed", file=sys.stderr)
        return 1
    return 0
