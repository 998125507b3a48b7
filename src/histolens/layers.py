"""A :class:`~histolens.result.RegionResult` as napari LayerDataTuples, aligned on the slide.

Pure: builds ``(data, meta, layer_type)`` tuples from numpy arrays and plain dicts, with no
napari import, so it runs headless and in tests; napari validates the tuples in
``Layer.create``. Every layer gets ``scale``/``translate`` from
:func:`histolens.region.layer_transform` (micrometres, ``units='um'``), the same rule the
slide layer follows, so overlays sit on the pixels they were computed from at every zoom.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .colors import rgba
from .region import layer_transform

if TYPE_CHECKING:
    from .result import AttentionMap, NucleiResult, RegionResult, TileClassResult

__all__ = [
    "ATTENTION_COLORMAP",
    "slide_mpp",
    "attention_layer",
    "nuclei_layer",
    "result_to_layer_data",
    "tile_class_layer",
]

#: Inferno-like ramp whose low end is transparent: low attention (and skipped glass, 0)
#: leaves the slide visible instead of painting it dark. napari builds a Colormap from
#: this dict (``colors`` RGBA, ``controls`` in [0, 1]).
ATTENTION_COLORMAP = {
    "name": "histolens attention",
    "colors": [
        (0.00, 0.00, 0.02, 0.00),
        (0.34, 0.06, 0.43, 0.45),
        (0.73, 0.21, 0.33, 0.70),
        (0.98, 0.55, 0.04, 0.85),
        (0.99, 1.00, 0.64, 0.90),
    ],
    "controls": [0.0, 0.25, 0.5, 0.75, 1.0],
}
_TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
_DEFAULT_NUCLEUS = (1.0, 1.0, 0.0, 1.0)


def _transform(mpp: float, downsample: float, origin: Sequence[float]) -> dict[str, Any]:
    scale, translate = layer_transform(mpp, downsample, origin)
    return {"scale": scale, "translate": translate, "units": ("um", "um")}


def _geometry(mpp: float, downsample: float, origin: Sequence[float]) -> dict[str, Any]:
    """Level-0 geometry kept in layer metadata, so writers can map pixels back to the slide."""
    return {
        "mpp": float(mpp),
        "downsample": float(downsample),
        "origin": [float(v) for v in origin],
    }


def slide_mpp(result: RegionResult) -> float:
    """Level-0 um/px: the slide layer's scale, which every overlay is aligned to."""
    mpp = result.slide_mpp
    if mpp is None:
        msg = (
            f"result for region {result.region.as_tuple()} has no level-0 mpp in its provenance "
            f"({result.provenance.slide_mpp!r}); it cannot be placed on the slide layer. "
            "Re-run analyze(..., mpp=...)"
        )
        raise ValueError(msg)
    return mpp


def nuclei_layer(nuclei: NucleiResult, mpp: float, *, name: str = "nuclei") -> tuple:
    """Labels layer: instances coloured by class, ``features`` indexed by label."""
    feats = nuclei.features.copy()
    # napari maps label value -> row through an "index" column (row 0 is not background).
    feats.insert(0, "index", feats["label"].astype(np.int64))
    class_colors = [rgba(c) for c in nuclei.class_colors]
    colors: dict[int | None, tuple[float, float, float, float]] = {
        None: _DEFAULT_NUCLEUS,
        0: _TRANSPARENT,
    }
    for lab, cid in zip(feats["label"].to_numpy(), feats["class_id"].to_numpy(), strict=True):
        cid = int(cid)
        colors[int(lab)] = class_colors[cid] if 0 <= cid < len(class_colors) else _DEFAULT_NUCLEUS
    meta = {
        "name": name,
        "features": feats,
        "colormap": colors,
        "opacity": 0.6,
        "blending": "translucent",
        "metadata": {
            "histolens": "nuclei",
            "class_names": list(nuclei.class_names),
            "class_colors": list(nuclei.class_colors),
            "counts": {
                n: int((feats["class_id"] == i).sum()) for i, n in enumerate(nuclei.class_names)
            },
            **_geometry(mpp, nuclei.downsample, nuclei.origin),
        },
        **_transform(mpp, nuclei.downsample, nuclei.origin),
    }
    return (nuclei.labels, meta, "labels")


def tile_class_layer(tiles: TileClassResult, mpp: float, *, name: str = "tile classes") -> tuple:
    """Labels layer of ``class + 1`` per cell with a direct colormap (0 transparent) and a legend."""
    colors: dict[int | None, tuple[float, float, float, float]] = {
        None: _TRANSPARENT,
        0: _TRANSPARENT,
    }
    for i, c in enumerate(tiles.class_colors):
        colors[i + 1] = rgba(c)
    names = list(tiles.class_names)
    feats = pd.DataFrame({"index": np.arange(len(names) + 1), "class_name": ["none", *names]})
    meta = {
        "name": name,
        "colormap": colors,
        "features": feats,
        "opacity": 0.3,
        "blending": "translucent",
        "metadata": {
            "histolens": "tile classes",
            "class_names": names,
            "class_colors": list(tiles.class_colors),
            "legend": {n: c for n, c in zip(names, tiles.class_colors, strict=True)},
            "probabilities": tiles.probabilities,
            **_geometry(mpp, tiles.cell, tiles.origin),
        },
        **_transform(mpp, tiles.cell, tiles.origin),
    }
    return (tiles.classes, meta, "labels")


def attention_layer(att: AttentionMap, mpp: float, *, name: str | None = None) -> tuple:
    """Image layer of one scale's attention heat in [0, 1]."""
    meta = {
        "name": name or att.name,
        "colormap": dict(ATTENTION_COLORMAP),
        "blending": "translucent",
        "opacity": 0.5,
        "contrast_limits": (0.0, 1.0),
        "metadata": {
            "histolens": "attention",
            "scale": att.scale,
            "kind": att.kind,
            **_geometry(mpp, att.downsample, att.origin),
        },
        **_transform(mpp, att.downsample, att.origin),
    }
    return (att.heat, meta, "image")


def result_to_layer_data(result: RegionResult, names: Sequence[str] | None = None) -> list[tuple]:
    """All layers of ``result`` as ``(data, meta, layer_type)``; ``names`` keeps only those."""
    mpp = slide_mpp(result)
    out: list[tuple] = []
    if result.nuclei is not None:
        out.append(nuclei_layer(result.nuclei, mpp))
    if result.tiles is not None:
        out.append(tile_class_layer(result.tiles, mpp))
    for att in sorted(result.attention, key=lambda a: a.scale):
        out.append(attention_layer(att, mpp))
    if names is not None:
        wanted = set(names)
        out = [t for t in out if t[1]["name"] in wanted]
    return out
