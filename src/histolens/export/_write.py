"""``write_result``: one result -> its files, through a format -> writer table.

A writer gets the job (result, folder, options, what was written so far) and yields
``(file name, write)`` pairs for the parts the result has; :func:`write_result` runs and times
each ``write``. Table order is write order: ``summary.json`` comes last and lists the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._atomic import save_json
from ._geojson_write import nuclei_feature_collection, save_geojson, tiles_feature_collection
from ._masks import result_masks, save_ome_tiff, save_ome_zarr
from ._overview import render_overview_png
from ._summary import summary_dict
from ._tables import save_csv, tiles_table

if TYPE_CHECKING:
    from histolens.result import RegionResult

__all__ = ["DEFAULT_FORMATS", "WRITERS", "write_result"]

#: What :func:`write_result` writes by default.
DEFAULT_FORMATS: tuple[str, ...] = ("geojson", "csv", "ome-tiff", "summary")


@dataclass
class _Job:
    result: RegionResult
    out: Path
    slide: Any
    tolerance: float
    mpp: float | None  # um per level-0 px (None: unknown)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


Files = Iterator[tuple[str, Callable[[], Path]]]


def _geojson(job: _Job) -> Files:
    result, out = job.result, job.out
    if result.nuclei is not None:
        # Lazy: each nucleus is outlined as it is written (a slide holds millions).
        fc = partial(nuclei_feature_collection, result, tolerance=job.tolerance, lazy=True)
        yield "nuclei.geojson", lambda: save_geojson(out / "nuclei.geojson", fc())
    if result.tiles is not None:
        path = out / "tiles.geojson"
        yield "tiles.geojson", lambda: save_geojson(path, tiles_feature_collection(result))


def _csv(job: _Job) -> Files:
    result, out = job.result, job.out
    if result.nuclei is not None:
        yield "nuclei.csv", partial(save_csv, out / "nuclei.csv", result.nuclei.features)
    if result.tiles is not None:
        path = out / "tiles.csv"
        yield "tiles.csv", lambda: save_csv(path, tiles_table(result.tiles, result.region))


def _masks(suffix: str, save: Callable[..., Path]) -> Callable[[_Job], Files]:
    """A writer of every mask of the result (see :func:`._masks.result_masks`) with ``save``."""

    def writer(job: _Job) -> Files:
        for mask in result_masks(job.result):
            name = mask.stem + suffix
            yield name, partial(save, job.out / name, mask, job.mpp)

    return writer


def _png(job: _Job) -> Files:
    path = job.out / "overview.png"
    yield "overview.png", partial(render_overview_png, job.slide, job.result, path)


def _summary(job: _Job) -> Files:
    path = job.out / "summary.json"

    def write() -> Path:
        summary = summary_dict(job.result, files={**job.files, "summary.json": path})
        summary["export_seconds"] = dict(job.seconds)
        return save_json(path, summary)

    yield "summary.json", write


#: Format name -> writer, in write order (``summary`` last: it lists the files before it).
WRITERS: dict[str, Callable[[_Job], Files]] = {
    "geojson": _geojson,
    "csv": _csv,
    "ome-tiff": _masks(".ome.tif", save_ome_tiff),
    "ome-zarr": _masks(".ome.zarr", save_ome_zarr),
    "png": _png,
    "summary": _summary,
}


def write_result(
    result: RegionResult,
    out_dir: str | os.PathLike[str],
    *,
    slide: Any = None,
    formats: Iterable[str] = DEFAULT_FORMATS,
    tolerance: float = 0.5,
) -> dict[str, Path]:
    """Write a result's files into ``out_dir`` and return ``{kind: path}``.

    ``formats`` picks among ``"geojson"`` (``nuclei.geojson``, ``tiles.geojson``), ``"csv"``
    (``nuclei.csv``, ``tiles.csv``), ``"ome-tiff"`` / ``"ome-zarr"`` (``nuclei_labels`` and
    ``tile_classes`` masks and float32 ``attention_s<k>`` heat maps, each at its own
    resolution, pixel size ``mpp * downsample`` um; OME-Zarr as a multiscale pyramid),
    ``"summary"`` (``summary.json``, written last and listing the others) and ``"png"``
    (``overview.png``, needs ``slide``). Parts the result lacks (a task not run) are skipped.
    """
    wanted = {str(f).lower() for f in formats}
    unknown = sorted(wanted - set(WRITERS))
    if unknown:
        msg = f"unknown export format(s) {unknown}; choose from {list(WRITERS)}"
        raise ValueError(msg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(result, out, slide, tolerance, result.slide_mpp)
    for fmt, writer in WRITERS.items():
        if fmt not in wanted:
            continue
        for name, write in writer(job):
            t0 = time.perf_counter()
            job.files[name] = write()
            job.seconds[name] = round(time.perf_counter() - t0, 4)
    return dict(job.files)
