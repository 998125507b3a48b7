"""What one analysis of a region produces, in level-0 pixels, before it becomes layers or files.

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

from .region import Region

__all__ = [
    "NUCLEI_COLUMNS",
    "AttentionMap",
    "NucleiResult",
    "Provenance",
    "RegionResult",
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

    ``region`` is in level-0 pixels; ``analysis_mpp`` is the *analysis* resolution (um/px the model
    saw); the level-0 mpp, which overlays align to and level-0 sizes convert with, is
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

    def to_layer_data(self, *, names: Sequence[str] | None = None) -> list[tuple]:
        """napari LayerDataTuples ``(data, meta, layer_type)``, aligned on the slide layer."""
        from .layers import result_to_layer_data

        return result_to_layer_data(self, names=names)
