"""Open and read time of DICOM whole-slide files through the direct frame reader.

Files: the real ``small_dicom.dcm`` (42 JPEG frames of 500 px, opened by ``open_slide``, which
tries wsidicom first, and by the frame reader alone), and synthetic files with ``--frames``
frames of 256 px (one encoded JPEG repeated) in three layouts of the encapsulated pixel data:
a Basic Offset Table, no offset table, and an Extended Offset Table; plus one whose frames are
split in two fragments each (grouped by the Basic Offset Table). For each: the median open
time of ``--repeat`` opens, and the time to read a whole level (real file) or ``--reads``
random tiles (synthetic files); median and minimum over the repeats.

    python benchmarks/dicom_open.py [--cpu]
    PYTHONPATH=/path/to/other/src python benchmarks/dicom_open.py   # another checkout
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WSI = Path(os.environ.get("HISTOLENS_SHARED_DATA", REPO.parent / "shared" / "data")) / "wsi"
TILE = 256
#: The clock of every figure: wall time, or with ``--cpu`` this process's CPU time (steadier
#: on a machine shared with other work; the reads run in this thread, no dask scheduler).
CLOCK = time.perf_counter


def write_synthetic(path: Path, frames: int, layout: str) -> None:
    """A TILED_FULL WSI DICOM of ``frames`` equal JPEG frames, built on the real file's header."""
    import imagecodecs

    across = int(np.ceil(np.sqrt(frames)))
    down = frames // across
    rng = np.random.default_rng(0)
    encoded = imagecodecs.jpeg8_encode(rng.integers(0, 256, (TILE, TILE, 3), np.uint8), level=80)
    write_frames(path, [bytes(encoded)] * (across * down), (down, across), TILE, layout)


def write_frames(
    path: Path, encoded: list[bytes], grid: tuple[int, int], tile: int, layout: str, width=None
) -> None:
    """The real DICOM's header over ``encoded`` JPEG frames (row-major on a ``grid`` of
    (rows, columns) frames of ``tile`` px), encapsulated as ``layout`` says: "bot" (Basic Offset
    Table), "no-bot", "extended" (Extended Offset Table) or "bot-2-fragments". ``width`` (px)
    may cut the last frame column short, as scanners do."""
    import pydicom
    from pydicom.encaps import encapsulate, encapsulate_extended

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(WSI / "small_dicom.dcm")
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns = grid[1] * tile if width is None else width
    ds.TotalPixelMatrixRows = grid[0] * tile
    ds.NumberOfFrames = len(encoded)
    if layout == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            encoded
        )
    else:
        parts = 2 if layout == "bot-2-fragments" else 1
        ds.PixelData = encapsulate(encoded, fragments_per_frame=parts, has_bot=layout != "no-bot")
    ds["PixelData"].VR = "OB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real file's UIDs are longer than the standard's 64
        ds.save_as(path, enforce_file_format=True)


def _median_ms(times: list[float]) -> str:
    """Median and (in brackets) minimum in ms: on a loaded machine the minimum is the steadier."""
    return f"{1e3 * statistics.median(times):7.2f} ms ({1e3 * min(times):7.2f})"


def _frames_slide(path: Path):
    """The direct frame reader's level 0 as a Slide (no wsidicom attempt, no derived levels)."""
    from histolens.slide import Slide
    from histolens.slide._dicom import _open_frames

    parts = _open_frames(path)
    closers = parts.pop("closers")
    parts.pop("derive", None)
    return Slide(**parts, path=path, _closers=tuple(closers))


def time_frames_reader(path: Path, repeat: int, reads: int) -> tuple[list[float], list[float]]:
    """Per repeat: the open time of the frame reader alone, then the time to read the whole
    level (``reads == 0``) or ``reads`` random tiles (the same tiles in every repeat)."""
    from histolens.region import Region

    opens, times = [], []
    for _ in range(repeat):
        t0 = CLOCK()
        slide = _frames_slide(path)
        opens.append(CLOCK() - t0)
        h, w = slide.shape
        boxes = [Region(0, 0, h, w)] if reads == 0 else []
        rng = np.random.default_rng(1)
        for _ in range(reads):
            y, x = int(rng.integers(0, h // TILE)) * TILE, int(rng.integers(0, w // TILE)) * TILE
            boxes.append(Region(y, x, y + TILE, x + TILE))
        t0 = CLOCK()
        for box in boxes:
            slide.read_region(box)
        times.append(CLOCK() - t0)
        slide.close()
    return opens, times


def time_open_slide(path: Path, repeat: int) -> list[float]:
    from histolens.slide import open_slide

    times = []
    for _ in range(repeat):
        t0 = CLOCK()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real file records no pixel size
            slide = open_slide(path)
        times.append(CLOCK() - t0)
        slide.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--cpu", action="store_true", help="report CPU time, not wall time")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu else time.perf_counter
    import histolens

    print(f"histolens from {Path(histolens.__file__).parent}; {'CPU' if args.cpu else 'wall'} time")
    real = WSI / "small_dicom.dcm"
    time_frames_reader(real, 1, 0)  # warm the imports and the page cache
    print(f"real {real.name}: open_slide          {_median_ms(time_open_slide(real, args.repeat))}")
    opens, reads = time_frames_reader(real, args.repeat, 0)
    print(f"real {real.name}: frame reader open   {_median_ms(opens)}, "
          f"whole level read {_median_ms(reads)}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("bot", "no-bot", "extended", "bot-2-fragments"):
            path = Path(tmp) / f"{layout}.dcm"
            write_synthetic(path, args.frames, layout)
            opens, reads = time_frames_reader(path, args.repeat, args.reads)
            print(f"{args.frames} frames, {layout:<16}: open {_median_ms(opens)}, "
                  f"{args.reads} tile reads {_median_ms(reads)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
