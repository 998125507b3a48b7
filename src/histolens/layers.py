"""napari's vocabulary: every LayerDataTuple the package makes, aligned on the slide.

A slide (:func:`slide_to_layer_data`), a :class:`~histolens.result.RegionResult`
(:func:`result_to_layer_data`), a :class:`~histolens.explain.PointExplanation`
(:func:`explanation_to_layer_data`) and a GeoJSON file (:func:`geojson_to_layer_data`) become
``(data, meta, layer_type)`` tuples here, and nowhere else. Pure: numpy arrays and plain dicts,
no napari import, so it runs headless and in tests; napari validates the tuples in
``Layer.create``. Every overlay gets ``scale``/``translate`` from
:func:`histolens.region.layer_transform` (micrometres, ``units='um'``), the same rule the
slide layer follows, so overlays sit on the pixels they were computed from at every zoom.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .colors import rgba
from .region import Region, layer_transform

if TYPE_CHECKING:
    from .explain import PointExplanation
    from .export import GeoJSONShapes
    from .result import AttentionMap, NucleiResult, RegionResult, TileClassResult
    from .slide import Slide

__all__ = [
    "EXPLAIN_TAG",
    "SCALE_COLORS",
    "LayerData",
    "explanation_to_layer_data",
    "geojson_to_layer_data",
    "result_to_layer_data",
    "slide_to_layer_data",
]

#: A napari LayerDataTuple: ``(data, layer kwargs, layer type)``.
LayerData = tuple[Any, dict[str, Any], str]

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


def _placed_mpp(result: RegionResult) -> float:
    """The result's level-0 um/px (the slide layer's scale, which every overlay is aligned to),
    or a ValueError saying how to get one."""
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
    mpp = _placed_mpp(result)
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


# --------------------------------------------------------------------------- slides
def slide_to_layer_data(slide: Slide) -> LayerData:
    """``(levels, kwargs, "image")`` for ``viewer.add_image(levels, **kwargs)``.

    The layer is in micrometres (``scale=(mpp, mpp)``, ``units="um"``, no translate) so overlays
    placed with :func:`histolens.region.layer_transform` line up. Without an mpp the scale is 1
    (level-0 pixels) and a warning says how to set it. ``metadata`` holds the slide facts
    (path, vendor, mpp, shapes) and the :class:`~histolens.slide.Slide` itself under ``"slide"``.
    """
    if slide.mpp is None:
        warnings.warn(
            f"{slide.name}: no pixel size (mpp) known, the layer is shown in pixels (scale 1); "
            "set it with open_slide(path, mpp=...) or the HistoLens dock's mpp field",
            UserWarning,
            stacklevel=2,
        )
        scale, units = (1.0, 1.0), "pixel"
    else:
        scale, units = (slide.mpp, slide.mpp), "um"
    meta = {
        "name": slide.name,
        "multiscale": True,
        "rgb": True,
        "scale": scale,
        "units": units,
        "metadata": {**slide.facts(), "slide": slide},
    }
    return (list(slide.levels), meta, "image")


# --------------------------------------------------------------------------- GeoJSON
def geojson_to_layer_data(
    path: str | os.PathLike[str],
    *,
    as_labels: bool = False,
    mpp: float | None = None,
    downsample: float = 1.0,
) -> list[LayerData]:
    """Read a (QuPath or HistoLens) GeoJSON file back as napari LayerDataTuples.

    Default: one ``"shapes"`` layer of polygons (every ring kept, vertices ``(y, x)``), edge
    colours from each feature's classification, a ``features`` table of class + measurements.
    ``as_labels=True`` rasterises the polygons instead into a ``"labels"`` layer at
    ``downsample`` level-0 px per pixel covering their bounding box. Both are aligned on the
    slide layer through :func:`histolens.region.layer_transform`, using ``mpp`` (um/px) from
    the argument, else the file's ``histolens.mpp``, else 1 (world units = level-0 px).
    Malformed files raise :class:`histolens.export.GeoJSONError` naming the file and feature.
    """
    from .export import read_geojson  # the file stage loads only when a file is read

    shapes = read_geojson(path, mpp=mpp)
    if as_labels:
        return [_geojson_labels(shapes, downsample)]
    return [_geojson_shapes(shapes)]


def _geojson_metadata(shapes: GeoJSONShapes) -> dict[str, Any]:
    return {
        "histolens": {
            "source": os.fspath(shapes.source),
            "mpp": shapes.mpp,
            "frame": "level-0 pixels",
            **shapes.extra,
        }
    }


def _geojson_shapes(shapes: GeoJSONShapes) -> LayerData:
    scale, translate = layer_transform(shapes.mpp or 1.0, 1.0, (0.0, 0.0))
    # GeoJSON vertices are pixel-edge coordinates; napari data coordinates put pixel
    # centres at integers, so an edge coordinate e is data coordinate e - 0.5.
    data = [p - 0.5 for p in shapes.polygons]
    table = shapes.table()
    owner = shapes.owner
    shape_features = table.iloc[owner].reset_index(drop=True) if owner else table.iloc[:0]
    edge = [np.array(shapes.colors[i] + [255], np.float32) / 255.0 for i in owner]
    meta = {
        "name": shapes.name,
        "shape_type": "polygon",
        "scale": scale,
        "translate": translate,
        "edge_color": np.array(edge) if edge else "yellow",
        "face_color": "transparent",
        "edge_width": 1.0,
        "features": shape_features,
        "metadata": _geojson_metadata(shapes),
    }
    if shapes.mpp:
        meta["units"] = "um"
    return (data, meta, "shapes")


def _geojson_labels(shapes: GeoJSONShapes, downsample: float) -> LayerData:
    labels, origin = shapes.rasterise(downsample)
    f = float(downsample)
    scale, translate = layer_transform(shapes.mpp or 1.0, f, origin)
    label_table = shapes.table()
    label_table.insert(0, "index", np.arange(1, len(label_table) + 1))
    meta = {
        "name": shapes.name,
        "scale": scale,
        "translate": translate,
        "features": label_table,
        "metadata": {**_geojson_metadata(shapes), "downsample": f, "origin": origin},
    }
    return (labels, meta, "labels")


# --------------------------------------------------------------------------- explanations
#: ``layer.metadata`` key marking the layers of an explanation (value: the layer's role).
EXPLAIN_TAG = "histolens_explain"
#: Outline colour per scale (finest first), also used by the dock's bar chart.
SCALE_COLORS = ("#00e5ff", "#ffd400", "#ff4fd8", "#7cff4f", "#ff8c1a")


def _explain_layer_name(scale: int) -> str:
    """Layer name of one scale's heat: ``"same scale"`` or ``"looked at (scale k)"``."""
    return "same scale" if scale == 0 else f"looked at (scale {scale})"


def explanation_to_layer_data(expl: PointExplanation, head: int | None = None) -> list[LayerData]:
    """An explanation as tuples in micrometres, aligned on the slide layer: one heat image per
    scale (``"same scale"``, ``"looked at (scale k)"``; coarsest first) and ``"explain
    windows"``: the explained token's outline (white, first) and the outline of each window it
    read. ``head`` picks one attention head (default: their mean)."""
    mpp = expl.slide_mpp
    out: list[LayerData] = []
    for w in sorted(expl.scales, key=lambda w: -w.scale):  # coarsest at the bottom
        heat = w.heat(head).astype(np.float32)
        name = _explain_layer_name(w.scale)
        meta = {
            "name": name,
            "colormap": dict(ATTENTION_COLORMAP),
            "blending": "translucent",
            "opacity": 0.7,
            # Each map uses its own range: coarse weights are spread over many tokens; the
            # share per scale (in the metadata and the dock) says how much each map weighs.
            "contrast_limits": (0.0, max(float(heat.max()), 1e-12)),
            "metadata": {EXPLAIN_TAG: name, "share": w.share(head)},
            **_transform(mpp, w.downsample, w.origin),
        }
        out.append((heat, meta, "image"))
    out.append(_explain_windows(expl))
    return out


def _corners(box: Region) -> np.ndarray:
    # napari puts level-0 pixel k's centre at k: the box's edges are at y0 - 0.5 and y1 - 0.5.
    return np.array([[box.y0 - 0.5, box.x0 - 0.5], [box.y1 - 0.5, box.x1 - 0.5]])


def _explain_windows(expl: PointExplanation) -> LayerData:
    """Rectangles: the explained token (white) and the window it read at each scale."""
    fov = expl.field_of_view_um()
    token_um = max(expl.token_box.shape) * expl.slide_mpp
    boxes = [_corners(expl.token_box)] + [_corners(w.box) for w in expl.scales]
    colors = ["#ffffff"] + [SCALE_COLORS[w.scale % len(SCALE_COLORS)] for w in expl.scales]
    labels = [""] + [f"scale {w.scale}: {fov[w.scale]:.0f} µm" for w in expl.scales]
    meta = {
        "name": "explain windows",
        "shape_type": "rectangle",
        "edge_color": colors,
        "face_color": "transparent",
        "edge_width": 3,
        # no text on the canvas: nested windows share corners, so labels would overlap; the
        # dock's bars carry the same colours and sizes (and hovering a rectangle shows it)
        "features": {"label": labels},
        "metadata": {EXPLAIN_TAG: "explain windows", "token_um": token_um},
        **_transform(expl.slide_mpp, 1.0, (0.0, 0.0)),
    }
    return (boxes, meta, "shapes")
