"""napari writer contribution: Labels layers -> one QuPath GeoJSON file (level-0 pixels).

napari hands us each layer as ``(data, meta, layer_type)``. The layer sits on the slide
through ``scale``/``translate`` in micrometres (:func:`histolens.region.layer_transform`),
so the level-0 geometry is recovered by inverting that rule with the slide's ``mpp``, read
from the layer metadata HistoLens puts there. Without an mpp the world units are taken as
level-0 pixels (the file says so in its ``histolens.frame`` member).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .colors import class_color_map
from .export import labels_feature_collection, save_geojson

__all__ = ["level0_geometry", "write_geojson"]

#: Layer names whose labels are class values over a grid (one polygon per class), not instances.
_CLASS_MAP_NAMES = ("tile classes",)


def _histolens_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    md = dict(meta.get("metadata") or {})
    nested = md.get("histolens")
    return {**md, **nested} if isinstance(nested, Mapping) else md


def level0_geometry(meta: Mapping[str, Any]) -> tuple[float, tuple[float, float], float | None]:
    """``(downsample, origin (y0, x0), mpp)`` of a Labels layer, in level-0 pixels.

    Uses ``metadata["downsample"]``/``["origin"]`` when present; otherwise inverts
    ``scale = mpp * f`` and ``translate = mpp * (y0 + (f - 1) / 2)`` with ``metadata["mpp"]``
    (um/px), or with mpp = 1 when the layer carries none.
    """
    md = _histolens_meta(meta)
    mpp = md.get("mpp", md.get("slide_mpp"))
    mpp = float(mpp) if mpp else None
    if mpp is None:
        warnings.warn(
            f"layer {meta.get('name')!r} carries no level-0 mpp in its metadata ('mpp'); its "
            "GeoJSON is written in the layer's world units, not slide pixels. Export from the "
            "HistoLens dock (or histolens.export.write_result) for level-0 pixel coordinates",
            stacklevel=3,
        )
    if "downsample" in md and "origin" in md:
        oy, ox = (float(v) for v in md["origin"])
        return float(md["downsample"]), (oy, ox), mpp
    scale = [float(v) for v in list(meta.get("scale") or (1.0, 1.0))[-2:]]
    translate = [float(v) for v in list(meta.get("translate") or (0.0, 0.0))[-2:]]
    m = mpp or 1.0
    f = scale[0] / m
    if not math.isclose(scale[0], scale[1], rel_tol=1e-6):
        msg = (
            f"layer {meta.get('name')!r} has non-square pixels (scale {scale}); "
            "cannot map it to level-0 pixels"
        )
        raise ValueError(msg)
    origin = (translate[0] / m - (f - 1.0) / 2.0, translate[1] / m - (f - 1.0) / 2.0)
    return f, origin, mpp


def _features(meta: Mapping[str, Any]) -> pd.DataFrame | None:
    feats = meta.get("features")
    if feats is None:
        return None
    table = feats if isinstance(feats, pd.DataFrame) else pd.DataFrame(feats)
    if not len(table):
        return None
    table = table.copy()
    if "label" not in table.columns:
        # napari: an 'index' column maps label value -> row; without it row i is label i.
        table["label"] = table["index"] if "index" in table.columns else np.arange(len(table))
    return table


def _class_colors(md: Mapping[str, Any]) -> dict[str, list[int]]:
    return class_color_map(md.get("class_names") or (), md.get("class_colors") or ())


def write_geojson(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """Write the given Labels layers to ``path`` as one QuPath GeoJSON FeatureCollection.

    Instance layers (e.g. ``"nuclei"``) become ``"detection"`` polygons with their
    ``features`` as measurements; class-map layers (``"tile classes"``) become one
    ``"annotation"`` polygon per class. Returns the written path, as napari expects.
    """
    features: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"layers": []}
    for data, meta, layer_type in layer_data:
        if layer_type != "labels":
            msg = f"the HistoLens GeoJSON writer takes Labels layers, got a {layer_type!r} layer"
            raise ValueError(msg)
        labels = np.asarray(
            data[0] if isinstance(data, (list, tuple)) else data
        )  # multiscale: finest
        name = str(meta.get("name") or "labels")
        md = _histolens_meta(meta)
        f, origin, mpp = level0_geometry(meta)
        colors = _class_colors(md)
        table = _features(meta)
        if (
            name in _CLASS_MAP_NAMES
            or md.get("histolens") in _CLASS_MAP_NAMES
            or md.get("kind") == "class map"
        ):
            class_names = list(md.get("class_names") or ())
            values = np.unique(labels[labels > 0])
            table = pd.DataFrame(
                {
                    "label": values,
                    "class_name": [
                        class_names[int(v) - 1]
                        if 0 < int(v) <= len(class_names)
                        else f"class {int(v)}"
                        for v in values
                    ],
                }
            )
            object_type = "annotation"
        else:
            object_type = "detection"
        fc = labels_feature_collection(
            labels,
            downsample=f,
            origin=origin,
            features=table,
            class_colors=colors,
            object_type=object_type,
            default_class=None if table is not None else name,
            skip_measurements=("class_id", "index"),
            id_prefix=f"{name}:",
        )
        features.extend(fc["features"])
        extra["layers"].append(name)
        if mpp is not None:
            extra["mpp"] = mpp
    extra["frame"] = (
        "level-0 pixels (x, y)" if "mpp" in extra else "world units of the layers (no mpp)"
    )
    save_geojson(
        Path(path), {"type": "FeatureCollection", "histolens": extra, "features": features}
    )
    return [str(path)]
