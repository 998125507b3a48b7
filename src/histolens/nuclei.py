"""``histolens nuclei IMAGE ... --mpp MPP --out DIR``: nuclei instances for plain images.

For each image, writes ``DIR/<stem>.tif`` (uint32 instance labels, same H x W as the input,
0 = background) and ``DIR/<stem>.csv`` (one row per nucleus: label, type, type probability,
area in um^2 and in input pixels). The image is wrapped as an in-memory slide and run through
the inference engine (:func:`histolens.inference.analyze_region`), which resamples it to the
model's mpp, tiles it with a halo and stitches the instances; the labels are then mapped back
onto the input pixel grid with nearest neighbour.

Large images stream: a TIFF is read tile by tile (or strip by strip) as the engine asks for
pixels, and the label TIFF is written in tiles of ``OUT_TILE`` px, so memory holds the label
canvas on the model's grid (4 bytes per analysis pixel, at most ``MAX_ANALYSIS_PX``), not the
image nor its labels at input resolution. Both files are written under a temporary name and
renamed when complete. A bad image is reported (naming the file) and the next one goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histolens._args import mpp_value, positive_int
from histolens.models.tta import TTA_DEFAULT

__all__ = [
    "MAX_ANALYSIS_PX",
    "NUCLEI_TABLE_COLUMNS",
    "add_arguments",
    "image_slide",
    "labels_to_input_grid",
    "read_rgb",
    "run",
    "segment_nuclei",
    "write_nuclei",
]

#: Columns of the per-image CSV.
NUCLEI_TABLE_COLUMNS = ("label", "type", "type_probability", "area_um2", "area_px")

#: Most pixels an image may have on the model's grid (its mpp): the label canvas there is held
#: in memory, 4 bytes per pixel (2 GiB at this limit: 23170^2 input px at 0.5 um/px, twice
#: that side at 0.25 um/px).
MAX_ANALYSIS_PX = 2**29
#: TIFFs up to this many samples (pixels x channels: 64 M px of RGB) are read whole; larger
#: ones lazily, tile by tile, as the engine asks (blocks overlap by their halo, so a tile may
#: be decoded more than once: slower, but memory stays flat).
EAGER_READ_SAMPLES = 3 * 2**26
#: Side of the tiles the label TIFF is written in (input px).
OUT_TILE = 512

_TIFF_SUFFIXES = (".tif", ".tiff")


@contextlib.contextmanager
def image_slide(path: str | Path, mpp: float | None = None) -> Iterator[Any]:
    """An image file as a :class:`histolens.slide.Slide` (level 0 = the image) while open.

    TIFFs are read lazily through ``tifffile``'s zarr store (only the tiles or strips the
    engine asks for are decoded); other formats through Pillow, whose decompression-bomb limit
    (~179 M px) stands. Errors name the file.
    """
    from histolens.slide import Slide

    path = Path(path)
    if not path.is_file():
        msg = f"image {path} does not exist"
        raise FileNotFoundError(msg)
    with contextlib.ExitStack() as stack:
        try:
            if path.suffix.lower() in _TIFF_SUFFIXES:
                array, axes = _tiff_level0(path, stack)
            else:
                array, axes = _pillow_rgb(path), "YXS"
            slide = Slide.from_array(array, mpp=mpp, name=path.stem, axes=axes)
        except (FileNotFoundError, PermissionError, _TooLarge):
            raise
        except Exception as exc:
            msg = f"{path}: cannot read the image ({type(exc).__name__}: {exc}); {_IMAGE_FIX}"
            raise ValueError(msg) from None
        yield slide


_IMAGE_FIX = "check the file, or save it again as an 8-bit RGB TIFF, PNG or JPEG"


def _tiff_level0(path: Path, stack: contextlib.ExitStack) -> tuple[Any, str]:
    import dask.array as da
    import tifffile
    import zarr

    tif = stack.enter_context(tifffile.TiffFile(path))
    series = tif.series[0]
    if math.prod(series.shape) <= EAGER_READ_SAMPLES:  # small: one read, no tile re-decoding
        return series.asarray(level=0), str(series.axes)
    store = zarr.open_array(series.aszarr(level=0), mode="r")
    return da.from_zarr(store), str(series.axes)


class _TooLarge(ValueError):
    pass


def _pillow_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as exc:
        msg = (
            f"{path}: too large to decode whole ({str(exc).split(',')[0]}); convert it to a "
            "tiled TIFF (e.g. `vips tiffsave IMAGE out.tif --tile --compression jpeg`), which "
            "histolens nuclei reads tile by tile"
        )
        raise _TooLarge(msg) from None


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB in memory (TIFF through tifffile, others Pillow)."""
    with image_slide(path) as slide:
        try:
            return np.ascontiguousarray(slide.levels[0].compute())
        except Exception as exc:
            msg = f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); {_IMAGE_FIX}"
            raise ValueError(msg) from None


def labels_to_input_grid(
    labels: np.ndarray, downsample: float, origin: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """Sample an analysis-grid label image at the centres of the input (level-0) pixels.

    ``labels`` pixel ``(i, j)`` covers level-0 ``[origin + i * downsample, ... + downsample)``.
    Input pixels outside the label array get 0.
    """
    h, w = shape
    iy = np.floor((np.arange(h) + 0.5 - origin[0]) / downsample).astype(int)
    ix = np.floor((np.arange(w) + 0.5 - origin[1]) / downsample).astype(int)
    vy = (iy >= 0) & (iy < labels.shape[0])
    vx = (ix >= 0) & (ix < labels.shape[1])
    out = labels[
        np.clip(iy, 0, labels.shape[0] - 1)[:, None], np.clip(ix, 0, labels.shape[1] - 1)[None, :]
    ]
    return np.where(vy[:, None] & vx[None, :], out, 0).astype(np.uint32)


def _analysis_nuclei(
    slide: Any, *, mpp: float, model: Any, precision: str, tta: bool, crop_decoder: bool = True
) -> Any:
    """The engine's :class:`NucleiResult` for the whole of ``slide`` (level 0 at ``mpp``)."""
    from histolens.inference import analyze_region
    from histolens.region import Region

    if not (mpp and math.isfinite(mpp) and mpp > 0):
        msg = f"mpp must be a positive number of um/px (e.g. 0.25 for 40x), got {mpp!r}"
        raise ValueError(msg)
    if model is None or isinstance(model, str):
        from histolens.models import create_model

        model = create_model(model)
    if tta:
        from histolens.models.tta import TestTimeAugmented

        model = TestTimeAugmented(model)
    card = model.card
    h, w = (int(v) for v in slide.shape[:2])
    scale = mpp / float(card.mpp)  # analysis px per input px
    ah, aw = h * scale, w * scale
    if min(ah, aw) < 1:
        msg = (
            f"{h} x {w} px at {mpp:g} um/px is {ah:.3g} x {aw:.3g} px at the model's "
            f"{card.mpp:g} um/px, less than one pixel; check --mpp (0.25 at 40x, 0.5 at 20x)"
        )
        raise ValueError(msg)
    if ah * aw > MAX_ANALYSIS_PX:
        msg = (
            f"{h} x {w} px at {mpp:g} um/px is {ah:.3g} x {aw:.3g} px at the model's "
            f"{card.mpp:g} um/px, more than histolens nuclei holds ({MAX_ANALYSIS_PX:.3g} px); "
            "check --mpp, or cut the image into parts"
        )
        raise ValueError(msg)
    # Small images (e.g. 256 px patches) need no 1024 px tile: own just what covers the image
    # (the engine rounds it to the model's alignment and keeps the card's halo).
    needed = math.ceil(max(ah, aw))
    tile_size = min(int(card.tile_size) - 2 * int(card.halo), needed)
    result = analyze_region(
        slide, Region(0, 0, h, w), model=model, tasks=("nuclei",), cache=False,
        skip_background=False, precision=precision, tile_size=max(1, tile_size),
        crop_decoder=crop_decoder,
    )  # fmt: skip
    if result.nuclei is None:
        msg = "the model produced no nuclei result; use a model whose card lists the 'nuclei' task"
        raise ValueError(msg)
    return result.nuclei


def _input_labels(nuc: Any, keep: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Input-grid labels of ``box`` ``(y0, x0, y1, x1)`` (input px), labels not in ``keep`` 0."""
    y0, x0, y1, x1 = box
    oy, ox = (float(v) for v in nuc.origin)
    labels = labels_to_input_grid(
        np.asarray(nuc.labels), float(nuc.downsample), (oy - y0, ox - x0), (y1 - y0, x1 - x0)
    )
    labels[~keep[labels]] = 0
    return labels


def _kept_labels(nuc: Any) -> np.ndarray:
    """Per label id: is it a nucleus of the feature table (the engine's labels, 0 never)."""
    ids = nuc.features["label"].to_numpy(np.int64)
    keep = np.zeros(int(max(ids.max(initial=0), np.max(nuc.labels, initial=0))) + 1, bool)
    keep[ids] = True
    keep[0] = False
    return keep


def _nuclei_table(nuc: Any, area_px: np.ndarray, mpp: float) -> pd.DataFrame:
    """One row per nucleus still covering input pixels (sub-pixel ones are dropped)."""
    feats = nuc.features
    labels = feats["label"].to_numpy(np.int64)
    px = np.where(labels < len(area_px), area_px[np.minimum(labels, len(area_px) - 1)], 0)
    keep = px > 0
    return pd.DataFrame(
        {
            "label": labels[keep],
            "type": feats["class_name"].astype(str).to_numpy()[keep],
            "type_probability": feats["probability"].to_numpy(np.float64)[keep],
            "area_um2": px[keep] * mpp * mpp,
            "area_px": px[keep],
        },
        columns=list(NUCLEI_TABLE_COLUMNS),
    )


def segment_nuclei(
    image: np.ndarray,
    *,
    mpp: float,
    model: Any = None,
    name: str = "image",
    precision: str = "auto",
    tta: bool = False,
    crop_decoder: bool = True,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Nuclei of an RGB image at ``mpp`` um/px: (uint32 labels (H, W), per-nucleus table).

    ``model`` is a registered name, a model object or None (the default model). Labels not
    surviving the mapping back to the input grid (sub-pixel nuclei) are dropped from the table.
    ``tta`` averages the nuclei maps over the 8 flips/transposes of each model input
    (:class:`histolens.models.tta.TestTimeAugmented`): about 8x the model time.
    ``crop_decoder`` as in :func:`histolens.inference.analyze` (False: the engine before
    issue 15, for speed comparisons; the labels are the same).
    """
    from histolens.slide import Slide

    h, w = image.shape[:2]
    slide = Slide.from_array(image, mpp=mpp, name=name)
    nuc = _analysis_nuclei(
        slide, mpp=mpp, model=model, precision=precision, tta=tta, crop_decoder=crop_decoder
    )
    keep = _kept_labels(nuc)
    labels = _input_labels(nuc, keep, (0, 0, h, w))
    area_px = np.bincount(labels.ravel().astype(np.int64), minlength=len(keep))
    return labels, _nuclei_table(nuc, area_px, mpp)


def write_nuclei(
    slide: Any,
    out: Path,
    *,
    mpp: float,
    model: Any = None,
    precision: str = "auto",
    tta: bool = False,
) -> int:
    """Segment ``slide`` (an image, level 0 at ``mpp``) and write ``out.tif`` and ``out.csv``.

    The label TIFF is written tile by tile (``OUT_TILE`` px, zlib), so no input-sized array
    is ever held; each file appears under its final name only once complete. Returns the
    number of nuclei.
    """
    import tifffile

    from histolens.export import atomic_path

    name = Path(out).name
    nuc = _analysis_nuclei(slide, mpp=mpp, model=model, precision=precision, tta=tta)
    keep = _kept_labels(nuc)
    h, w = (int(v) for v in slide.shape[:2])
    area_px = np.zeros(len(keep), np.int64)

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, h, OUT_TILE):
            for x in range(0, w, OUT_TILE):
                tile = _input_labels(nuc, keep, (y, x, min(y + OUT_TILE, h), min(x + OUT_TILE, w)))
                area_px[:] += np.bincount(tile.ravel().astype(np.int64), minlength=len(keep))
                yield tile

    out = Path(out)
    with atomic_path(out.with_name(name + ".tif")) as tmp:
        tifffile.imwrite(
            tmp, tiles(), shape=(h, w), dtype=np.uint32, tile=(OUT_TILE, OUT_TILE),
            compression="zlib", bigtiff=h * w * 4 > 2**31,
        )  # fmt: skip
    table = _nuclei_table(nuc, area_px, mpp)
    with atomic_path(out.with_name(name + ".csv")) as tmp:
        table.to_csv(tmp, index=False)
    return len(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``histolens nuclei``."""
    parser.add_argument("images", nargs="+", type=Path, help="RGB images (TIFF, PNG, JPEG)")
    parser.add_argument(
        "--mpp",
        type=mpp_value,
        required=True,
        help="um/px of the images (0.25 at 40x, 0.5 at 20x)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for <stem>.tif and <stem>.csv"
    )
    parser.add_argument(
        "--model", default=None, help="registered model name (default: histolens-default)"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights file for --model (default: its embedded weights)",
    )
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: $HISTOLENS_THREADS or the physical cores)",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=TTA_DEFAULT,
        help="average the nuclei maps over 8 flips/transposes (~8x model time; default: %(default)s)",
    )


def _failure(path: Path, exc: Exception) -> str:
    """One line naming the image: our own messages as they are, others with their type."""
    text = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
    return text if str(path) in text else f"{path}: {text}"


def run(args: argparse.Namespace) -> int:
    """Segment every image and write its label TIFF and CSV; a bad image does not stop the rest.

    Exit code 0 when every image was written, 1 when any failed (they are listed at the end).
    """

    from histolens.cpu import configure_cpu
    from histolens.models import create_model

    configure_cpu(args.threads)
    model = create_model(args.model, weights=args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path in args.images:
        t0 = time.perf_counter()
        try:
            with image_slide(path, mpp=args.mpp) as slide:
                n = write_nuclei(
                    slide, args.out / path.stem, mpp=args.mpp, model=model,
                    precision=args.precision, tta=args.tta,
                )  # fmt: skip
        except Exception as exc:  # reported by file; the next image goes on
            text = _failure(path, exc)
            failed.append(text)
            print(f"FAILED {text}", file=sys.stderr, flush=True)
            continue
        print(
            f"{path.name}: {n} nuclei in {time.perf_counter() - t0:.1f} s -> "
            f"{args.out / path.stem}.tif/.csv",
            flush=True,
        )
    if failed:
        print(f"{len(failed)} of {len(args.images)} image(s) failed:", file=sys.stderr)
        for text in failed:
            print(f"  {text}", file=sys.stderr)
        return 1
    return 0
