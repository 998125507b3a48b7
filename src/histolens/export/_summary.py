"""``summary.json``: what a run produced (counts per class, region, pixel size, model, times)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # the result stage sits above this one; only its types are needed here
    from histolens.result import RegionResult

__all__ = ["summary_dict"]


def summary_dict(
    result: RegionResult, *, files: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """What a run produced, for ``summary.json``: counts per class, region, mpp, model, times."""
    p = result.provenance
    mpp0 = result.slide_mpp
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
        "region_mm2": (result.region.area * mpp0**2 / 1e6) if mpp0 else None,
        "mpp": mpp0,
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
        nuc = result.nuclei
        counts = (
            nuc.features["class_name"].value_counts() if len(nuc.features) else pd.Series(dtype=int)
        )
        out["nuclei"] = {
            "count": int(nuc.count),
            "per_class": {str(n): int(counts.get(n, 0)) for n in nuc.class_names},
            "mean_area_um2": float(nuc.features["area_um2"].mean()) if len(nuc.features) else None,
            "downsample": float(nuc.downsample),
            "origin_level0_px": list(nuc.origin),
        }
    if result.tiles is not None:
        tiles = result.tiles
        classes = np.asarray(tiles.classes)
        cell_mm2 = (float(tiles.cell) * mpp0) ** 2 / 1e6 if mpp0 else None
        per_class = {}
        for k, name in enumerate(tiles.class_names):
            n = int(np.count_nonzero(classes == k + 1))
            per_class[str(name)] = {
                "cells": n,
                "mm2": n * cell_mm2 if cell_mm2 is not None else None,
            }
        out["tiles"].update(
            {
                "cell_px": float(tiles.cell),
                "analysed_cells": int(np.count_nonzero(classes)),
                "per_class": per_class,
            }
        )
    out["attention_scales"] = [a.scale for a in result.attention]
    if files:
        out["files"] = {k: Path(v).name for k, v in files.items()}
    return out
