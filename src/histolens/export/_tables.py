"""CSV tables: the nuclei features as they are, the tile grid as one row per analysed cell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._atomic import atomic_path

if TYPE_CHECKING:
    from histolens.region import Region
    from histolens.result import TileClassResult

__all__ = ["save_csv", "tiles_table"]


def tiles_table(tiles: TileClassResult, region: Region | None = None) -> pd.DataFrame:
    """One row per analysed tile cell: its level-0 box, class and class probabilities.

    Boxes are ``[y0, y1) x [x0, x1)`` in level-0 pixels, clipped to ``region`` when given.
    """
    classes = np.asarray(tiles.classes)
    rows, cols = np.nonzero(classes > 0)
    cell = float(tiles.cell)
    oy, ox = (float(v) for v in tiles.origin)
    y0 = oy + rows * cell
    x0 = ox + cols * cell
    y1, x1 = y0 + cell, x0 + cell
    if region is not None:
        y0, x0 = np.maximum(y0, region.y0), np.maximum(x0, region.x0)
        y1, x1 = np.minimum(y1, region.y1), np.minimum(x1, region.x1)
    cls = classes[rows, cols].astype(np.int64) - 1
    names = np.asarray(tiles.class_names, dtype=object)
    probs = np.asarray(tiles.probabilities, dtype=np.float32)
    table = pd.DataFrame(
        {
            "row": rows.astype(np.int64),
            "col": cols.astype(np.int64),
            "y0": y0,
            "x0": x0,
            "y1": y1,
            "x1": x1,
            "class_id": cls,
            "class_name": names[cls] if len(cls) else np.array([], dtype=object),
            "probability": probs[rows, cols, cls] if len(cls) else np.array([], np.float32),
        }
    )
    for k, name in enumerate(tiles.class_names):
        table[f"prob_{name}"] = probs[rows, cols, k] if len(cls) else np.array([], np.float32)
    return table


def save_csv(path: Path, table: pd.DataFrame) -> Path:
    """Write ``table`` without its index, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
