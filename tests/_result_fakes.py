"""A hand-built :class:`~histolens.result.RegionResult` for the export tests.

A helper module, not a test module: ``test_export.py`` and ``test_export_writer.py`` import it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.draw import disk

from histolens.region import Region
from histolens.result import (
    NUCLEI_COLUMNS,
    NucleiResult,
    Provenance,
    RegionResult,
    TileClassResult,
)

NUCLEUS_TYPES = ("epithelial", "inflammatory", "stromal")
NUCLEUS_COLORS = ("#ff0000", "#00ff00", "#0000ff")
TISSUE = ("tumour", "stroma")
TISSUE_COLORS = ("#aa3377", "#66ccee")


def make_result(*, downsample: float = 2.0, origin=(1000, 2000), mpp: float = 0.25) -> RegionResult:
    """A hand-built result: 6 disk nuclei and a 2 x 3 tile grid, at a non-trivial origin."""
    h, w = 96, 128
    labels = np.zeros((h, w), np.uint32)
    centres = [(12, 14), (20, 60), (48, 30), (50, 100), (80, 20), (83, 110)]
    rows = []
    for k, (cy, cx) in enumerate(centres, start=1):
        rr, cc = disk((cy, cx), 4 + k % 3, shape=labels.shape)
        labels[rr, cc] = k
        cls = (k - 1) % 3
        rows.append(
            {
                "label": k,
                # the engine's convention: level-0 pixel-index coordinates (pixel k centred on k)
                "centroid_y": origin[0] + (cy + 0.5) * downsample - 0.5,
                "centroid_x": origin[1] + (cx + 0.5) * downsample - 0.5,
                "area_um2": float(len(rr)) * (mpp * downsample) ** 2,
                "class_id": cls,
                "class_name": NUCLEUS_TYPES[cls],
                "probability": 0.5 + 0.05 * k,
            }
        )
    features = pd.DataFrame(rows, columns=list(NUCLEI_COLUMNS))
    nuclei = NucleiResult(
        labels, features, downsample, tuple(origin), NUCLEUS_TYPES, NUCLEUS_COLORS
    )
    cell = 64.0  # level-0 px per tile cell
    classes = np.array([[1, 2, 0], [2, 1, 1]], np.int32)
    probs = np.zeros((2, 3, 2), np.float32)
    probs[..., 0] = np.where(classes == 1, 0.8, 0.3)
    probs[..., 1] = 1 - probs[..., 0]
    tiles = TileClassResult(classes, probs, None, cell, tuple(origin), TISSUE, TISSUE_COLORS)
    region = Region(
        origin[0], origin[1], origin[0] + h * int(downsample), origin[1] + w * int(downsample)
    )
    prov = Provenance(
        slide_path="/data/synthetic.tif",
        slide_name="synthetic",
        region=region,
        level=0,
        level_downsample=1.0,
        slide_mpp=mpp,
        mpp_source="user",
        analysis_mpp=mpp * downsample,
        model_name="hand-made",
        model_card={"name": "hand-made", "mpp": mpp * downsample, "tasks": ("nuclei", "tiles")},
        device="cpu",
        precision="fp32",
        started="2026-01-01T00:00:00",
        seconds=1.5,
        tiles_total=4,
        tiles_done=4,
    )
    return RegionResult(region, mpp, nuclei, tiles, [], prov)
