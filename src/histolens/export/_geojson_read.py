"""GeoJSON in: a (QuPath or HistoLens) file read back as plain polygons, a table and an mpp.

Reading what someone else wrote: a schema check with errors naming the file and the feature,
limits that keep a hostile file from taking the machine, and a polygon fill that costs
O(pixels + vertices), not O(pixels x vertices). Coordinates are QuPath's: level-0 pixel
*edges*, ``[x, y]`` per vertex. Plain data only: :func:`histolens.layers.geojson_to_layer_data`
turns a :class:`GeoJSONShapes` into napari layers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histolens.colors import parse_color

__all__ = [
    "GeoJSONError",
    "GeoJSONShapes",
    "fill_polygon",
    "read_geojson",
]

#: Most vertices in one file (all rings): far above a whole slide's nuclei outlines.
MAX_VERTICES = 50_000_000
#: Most pixels of a labels layer made from a file (4 bytes each: 1 GiB).
MAX_LABEL_PX = 2**28
#: Pixels per pass of the polygon fill (bounds its temporaries).
_BAND_PX = 1 << 22


class GeoJSONError(ValueError):
    """A GeoJSON file that cannot be imported; the message names the file (and feature)."""


def load_features(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The features of a GeoJSON file (FeatureCollection, one Feature or a bare list) and its
    ``histolens`` metadata dict; every feature is a dict (index order kept)."""
    src = Path(path)
    fix = "export it again from QuPath or HistoLens"
    try:
        text = src.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        msg = f"{src} is not a GeoJSON text file (not UTF-8: binary data?); {fix}"
        raise GeoJSONError(msg) from None
    try:
        doc = json.loads(text)
    except RecursionError:  # the parser's own nesting limit (the interpreter's, ~1000)
        msg = f"{src} nests JSON arrays/objects too deeply; GeoJSON polygons need 6 levels"
        raise GeoJSONError(msg) from None
    except json.JSONDecodeError as exc:
        msg = f"{src} is not valid JSON ({exc}); {fix}"
        raise GeoJSONError(msg) from None
    if isinstance(doc, list):  # QuPath can also write a bare list of features
        doc = {"type": "FeatureCollection", "features": doc}
    if not isinstance(doc, dict):
        msg = f"{src} holds a JSON {type(doc).__name__}; expected a GeoJSON FeatureCollection"
        raise GeoJSONError(msg)
    if doc.get("type") == "Feature":
        doc = {"type": "FeatureCollection", "features": [doc]}
    if doc.get("type") != "FeatureCollection":
        msg = f"{src} holds a GeoJSON {doc.get('type')!r}; expected a FeatureCollection of polygons"
        raise GeoJSONError(msg)
    features = doc.get("features", [])
    if not isinstance(features, list):
        msg = f"{src}: 'features' is a {type(features).__name__}; GeoJSON needs a list of features"
        raise GeoJSONError(msg)
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            msg = f"{src}: feature {i} is {json.dumps(feature)[:40]}, not a GeoJSON Feature object"
            raise GeoJSONError(msg)
    extra = doc.get("histolens") or {}
    if not isinstance(extra, dict):
        msg = f"{src}: 'histolens' metadata is a {type(extra).__name__}; expected an object"
        raise GeoJSONError(msg)
    return features, extra


def positive_number(value: Any, what: str) -> float:
    """``value`` as a finite float > 0, or a :class:`GeoJSONError` saying ``what`` it was."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        msg = f"{what} must be a positive finite number, got {value!r}"
        raise GeoJSONError(msg)
    return number


def polygon_parts(feature: dict[str, Any], index: int, src: Path) -> list[np.ndarray] | None:
    """Exterior rings of a Polygon / MultiPolygon feature as ``(n, 2)`` float64 ``(y, x)``
    level-0 edge coordinates, closing vertex dropped; ``None`` for other geometries (points and
    lines have no area). Rings of fewer than 3 vertices are skipped."""
    where = f"{src}: feature {index}"
    geom = feature.get("geometry")
    if geom is None:
        return None
    if not isinstance(geom, dict):
        msg = f"{where}: 'geometry' is a {type(geom).__name__}; expected an object"
        raise GeoJSONError(msg)
    kind = geom.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        return None
    coords = geom.get("coordinates")
    if not isinstance(coords, list):
        msg = f"{where}: a {kind} needs 'coordinates' (a list of rings), got {coords!r:.40}"
        raise GeoJSONError(msg)
    polygons = [coords] if kind == "Polygon" else coords
    rings = []
    for p, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or not polygon:
            msg = f"{where}: polygon {p} is not a list of rings"
            raise GeoJSONError(msg)
        ring = _ring(polygon[0], f"{where}, polygon {p}")
        if np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if len(ring) >= 3:
            rings.append(np.ascontiguousarray(ring[:, 1::-1]))  # [x, y(, z)] -> (y, x)
    return rings


def _ring(ring: Any, where: str) -> np.ndarray:
    if not isinstance(ring, list) or not ring:
        msg = f"{where}: the exterior ring is not a list of [x, y] positions"
        raise GeoJSONError(msg)
    try:
        arr = np.asarray(ring, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        arr = np.zeros((0,))
    if arr.ndim != 2 or arr.shape[1] < 2:
        msg = f"{where}: the exterior ring must be a list of [x, y] number pairs"
        raise GeoJSONError(msg)
    if not np.isfinite(arr[:, :2]).all():
        msg = f"{where}: the exterior ring has NaN or infinite coordinates"
        raise GeoJSONError(msg)
    return arr


def check_sizes(src: Path, polygons: Sequence[np.ndarray]) -> None:
    """Refuse files whose rings hold more than :data:`MAX_VERTICES` vertices in all."""
    total = sum(len(p) for p in polygons)
    if total > MAX_VERTICES:
        msg = f"{src} has {total} vertices, more than {MAX_VERTICES} (not a nuclei/tile export?)"
        raise GeoJSONError(msg)


def fill_polygon(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray, value: int) -> None:
    """Set ``labels`` pixels whose centre lies inside the polygon to ``value`` (even-odd rule).

    ``rows``, ``cols``: vertex coordinates in ``labels``' pixel-centre frame (pixel ``(r, c)``
    has its centre at ``(r, c)``). Scanline fill: each edge gives one crossing per pixel row it
    spans, spans between paired crossings are filled through a per-row difference array, so the
    cost is O(vertices + crossings + bounding-box pixels), not O(pixels x vertices).
    """
    h, w = labels.shape
    r0, r1 = rows, np.roll(rows, -1)
    c0, c1 = cols, np.roll(cols, -1)
    lo, hi = np.minimum(r0, r1), np.maximum(r0, r1)
    # Pixel rows k with lo <= k < hi (half-open: a vertex on a row counts once), clipped.
    first = np.clip(np.ceil(lo), 0, h).astype(np.int64)
    last = np.clip(np.ceil(hi), 0, h).astype(np.int64)
    n = np.maximum(last - first, 0)
    if n.sum() == 0:
        return
    edge = np.repeat(np.arange(len(rows)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + first[edge]
    t = (k - r0[edge]) / (r1[edge] - r0[edge])
    x = c0[edge] + t * (c1[edge] - c0[edge])
    order = np.lexsort((x, k))
    k, x = k[order], x[order]
    # Crossings come in pairs per row (closed polygon, half-open rule): fill between them.
    start = np.clip(np.ceil(x[0::2]), 0, w).astype(np.int64)
    stop = np.clip(np.floor(x[1::2]) + 1, 0, w).astype(np.int64)
    row = k[0::2]
    keep = stop > start
    if not keep.any():
        return
    row, start, stop = row[keep], start[keep], stop[keep]  # sorted by row
    x0, x1 = int(start.min()), int(stop.max())
    band = max(1, _BAND_PX // (x1 - x0 + 1))  # rows per pass: bounded temporaries
    for y0 in range(int(row[0]), int(row[-1]) + 1, band):
        i, j = np.searchsorted(row, [y0, y0 + band])
        if i == j:
            continue
        r = row[i:j] - y0
        diff = np.zeros((int(r[-1]) + 1, x1 - x0 + 1), np.int32)
        np.add.at(diff, (r, start[i:j] - x0), 1)
        np.add.at(diff, (r, stop[i:j] - x0), -1)
        inside = np.cumsum(diff, axis=1, dtype=np.int32)[:, :-1] > 0
        labels[y0 : y0 + len(inside), x0:x1][inside] = value


# --------------------------------------------------------------------------- plain shapes
def _feature_record(feature: Mapping[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """A feature's table row (id, object type, class, measurements) and its class colour.

    Lenient about what only decorates: a property that is not an object counts as absent.
    """

    def obj(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    props = obj(feature.get("properties"))
    cls = props.get("classification")
    cls = {"name": cls} if isinstance(cls, str) else obj(cls)
    names = cls.get("names")
    name = cls.get("name") or (names[0] if isinstance(names, list) and names else None)
    rec: dict[str, Any] = {
        "id": feature.get("id"),
        "objectType": props.get("objectType") or props.get("object_type"),
        "class_name": name,
    }
    meas = props.get("measurements") or {}
    if isinstance(meas, list):  # QuPath <= 0.3 wrote [{"name": ..., "value": ...}]
        meas = {m.get("name"): m.get("value") for m in meas if isinstance(m, dict)}
    rec.update(obj(meas))
    try:
        color = parse_color(cls.get("color"))
    except (TypeError, ValueError):
        color = parse_color(None)
    return rec, color


@dataclass
class GeoJSONShapes:
    """The polygons of a GeoJSON file, in level-0 pixels.

    ``polygons``: exterior rings as ``(n, 2)`` float64 ``(y, x)`` level-0 *edge* coordinates
    (closing vertex dropped); ``owner[i]``: the feature ring ``i`` belongs to; one table row
    (:meth:`table`: id, objectType, class_name, measurements) and one RGB colour per feature.
    ``mpp``: um per level-0 px (the caller's, else the file's ``histolens.mpp``), None when
    unknown; ``name``: the layer name the file asks for (else its stem); ``extra``: the file's
    ``histolens`` metadata.
    """

    source: Path
    name: str
    mpp: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    polygons: list[np.ndarray] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    colors: list[list[int]] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per feature with polygons (id, objectType, class_name, measurements)."""
        if self.records:
            return pd.DataFrame.from_records(self.records)
        return pd.DataFrame(columns=["id", "objectType", "class_name"])

    def rasterise(self, downsample: float = 1.0) -> tuple[np.ndarray, tuple[int, int]]:
        """Feature ``i`` filled with label ``i + 1`` (uint32) over the rings' bounding box at
        ``downsample`` level-0 px per pixel, and the box's level-0 origin ``(y0, x0)``.

        Raises :class:`GeoJSONError` when that image would exceed :data:`MAX_LABEL_PX`.
        """
        f = positive_number(downsample, "downsample (level-0 px per label pixel)")
        if not self.polygons:
            return np.zeros((0, 0), np.uint32), (0, 0)
        allpts = np.vstack(self.polygons)
        y0, x0 = (int(math.floor(v)) for v in allpts.min(axis=0))
        y1, x1 = (int(math.ceil(v)) for v in allpts.max(axis=0))
        shape = (max(1, math.ceil((y1 - y0) / f)), max(1, math.ceil((x1 - x0) / f)))
        if shape[0] * shape[1] > MAX_LABEL_PX:
            msg = (
                f"{self.source}: its shapes span {y1 - y0} x {x1 - x0} level-0 px, a {shape[0]} "
                f"x {shape[1]} labels layer at downsample {f:g} (more than {MAX_LABEL_PX:.3g} "
                "px); import it as shapes, or with a larger downsample"
            )
            raise GeoJSONError(msg)
        labels = np.zeros(shape, np.uint32)
        for poly, index in zip(self.polygons, self.owner, strict=True):
            # Array pixel (r, c) has its centre at level-0 edge coordinate y0 + (r + 0.5) f.
            rows, cols = (poly[:, 0] - y0) / f - 0.5, (poly[:, 1] - x0) / f - 0.5
            fill_polygon(labels, rows, cols, index + 1)
        return labels, (y0, x0)


def _file_mpp(src: Path, mpp: float | None, meta_extra: Mapping[str, Any]) -> float | None:
    """The argument's mpp, else the file's ``histolens.mpp``, else None; checked positive."""
    if mpp is not None:
        return positive_number(mpp, "mpp (um per level-0 px)")
    if meta_extra.get("mpp") is None:
        return None
    return positive_number(meta_extra["mpp"], f"{src}: 'histolens.mpp' (um per level-0 px)")


def read_geojson(path: str | os.PathLike[str], *, mpp: float | None = None) -> GeoJSONShapes:
    """The polygon features of a (QuPath or HistoLens) GeoJSON file; points and lines, which
    have no area, are left out. ``mpp`` (um per level-0 px) overrides the file's own.

    Raises :class:`GeoJSONError` naming the file (and feature) for anything malformed or too big.
    """
    src = Path(path)
    features, extra = load_features(src)
    shapes = GeoJSONShapes(
        source=src,
        name=str(extra.get("layer") or src.name.split(".")[0]),
        mpp=_file_mpp(src, mpp, extra),
        extra=extra,
    )
    for i, feature in enumerate(features):
        parts = polygon_parts(feature, i, src)
        if parts is None:
            continue
        rec, color = _feature_record(feature)
        index = len(shapes.records)
        shapes.records.append(rec)
        shapes.colors.append(color)
        shapes.polygons.extend(parts)
        shapes.owner.extend([index] * len(parts))
    check_sizes(src, shapes.polygons)
    return shapes
