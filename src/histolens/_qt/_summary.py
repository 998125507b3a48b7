"""Numbers for the review panel, computed from a :class:`~histolens.result.RegionResult`.

Pure (no Qt, no napari), so the panel only draws. Units: areas in um^2 and mm^2,
densities in nuclei per mm^2, centroids in level-0 pixels ``(y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histolens.colors import to_hex
from histolens.result import RegionResult

__all__ = ["ClassCount", "ReviewSummary", "summarize"]

_UM2_PER_MM2 = 1e6


@dataclass(frozen=True)
class ClassCount:
    """One row of a per-class table: ``fraction`` of the total, ``color`` as ``#rrggbb``."""

    name: str
    color: str
    count: int
    fraction: float
    per_mm2: float | None = None


@dataclass(frozen=True)
class ReviewSummary:
    """What the review panel shows for one (possibly partial) result.

    ``tissue_mm2`` is the analysed tissue area: tile-class cells holding tissue when the
    tile map exists, else the analysed share of the region (``area_source`` says which).
    """

    n_nuclei: int
    nuclei_by_class: tuple[ClassCount, ...]
    tiles_by_class: tuple[ClassCount, ...]
    tissue_mm2: float
    area_source: str
    areas_um2: np.ndarray
    tiles_done: int
    tiles_total: int
    complete: bool
    cancelled: bool

    @property
    def density_per_mm2(self) -> float | None:
        """All nuclei per mm^2 of analysed tissue, None when no tissue was analysed."""
        return self.n_nuclei / self.tissue_mm2 if self.tissue_mm2 > 0 else None


def _analysed_cells(tiles) -> np.ndarray:
    """Cells holding analysed tissue: painted, or left unpainted as "unsure" (below a taught
    classifier's confidence threshold) while their probabilities are kept."""
    probs = np.asarray(tiles.probabilities)
    painted = np.asarray(tiles.classes) > 0
    return painted | probs.any(-1) if probs.ndim == 3 else painted


def _tissue_mm2(result: RegionResult) -> tuple[float, str]:
    # Tile cells and the region are in level-0 px: convert with the level-0 mpp, not the
    # analysis mpp (they differ by the analysis downsample).
    mpp = result.slide_mpp or float(result.analysis_mpp)
    tiles = result.tiles
    if tiles is not None and tiles.classes.size:
        cell_um = float(tiles.cell) * mpp
        cells = int(np.count_nonzero(_analysed_cells(tiles)))
        return cells * cell_um * cell_um / _UM2_PER_MM2, "tissue cells of the tile map"
    share = 1.0
    if result.tiles_total > 0 and not result.complete:
        share = result.tiles_done / result.tiles_total
    region_um2 = result.region.area * mpp * mpp
    return region_um2 * share / _UM2_PER_MM2, "analysed region"


def summarize(result: RegionResult) -> ReviewSummary:
    """Counts per class, density per mm^2 of tissue, tile-class shares and nucleus areas."""
    tissue_mm2, source = _tissue_mm2(result)
    nuclei_rows: list[ClassCount] = []
    areas = np.zeros(0, dtype=float)
    n = 0
    if result.nuclei is not None:
        feats = result.nuclei.features
        n = len(feats)
        areas = feats["area_um2"].to_numpy(dtype=float) if n else areas
        ids = feats["class_id"].to_numpy(dtype=int) if n else np.zeros(0, dtype=int)
        names, colors = result.nuclei.class_names, result.nuclei.class_colors
        for i, name in enumerate(names):
            count = int(np.count_nonzero(ids == i))
            nuclei_rows.append(
                ClassCount(
                    name=name,
                    color=to_hex(colors[i]) if i < len(colors) else "#808080",
                    count=count,
                    fraction=count / n if n else 0.0,
                    per_mm2=count / tissue_mm2 if tissue_mm2 > 0 else None,
                )
            )
    tile_rows: list[ClassCount] = []
    if result.tiles is not None:
        classes = result.tiles.classes
        analysed = _analysed_cells(result.tiles)
        total = int(np.count_nonzero(analysed))
        for i, name in enumerate(result.tiles.class_names):
            count = int(np.count_nonzero(classes == i + 1))  # 0 = no tissue / not analysed
            colors = result.tiles.class_colors
            tile_rows.append(
                ClassCount(
                    name=name,
                    color=to_hex(colors[i]) if i < len(colors) else "#808080",
                    count=count,
                    fraction=count / total if total else 0.0,
                )
            )
        unsure = int(np.count_nonzero(analysed & (classes == 0)))
        if unsure:
            tile_rows.append(ClassCount("unsure", "#808080", unsure, unsure / total))
    return ReviewSummary(
        n_nuclei=n,
        nuclei_by_class=tuple(nuclei_rows),
        tiles_by_class=tuple(tile_rows),
        tissue_mm2=tissue_mm2,
        area_source=source,
        areas_um2=areas,
        tiles_done=result.tiles_done,
        tiles_total=result.tiles_total,
        complete=result.complete,
        cancelled=bool(result.provenance.cancelled),
    )
