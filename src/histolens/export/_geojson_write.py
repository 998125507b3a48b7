"""QuPath GeoJSON out: nuclei as ``"detection"`` polygons, tile cells as ``"tile"`` squares.

Coordinates are level-0 pixels ``(x, y)``, pixel edges (see :mod:`._polygons` for the frame).
Feature ids are deterministic UUIDs, so two runs (single process or distributed) of the same
result produce byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histolens.colors import class_color_map, parse_color

from ._atomic import atomic_path, json_default
from ._polygons import iter_label_polygons
from ._tables import tiles_table

if TYPE_CHECKING:
    from histolens.result import RegionResult

__all__ = [
    "labels_feature_collection",
    "nuclei_feature_collection",
    "require",
    "save_geojson",
    "tiles_feature_collection",
]

#: Namespace for deterministic feature ids: the same result always gets the same UUIDs.
_ID_NAMESPACE = uuid.UUID("0b7e8c1e-3f7a-4d0e-9a56-6b1f4a2e9c11")
#: Vertex coordinates are rounded to 1/100 of a level-0 pixel: far below any display need,
#: and it keeps whole-slide GeoJSON files a fraction of the size.
_DECIMALS = 2


def _geometry(rings: list[np.ndarray]) -> dict[str, Any]:
    coords = [np.round(r, _DECIMALS).tolist() for r in rings]
    # QuPath rejects single-member MultiPolygons; only truly split shapes are Multi.
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": [coords[0]]}
    return {"type": "MultiPolygon", "coordinates": [[c] for c in coords]}


def _measurement_value(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _feature_id(key: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, key))


class _LabelRecords:
    """The features table row of a label: column arrays and a label -> row index, not one
    dict per row (a slide has millions of nuclei)."""

    def __init__(self, features: pd.DataFrame | None, label_column: str) -> None:
        self.columns: dict[str, np.ndarray] = {}
        self.row_of: dict[int, int] = {}
        if features is None or not len(features):
            return
        if label_column not in features.columns:
            msg = (
                f"features table has no {label_column!r} column "
                f"(columns: {list(features.columns)}); "
                "pass label_column= naming the column that holds label values"
            )
            raise ValueError(msg)
        self.columns = {str(c): features[c].to_numpy() for c in features.columns}
        ids = features[label_column].astype(np.int64).tolist()
        self.row_of = dict(zip(ids, range(len(ids)), strict=True))

    def __call__(self, label_id: int) -> dict[str, Any]:
        hit = self.row_of.get(label_id)
        return {} if hit is None else {c: a[hit] for c, a in self.columns.items()}


def _label_properties(
    rec: Mapping[str, Any],
    label_id: int,
    *,
    object_type: str,
    label_column: str,
    class_column: str | None,
    default_class: str | None,
    class_colors: Mapping[str, Sequence[int]],
    skip_measurements: Sequence[str],
) -> dict[str, Any]:
    """QuPath ``properties`` of one label: object type, classification, measurements."""
    props: dict[str, Any] = {"objectType": object_type, "isLocked": False}
    name = rec.get(class_column) if class_column else None
    if name is None or (isinstance(name, (float, np.floating)) and math.isnan(name)):
        name = default_class
    if name is not None:
        color = parse_color(class_colors.get(str(name)))
        props["classification"] = {"name": str(name), "color": color}
    measurements: dict[str, float] = {}
    for key, value in rec.items():
        if key in skip_measurements or key == class_column:
            continue
        v = _measurement_value(value)
        if v is not None:
            measurements[str(key)] = v
    measurements.setdefault(label_column, float(label_id))
    props["measurements"] = measurements
    return props


def labels_feature_collection(
    labels: np.ndarray,
    *,
    downsample: float = 1.0,
    origin: Sequence[float] = (0, 0),
    features: pd.DataFrame | None = None,
    label_column: str = "label",
    class_column: str | None = "class_name",
    class_colors: Mapping[str, Sequence[int]] | None = None,
    object_type: str = "detection",
    default_class: str | None = None,
    skip_measurements: Sequence[str] = ("class_id",),
    id_prefix: str = "",
    tolerance: float = 0.5,
    extra: Mapping[str, Any] | None = None,
    lazy: bool = False,
) -> dict[str, Any]:
    """A QuPath GeoJSON FeatureCollection of one polygon feature per non-zero label.

    Coordinates are level-0 pixels ``(x, y)`` (see :mod:`._polygons` for the frame).
    ``features`` (one row per label, matched on ``label_column``) gives the classification
    (``class_column``) and the numeric measurements; ``object_type`` is QuPath's
    ``"detection"``, ``"cell"``, ``"annotation"`` or ``"tile"``. ``extra`` becomes the
    collection's ``"histolens"`` member (mpp, slide, model), which QuPath ignores.
    ``lazy=True`` makes ``"features"`` a one-pass iterator that outlines each label as it is
    consumed (what :func:`save_geojson` needs for a whole slide: a few KB per nucleus
    otherwise, gigabytes for millions of nuclei).
    """
    polygons = iter_label_polygons(
        labels, downsample=downsample, origin=origin, tolerance=tolerance
    )
    record = _LabelRecords(features, label_column)
    style = {
        "object_type": object_type,
        "label_column": label_column,
        "class_column": class_column,
        "default_class": default_class,
        "class_colors": dict(class_colors or {}),
        "skip_measurements": skip_measurements,
    }
    stream = (
        {
            "type": "Feature",
            "id": _feature_id(f"{id_prefix}{object_type}:{label_id}"),
            "geometry": _geometry(rings),
            "properties": _label_properties(record(label_id), label_id, **style),
        }
        for label_id, rings in polygons
    )
    collection: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": stream if lazy else list(stream),
    }
    if extra:
        collection["histolens"] = dict(extra)
    return collection


def _result_extra(result: RegionResult, layer: str) -> dict[str, Any]:
    p = result.provenance
    return {
        "layer": layer,
        "frame": "level-0 pixels (x, y), pixel (0, 0) covers [0, 1) x [0, 1)",
        "mpp": result.slide_mpp,
        "slide": p.slide_name,
        "slide_path": p.slide_path,
        "region": result.region.as_tuple(),
        "model": p.model_name,
    }


def require(part: Any, name: str) -> Any:
    """``part`` of a result, or a ValueError naming the task that makes it."""
    if part is None:
        msg = f"this result has no {name}: analyse with the {name!r} task to export it"
        raise ValueError(msg)
    return part


def nuclei_feature_collection(
    result: RegionResult, *, tolerance: float = 0.5, lazy: bool = False
) -> dict[str, Any]:
    """The result's nuclei as QuPath ``"detection"`` polygons, classified and measured.

    ``lazy``: features as a one-pass iterator (see :func:`labels_feature_collection`).
    """
    nuc = require(result.nuclei, "nuclei")
    return labels_feature_collection(
        nuc.labels,
        downsample=nuc.downsample,
        origin=nuc.origin,
        features=nuc.features,
        class_colors=class_color_map(nuc.class_names, nuc.class_colors),
        object_type="detection",
        id_prefix=f"{result.provenance.slide_name}:{result.region.as_tuple()}:",
        tolerance=tolerance,
        extra=_result_extra(result, "nuclei"),
        lazy=lazy,
    )


def tiles_feature_collection(result: RegionResult) -> dict[str, Any]:
    """The tile-class grid as QuPath ``"tile"`` squares (level-0 px), one per analysed cell."""
    tiles = require(result.tiles, "tiles")
    table = tiles_table(tiles, result.region)
    colors = class_color_map(tiles.class_names, tiles.class_colors)
    prefix = f"{result.provenance.slide_name}:{result.region.as_tuple()}:"
    features = []
    measure_cols = ["probability"] + [f"prob_{n}" for n in tiles.class_names]
    for rec in table.to_dict("records"):
        y0, x0, y1, x1 = rec["y0"], rec["x0"], rec["y1"], rec["x1"]
        if y1 <= y0 or x1 <= x0:
            continue
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]  # counter-clockwise in (x, y)
        name = str(rec["class_name"])
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(f"{prefix}tile:{rec['row']}:{rec['col']}"),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "isLocked": False,
                    "name": f"tile {rec['row']},{rec['col']}",
                    "classification": {"name": name, "color": colors.get(name, parse_color(None))},
                    "measurements": {c: float(rec[c]) for c in measure_cols},
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "features": features,
        "histolens": {**_result_extra(result, "tile classes"), "cell_px": float(tiles.cell)},
    }


def save_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically, one feature per line (diff- and stream-friendly)."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        head = {k: v for k, v in collection.items() if k != "features"}
        # Streamed feature by feature so a whole slide never needs one giant string.
        opening = json.dumps(head, default=json_default)[:-1]
        fh.write(opening + (', "features": [' if head else '"features": ['))
        for i, feature in enumerate(collection.get("features", ())):
            fh.write(",\n" if i else "\n")
            fh.write(json.dumps(feature, default=json_default, allow_nan=False))
        fh.write("\n]}\n")
    return target
