"""Reading GeoJSON someone else wrote: a schema check with errors naming the file and the
feature, limits that keep a hostile file from taking the machine, and a polygon fill that
costs O(pixels + vertices), not O(pixels x vertices).

Coordinates are QuPath's: level-0 pixel *edges*, ``[x, y]`` per vertex.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAX_LABEL_PX",
    "MAX_VERTICES",
    "GeoJSONError",
    "check_sizes",
    "fill_polygon",
    "load_features",
    "positive_number",
    "polygon_parts",
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
