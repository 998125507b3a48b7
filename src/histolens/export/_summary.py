"""``summary.json``: what a run produced (counts per class, areas, region, pixel size, model,
times). The numbers come from :meth:`~histolens.result.RegionResult.summary`; this module only
lays them out as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the result stage sits above this one; only its types are needed here
    from histolens.result import RegionResult, ResultSummary

__all__ = ["summary_dict"]


def summary_dict(
    result: RegionResult, *, files: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """What a run produced, for ``summary.json``: counts per class, region, mpp, model, times.

    Areas in mm², densities in nuclei per mm² of analysed tissue, lengths in level-0 px.
    """
    p = result.provenance
    s = result.summary()
    out: dict[str, Any] = {
        "slide": {
            "name": p.slide_name,
            "path": p.slide_path,
            "mpp": p.slide_mpp,
            "mpp_source": p.mpp_source,
        },
        "region_level0_px": {
            "y0": result.region.y0,
            "x0": result.region.x0,
            "y1": result.region.y1,
            "x1": result.region.x1,
        },
        "region_mm2": s.region_mm2,
        "tissue_mm2": s.tissue_mm2,
        "tissue_source": s.tissue_source,
        "mpp": result.slide_mpp,
        "analysis_mpp": p.analysis_mpp,
        "level": p.level,
        "level_downsample": p.level_downsample,
        "complete": result.complete,
        "model": {"name": p.model_name, "card": p.model_card},
        "device": p.device,
        "precision": p.precision,
        "started": p.started,
        "seconds": p.seconds,
        "timings": dict(p.timings),
        "tiles": {
            "total": p.tiles_total,
            "done": p.tiles_done,
            "skipped": p.tiles_skipped,
            "cached": p.tiles_cached,
            "cancelled": p.cancelled,
        },
    }
    if result.nuclei is not None:
        out["nuclei"] = {
            "count": s.n_nuclei,
            "per_class": {str(c.name): c.count for c in s.nuclei_by_class},
            "per_mm2": s.density_per_mm2,
            "mean_area_um2": s.mean_nucleus_area_um2,
            "downsample": float(result.nuclei.downsample),
            "origin_level0_px": list(result.nuclei.origin),
        }
    if result.tiles is not None:
        out["tiles"].update(_tile_classes(s, float(result.tiles.cell)))
    out["attention_scales"] = [a.scale for a in result.attention]
    if files:
        out["files"] = {k: Path(v).name for k, v in files.items()}
    return out


def _tile_classes(s: ResultSummary, cell_px: float) -> dict[str, Any]:
    return {
        "cell_px": cell_px,
        "analysed_cells": s.analysed_cells,
        "unsure_cells": s.tiles_unsure.count if s.tiles_unsure is not None else 0,
        "per_class": {str(c.name): {"cells": c.count, "mm2": c.area_mm2} for c in s.tiles_by_class},
    }
