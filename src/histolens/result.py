"""What one analysis of a region produces, in level-0 pixels, before it becomes layers or files,
and the numbers it adds up to (:meth:`RegionResult.summary`).

Every array here lies on the slide through two numbers: ``downsample`` (level-0 pixels per
array pixel) and the ``origin`` (level-0 pixel where the array's pixel (0, 0) starts; whole
numbers when a pyramid level matches the model, fractional when the engine resampled).
:func:`histolens.region.layer_transform` turns those into napari ``scale``/``translate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .colors import to_hex
from .region import Region

__all__ = [
    "NUCLEI_COLUMNS",
    "AttentionMap",
    "ClassCount",
    "NucleiResult",
    "Provenance",
    "RegionResult",
    "ResultSummary",
    "TileClassResult",
]

#: Columns of :attr:`NucleiResult.features`, in order. Centroids are level-0 pixels
#: ``(y, x)``; ``area_um2`` is in square micrometres; ``probability`` is the type confidence.
NUCLEI_COLUMNS = (
    "label",
    "centroid_y",
    "centroid_x",
    "area_um2",
    "class_id",
    "class_name",
    "probability",
)


@dataclass
class NucleiResult:
    """Nuclei as an instance-label image with one features row per label.

    ``labels`` is uint32 ``(h, w)``, 0 = background, at ``downsample`` level-0 px per pixel,
    pixel (0, 0) starting at level-0 ``origin``. ``features`` has :data:`NUCLEI_COLUMNS`,
    one row per non-zero label, sorted by label.
    """

    labels: np.ndarray
    features: pd.DataFrame
    downsample: float
    origin: tuple[float, float]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.features)


@dataclass
class TileClassResult:
    """Tile (tissue) classes on a regular grid of square cells.

    ``classes`` is int32 ``(gh, gw)`` holding ``class index + 1`` (0 = not analysed or no
    tissue), ``probabilities`` is float32 ``(gh, gw, n_classes)``, ``embeddings`` float32
    ``(gh, gw, dim)``. A cell is ``cell`` level-0 pixels wide; cell (0, 0) starts at ``origin``.
    """

    classes: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray | None
    cell: float
    origin: tuple[float, float]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]


@dataclass
class AttentionMap:
    """A cross-scale attention heatmap in [0, 1] for one backbone scale.

    ``heat`` is float32 ``(h, w)``; each value covers ``downsample`` level-0 pixels square,
    value (0, 0) starting at level-0 ``origin``. ``scale`` is the backbone scale index
    (0 = finest); ``kind`` says which attention it summarises.
    """

    heat: np.ndarray
    downsample: float
    origin: tuple[float, float]
    scale: int
    kind: str = "top-down context reliance"

    @property
    def name(self) -> str:
        return f"attention s{self.scale}"


@dataclass
class Provenance:
    """Where a result came from: enough to reproduce it and to credit the model."""

    slide_path: str
    slide_name: str
    region: Region
    level: int
    level_downsample: float
    slide_mpp: float | None
    mpp_source: str
    analysis_mpp: float
    model_name: str
    model_card: dict[str, Any]
    device: str
    precision: str
    started: str
    seconds: float = 0.0
    tiles_total: int = 0
    tiles_done: int = 0
    tiles_skipped: int = 0
    tiles_cached: int = 0
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RegionResult:
    """Everything one analysis of ``region`` produced; partial while ``complete`` is False.

    ``region`` is in level-0 pixels; ``analysis_mpp`` is the *analysis* resolution (um/px the
    model saw); the level-0 mpp, which overlays align to and level-0 sizes convert with, is
    :attr:`slide_mpp`.
    """

    region: Region
    analysis_mpp: float
    nuclei: NucleiResult | None
    tiles: TileClassResult | None
    attention: list[AttentionMap]
    provenance: Provenance
    complete: bool = True

    @property
    def slide_mpp(self) -> float | None:
        """Micrometres per **level-0** pixel this result was computed with (the slide's own, or
        the user's override): the slide layer's scale, and the factor for every level-0 length
        (regions, tile cells, centroids). None when the provenance does not record it."""
        mpp = self.provenance.slide_mpp
        return float(mpp) if mpp is not None and float(mpp) > 0 else None

    @property
    def tiles_done(self) -> int:
        return self.provenance.tiles_done

    @property
    def tiles_total(self) -> int:
        return self.provenance.tiles_total

    def summary(self) -> ResultSummary:
        """Counts per class, nuclei per mm² of analysed tissue, tile-class shares and areas:
        the numbers the dock shows, summary.json holds and the command line prints."""
        return _summarize(self)


# --------------------------------------------------------------------------- summary
_UM2_PER_MM2 = 1e6
_UNSURE_COLOR = "#808080"


@dataclass(frozen=True)
class ClassCount:
    """One class of a :class:`ResultSummary`: ``count`` nuclei or tile cells, their
    ``fraction`` of all nuclei / all analysed cells, ``color`` as ``#rrggbb``.

    ``per_mm2`` (nuclei only): nuclei of the class per mm² of analysed tissue. ``area_mm2``
    (tile classes only): the cells' area in mm². None where unknown (no level-0 mpp).
    """

    name: str
    color: str
    count: int
    fraction: float
    per_mm2: float | None = None
    area_mm2: float | None = None


@dataclass(frozen=True, eq=False)
class ResultSummary:
    """What a (possibly partial) result adds up to; see :meth:`RegionResult.summary`.

    Areas are level-0 lengths times :attr:`RegionResult.slide_mpp` (never the analysis mpp), in
    mm²; None when the level-0 mpp is unknown. ``tissue_mm2`` is the analysed tissue: the
    tile-map cells holding tissue when there is a tile map, else the analysed share of the
    region (``tissue_source`` says which). A cell is analysed when it has a class or, left
    "unsure" below a taught classifier's confidence, kept probabilities.
    """

    n_nuclei: int
    nuclei_by_class: tuple[ClassCount, ...]
    nucleus_areas_um2: np.ndarray
    tiles_by_class: tuple[ClassCount, ...]
    tiles_unsure: ClassCount | None
    analysed_cells: int
    region_mm2: float | None
    tissue_mm2: float | None
    tissue_source: str
    tiles_done: int
    tiles_total: int
    complete: bool
    cancelled: bool

    @property
    def density_per_mm2(self) -> float | None:
        """All nuclei per mm² of analysed tissue; None when that area is unknown or zero."""
        return self.n_nuclei / self.tissue_mm2 if self.tissue_mm2 else None

    @property
    def mean_nucleus_area_um2(self) -> float | None:
        """Mean nucleus area in µm²; None without nuclei."""
        areas = self.nucleus_areas_um2
        return float(areas.mean()) if len(areas) else None


def _color(colors: Sequence[str], i: int) -> str:
    return to_hex(colors[i]) if i < len(colors) else _UNSURE_COLOR


def _analysed_cells(tiles: TileClassResult) -> np.ndarray:
    """Boolean ``(gh, gw)``: cells holding analysed tissue (a class, or kept probabilities)."""
    probs = np.asarray(tiles.probabilities)
    painted = np.asarray(tiles.classes) > 0
    return painted | probs.any(-1) if probs.ndim == 3 else painted


def _mm2(level0_px2: float, mpp: float | None) -> float | None:
    """An area in square level-0 pixels as mm², with the level-0 mpp; None when it is unknown."""
    return level0_px2 * mpp**2 / _UM2_PER_MM2 if mpp else None


def _tissue_mm2(result: RegionResult, mpp: float | None) -> tuple[float | None, str]:
    tiles = result.tiles
    if tiles is not None and tiles.classes.size:
        cells = int(np.count_nonzero(_analysed_cells(tiles)))
        return _mm2(cells * float(tiles.cell) ** 2, mpp), "tissue cells of the tile map"
    share = 1.0
    if result.tiles_total > 0 and not result.complete:
        share = result.tiles_done / result.tiles_total
    return _mm2(result.region.area * share, mpp), "analysed region"


def _nuclei_counts(
    nuclei: NucleiResult | None, tissue_mm2: float | None
) -> tuple[tuple[ClassCount, ...], np.ndarray]:
    if nuclei is None or not len(nuclei.features):
        ids, areas = np.zeros(0, int), np.zeros(0, float)
    else:
        ids = nuclei.features["class_id"].to_numpy(dtype=int)
        areas = nuclei.features["area_um2"].to_numpy(dtype=float)
    rows = []
    for i, name in enumerate(nuclei.class_names if nuclei is not None else ()):
        count = int(np.count_nonzero(ids == i))
        per_mm2 = count / tissue_mm2 if tissue_mm2 else None
        fraction = count / len(ids) if len(ids) else 0.0
        rows.append(ClassCount(name, _color(nuclei.class_colors, i), count, fraction, per_mm2))
    return tuple(rows), areas


def _tile_counts(
    tiles: TileClassResult | None, mpp: float | None
) -> tuple[tuple[ClassCount, ...], ClassCount | None, int]:
    if tiles is None:
        return (), None, 0
    classes = np.asarray(tiles.classes)
    analysed = _analysed_cells(tiles)
    total = int(np.count_nonzero(analysed))

    def row(name: str, color: str, count: int) -> ClassCount:
        area = _mm2(count * float(tiles.cell) ** 2, mpp)
        return ClassCount(name, color, count, count / total if total else 0.0, area_mm2=area)

    rows = tuple(
        row(name, _color(tiles.class_colors, i), int(np.count_nonzero(classes == i + 1)))
        for i, name in enumerate(tiles.class_names)  # 0 = no tissue, not analysed or unsure
    )
    unsure = int(np.count_nonzero(analysed & (classes == 0)))
    return rows, (row("unsure", _UNSURE_COLOR, unsure) if unsure else None), total


def _summarize(result: RegionResult) -> ResultSummary:
    mpp = result.slide_mpp  # level-0 lengths (region, cells) convert with the level-0 mpp
    tissue_mm2, source = _tissue_mm2(result, mpp)
    nuclei_rows, areas = _nuclei_counts(result.nuclei, tissue_mm2)
    tile_rows, unsure, cells = _tile_counts(result.tiles, mpp)
    return ResultSummary(
        n_nuclei=len(areas),
        nuclei_by_class=nuclei_rows,
        nucleus_areas_um2=areas,
        tiles_by_class=tile_rows,
        tiles_unsure=unsure,
        analysed_cells=cells,
        region_mm2=_mm2(result.region.area, mpp),
        tissue_mm2=tissue_mm2,
        tissue_source=source,
        tiles_done=result.tiles_done,
        tiles_total=result.tiles_total,
        complete=result.complete,
        cancelled=bool(result.provenance.cancelled),
    )
