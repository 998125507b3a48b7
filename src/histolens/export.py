"""Results as files: QuPath GeoJSON, CSV tables, OME-TIFF / OME-Zarr masks, summary.json, a PNG.

Everything written here is in **level-0 pixels** of the slide, the frame QuPath uses for
GeoJSON: ``x`` to the right, ``y`` down, pixel ``(0, 0)`` covering ``[0, 1) x [0, 1)`` (pixel
*edges*, not centres). A label array at ``downsample`` ``f`` whose pixel (0, 0) starts at
level-0 ``origin = (y0, x0)`` has its array pixel ``(r, c)`` covering level-0
``[y0 + r f, y0 + (r + 1) f) x [x0 + c f, x0 + (c + 1) f)``.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so a failed or cancelled export never leaves a half-written file where a good one was.

No napari import: :func:`geojson_to_layer_data` returns plain LayerDataTuples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .region import Region, layer_transform

if TYPE_CHECKING:  # the result stage sits above this one; only its types are needed here
    from .result import RegionResult, TileClassResult

__all__ = [
    "DEFAULT_FORMATS",
    "MASK_FORMATS",
    "atomic_path",
    "geojson_to_layer_data",
    "labels_feature_collection",
    "iter_label_polygons",
    "labels_to_polygons",
    "level0_mpp",
    "nuclei_feature_collection",
    "parse_color",
    "render_overview_png",
    "save_geojson",
    "summary_dict",
    "tiles_feature_collection",
    "tiles_table",
    "write_result",
]

#: What :func:`write_result` writes by default.
DEFAULT_FORMATS: tuple[str, ...] = ("geojson", "csv", "ome-tiff", "summary")
#: The two mask containers :func:`write_result` knows.
MASK_FORMATS: tuple[str, ...] = ("ome-tiff", "ome-zarr")
_ALL_FORMATS = ("geojson", "csv", "ome-tiff", "ome-zarr", "summary", "png")

#: Namespace for deterministic feature ids: the same result always gets the same UUIDs, so
#: two runs (single process or distributed) produce byte-identical GeoJSON.
_ID_NAMESPACE = uuid.UUID("0b7e8c1e-3f7a-4d0e-9a56-6b1f4a2e9c11")
#: Vertex coordinates are rounded to 1/100 of a level-0 pixel: far below any display need,
#: and it keeps whole-slide GeoJSON files a fraction of the size.
_DECIMALS = 2
#: Pixels per band when a whole label image is scanned (bounds the temporaries).
_BAND_PX = 1 << 20
#: Overview PNGs outline nuclei at least this many output pixels across, and dot smaller ones.
_MIN_OUTLINE_PX = 3.0


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and for folders (OME-Zarr). On any exception (including
    ``KeyboardInterrupt``) the temporary is deleted and an existing ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename on one filesystem (atomic for files).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (as a file or a folder)
    try:
        yield tmp
        if tmp.is_dir():
            _replace_dir(tmp, target)
        else:
            if not tmp.exists():
                msg = f"the writer for {target} produced nothing at {tmp}"
                raise RuntimeError(msg)
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    # Folders cannot be swapped atomically; move the old one aside first so the target
    # name always points at a complete store (old or new), never a mixture.
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars/arrays, tuples, paths, regions and dataclasses in cards."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Region):
        return {"y0": value.y0, "x0": value.x0, "y1": value.y1, "x1": value.x1}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    msg = f"cannot write {type(value).__name__} value {value!r} to JSON"
    raise TypeError(msg)


# --------------------------------------------------------------------------- colours
def parse_color(
    color: str | Sequence[float] | None, default: Sequence[int] = (128, 128, 128)
) -> list[int]:
    """``[r, g, b]`` integers 0..255 from ``"#rrggbb"``, a CSS name or an RGB(A) sequence.

    Sequences of floats all <= 1 are taken as 0..1 (napari's convention), others as 0..255.
    """
    if color is None:
        return [int(v) for v in default][:3]
    if isinstance(color, str):
        from PIL import ImageColor

        try:
            rgb = ImageColor.getrgb(color)
        except ValueError:
            msg = f"colour {color!r} is neither '#rrggbb' nor a CSS colour name"
            raise ValueError(msg) from None
        return [int(v) for v in rgb[:3]]
    values = [float(v) for v in color][:3]
    if len(values) != 3:
        msg = f"colour {color!r} needs three components (r, g, b)"
        raise ValueError(msg)
    if all(v <= 1.0 for v in values):
        values = [v * 255.0 for v in values]
    return [int(round(min(max(v, 0.0), 255.0))) for v in values]


def _class_color_map(names: Sequence[str], colors: Sequence[Any]) -> dict[str, list[int]]:
    return {
        str(n): parse_color(colors[i] if i < len(colors) else None) for i, n in enumerate(names)
    }


# --------------------------------------------------------------------------- polygons
def _ring_to_level0(
    contour: np.ndarray, offset: tuple[int, int], downsample: float, origin: Sequence[float]
) -> np.ndarray:
    """(row, col) contour of a crop -> closed (x, y) ring in level-0 px (edge convention)."""
    f = float(downsample)
    # find_contours puts array pixel centres at integer coordinates; the centre of array
    # pixel r is level-0 y0 + (r + 0.5) f in the edge convention GeoJSON uses.
    ys = float(origin[0]) + (contour[:, 0] + offset[0] + 0.5) * f
    xs = float(origin[1]) + (contour[:, 1] + offset[1] + 0.5) * f
    ring = np.stack([xs, ys], axis=1)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    # RFC 7946: exterior rings counter-clockwise by the shoelace sign in (x, y).
    x, y = ring[:, 0], ring[:, 1]
    if float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) < 0:
        ring = ring[::-1]
    return ring


def labels_to_polygons(
    labels: np.ndarray,
    *,
    downsample: float = 1.0,
    origin: Sequence[float] = (0, 0),
    tolerance: float = 0.5,
) -> dict[int, list[np.ndarray]]:
    """Outline every non-zero label as closed rings in level-0 pixels ``(x, y)``.

    The dict of :func:`iter_label_polygons` (see there for frames and simplification).
    """
    return dict(
        iter_label_polygons(labels, downsample=downsample, origin=origin, tolerance=tolerance)
    )


def iter_label_polygons(
    labels: np.ndarray,
    *,
    downsample: float = 1.0,
    origin: Sequence[float] = (0, 0),
    tolerance: float = 0.5,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(label, rings)`` for every non-zero label, in ascending label order, one at a time.

    ``labels`` is an integer ``(h, w)`` array at ``downsample`` level-0 px per pixel, pixel
    (0, 0) starting at level-0 ``origin = (y0, x0)``. Each label maps to one ring per
    connected part (marching squares at the 0.5 iso-line of its mask, holes filled: a
    nucleus is exported as its outline), simplified with Douglas-Peucker at ``tolerance``
    array pixels (0 keeps every vertex). Rings are ``(n, 2)`` float arrays, first == last.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        msg = f"labels must be a 2-D (h, w) array, got shape {lab.shape}"
        raise ValueError(msg)
    if lab.dtype.kind not in "iu":
        msg = f"labels must be integers (0 = background), got dtype {lab.dtype}"
        raise ValueError(msg)
    # Checked above, outlined lazily below: a bad array fails here, not mid-way through a file.
    return _outline_labels(lab, downsample, origin, tolerance)


def _outline_labels(
    lab: np.ndarray, downsample: float, origin: Sequence[float], tolerance: float
) -> Iterator[tuple[int, list[np.ndarray]]]:
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    if lab.size == 0 or not lab.any():
        return
    # Unique ids band by band: np.unique on a whole slide's labels would sort a full copy.
    band = max(1, _BAND_PX // max(1, lab.shape[1]))
    present = np.unique(
        np.concatenate([np.unique(lab[y : y + band]) for y in range(0, lab.shape[0], band)])
    )
    present = present[present != 0]
    # find_objects allocates one slot per value up to the maximum; compact sparse ids first.
    if int(present[-1]) > 4 * len(present) + 1024:
        compact = np.searchsorted(present, lab).astype(np.int64) + 1
        compact[lab == 0] = 0
        lookup = present
    else:
        compact, lookup = lab, None
    for index, box in enumerate(ndimage.find_objects(compact)):
        if box is None:
            continue
        value = index + 1
        label_id = int(lookup[index]) if lookup is not None else value
        mask = ndimage.binary_fill_holes(compact[box] == value)
        padded = np.pad(mask, 1).astype(np.uint8)
        rings = []
        offset = (box[0].start - 1, box[1].start - 1)
        for contour in find_contours(padded, 0.5):
            if len(contour) < 4:
                continue
            if tolerance > 0:
                simple = approximate_polygon(contour, tolerance)
                # Keep the full trace when simplification would collapse a tiny shape.
                contour = simple if len(simple) >= 4 else contour
            rings.append(_ring_to_level0(contour, offset, downsample, origin))
        if rings:
            yield label_id, rings


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

    Coordinates are level-0 pixels ``(x, y)`` (see the module docstring for the frame).
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
    columns: dict[str, np.ndarray] = {}
    row_of: dict[int, int] = {}
    if features is not None and len(features):
        if label_column not in features.columns:
            msg = (
                f"features table has no {label_column!r} column "
                f"(columns: {list(features.columns)}); "
                "pass label_column= naming the column that holds label values"
            )
            raise ValueError(msg)
        # Column arrays and a label -> row index, not one dict per row (a slide has millions).
        columns = {str(c): features[c].to_numpy() for c in features.columns}
        ids = features[label_column].astype(np.int64).tolist()
        row_of = dict(zip(ids, range(len(ids)), strict=True))
    colors = dict(class_colors or {})

    def record(label_id: int) -> dict[str, Any]:
        hit = row_of.get(label_id)
        return {} if hit is None else {c: a[hit] for c, a in columns.items()}

    def feature(label_id: int, rings: list[np.ndarray]) -> dict[str, Any]:
        rec = record(label_id)
        props: dict[str, Any] = {"objectType": object_type, "isLocked": False}
        name = rec.get(class_column) if class_column else None
        if name is None or (isinstance(name, (float, np.floating)) and math.isnan(name)):
            name = default_class
        if name is not None:
            props["classification"] = {
                "name": str(name),
                "color": parse_color(colors.get(str(name))),
            }
        measurements: dict[str, float] = {}
        for key, value in rec.items():
            if key in skip_measurements or key == class_column:
                continue
            v = _measurement_value(value)
            if v is not None:
                measurements[str(key)] = v
        measurements.setdefault(label_column, float(label_id))
        props["measurements"] = measurements
        return {
            "type": "Feature",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{id_prefix}{object_type}:{label_id}")),
            "geometry": _geometry(rings),
            "properties": props,
        }

    stream = (feature(label_id, rings) for label_id, rings in polygons)
    collection: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": stream if lazy else list(stream),
    }
    if extra:
        collection["histolens"] = dict(extra)
    return collection


def level0_mpp(result: RegionResult) -> float | None:
    """Micrometres per **level-0** pixel that the result's geometry was computed with.

    The engine records the analysis pixel size (``provenance.analysis_mpp``, um per analysis
    pixel) and each array's ``downsample`` (level-0 px per array pixel); their ratio is the
    level-0 pixel size actually used, even when the user overrode the slide's own mpp.
    """
    p = result.provenance
    if result.nuclei is not None and p.analysis_mpp and result.nuclei.downsample:
        return float(p.analysis_mpp) / float(result.nuclei.downsample)
    if p.slide_mpp:
        return float(p.slide_mpp)
    return float(result.mpp) if result.mpp else None


def _result_extra(result: RegionResult, layer: str) -> dict[str, Any]:
    p = result.provenance
    return {
        "layer": layer,
        "frame": "level-0 pixels (x, y), pixel (0, 0) covers [0, 1) x [0, 1)",
        "mpp": level0_mpp(result),
        "slide": p.slide_name,
        "slide_path": p.slide_path,
        "region": result.region.as_tuple(),
        "model": p.model_name,
    }


def nuclei_feature_collection(
    result: RegionResult, *, tolerance: float = 0.5, lazy: bool = False
) -> dict[str, Any]:
    """The result's nuclei as QuPath ``"detection"`` polygons, classified and measured.

    ``lazy``: features as a one-pass iterator (see :func:`labels_feature_collection`).
    """
    nuc = _require(result.nuclei, "nuclei")
    return labels_feature_collection(
        nuc.labels,
        downsample=nuc.downsample,
        origin=nuc.origin,
        features=nuc.features,
        class_colors=_class_color_map(nuc.class_names, nuc.class_colors),
        object_type="detection",
        id_prefix=f"{result.provenance.slide_name}:{result.region.as_tuple()}:",
        tolerance=tolerance,
        extra=_result_extra(result, "nuclei"),
        lazy=lazy,
    )


def _require(part: Any, name: str) -> Any:
    if part is None:
        msg = f"this result has no {name}: analyse with the {name!r} task to export it"
        raise ValueError(msg)
    return part


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


def tiles_feature_collection(result: RegionResult) -> dict[str, Any]:
    """The tile-class grid as QuPath ``"tile"`` squares (level-0 px), one per analysed cell."""
    tiles = _require(result.tiles, "tiles")
    table = tiles_table(tiles, result.region)
    colors = _class_color_map(tiles.class_names, tiles.class_colors)
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
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{prefix}tile:{rec['row']}:{rec['col']}")),
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
        opening = json.dumps(head, default=_json_default)[:-1]
        fh.write(opening + (', "features": [' if head else '"features": ['))
        for i, feature in enumerate(collection.get("features", ())):
            fh.write(",\n" if i else "\n")
            fh.write(json.dumps(feature, default=_json_default, allow_nan=False))
        fh.write("\n]}\n")
    return target


# --------------------------------------------------------------------------- tables, masks
def _save_csv(path: Path, table: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _save_ome_tiff(
    path: Path,
    array: np.ndarray,
    *,
    pixel_um: float | None,
    origin_um: tuple[float, float] | None,
    name: str,
) -> Path:
    import tifffile

    metadata: dict[str, Any] = {"axes": "YX", "Name": name}
    if pixel_um is not None:
        metadata.update(
            PhysicalSizeX=pixel_um,
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=pixel_um,
            PhysicalSizeYUnit="µm",
        )
    if origin_um is not None:
        # OME Plane positions place the mask on the slide: level-0 edge of pixel (0, 0) in um.
        metadata["Plane"] = {
            "PositionY": [origin_um[0]],
            "PositionX": [origin_um[1]],
            "PositionYUnit": ["µm"],
            "PositionXUnit": ["µm"],
        }
    big = array.nbytes > 2**31
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            array,
            ome=True,
            bigtiff=big,
            photometric="minisblack",
            tile=(256, 256) if min(array.shape) >= 256 else None,
            compression="zlib",
            metadata=metadata,
        )
    return path


def _save_ome_zarr(
    path: Path,
    array: np.ndarray,
    *,
    pixel_um: float | None,
    origin_um: tuple[float, float] | None,
    name: str,
    level0_um: float | None = None,
) -> Path:
    import zarr

    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        chunks = (min(1024, max(array.shape[0], 1)), min(1024, max(array.shape[1], 1)))
        data = group.create_array(
            "0", shape=array.shape, dtype=array.dtype, chunks=chunks, fill_value=0
        )
        data[...] = array
        scale = [pixel_um or 1.0, pixel_um or 1.0]
        # NGFF maps pixel *centres* (integer indices) to space: the centre of pixel (0, 0) is
        # half an output pixel minus half a level-0 pixel past its edge, the same rule as
        # histolens.region.layer_transform, so viewers lay it on the slide like our layers.
        translation = [0.0, 0.0]
        if origin_um is not None and pixel_um is not None and level0_um:
            translation = [o + (pixel_um - level0_um) / 2.0 for o in origin_um]
        unit = "micrometer" if pixel_um is not None else None
        axes = [
            {"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in ("y", "x")
        ]
        # OME-NGFF 0.5 (zarr v3): the "ome" member carries multiscales (integer masks are
        # also marked as label images).
        group.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [
                {
                    "name": name,
                    "axes": axes,
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [
                                {"type": "scale", "scale": scale},
                                {"type": "translation", "translation": translation},
                            ],
                        }
                    ],
                }
            ],
        }
        if np.issubdtype(array.dtype, np.integer):
            group.attrs["ome"] = {**group.attrs["ome"], "image-label": {"version": "0.5"}}
    return path


def _mask_geometry(mpp: float | None, downsample: float, origin: Sequence[float]):
    if mpp is None:
        return None, None
    pixel = float(mpp) * float(downsample)
    return pixel, (float(mpp) * float(origin[0]), float(mpp) * float(origin[1]))


def _smallest_uint(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.uint64, copy=False)


# --------------------------------------------------------------------------- summary
def summary_dict(
    result: RegionResult, *, files: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """What a run produced, for ``summary.json``: counts per class, region, mpp, model, times."""
    p = result.provenance
    mpp0 = level0_mpp(result)
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


def _save_json(path: Path, payload: Mapping[str, Any]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=_json_default)
        fh.write("\n")
    return path


# --------------------------------------------------------------------------- write_result
def write_result(
    result: RegionResult,
    out_dir: str | os.PathLike[str],
    *,
    slide: Any = None,
    formats: Iterable[str] = DEFAULT_FORMATS,
    tolerance: float = 0.5,
) -> dict[str, Path]:
    """Write a result's files into ``out_dir`` and return ``{kind: path}``.

    ``formats`` picks among ``"geojson"`` (``nuclei.geojson``, ``tiles.geojson``), ``"csv"``
    (``nuclei.csv``, ``tiles.csv``), ``"ome-tiff"`` / ``"ome-zarr"`` (``nuclei_labels`` and
    ``tile_classes`` masks and float32 ``attention_s<k>`` heat maps, each at its own
    resolution, pixel size ``mpp * downsample`` um),
    ``"summary"`` (``summary.json``, written last and listing the others) and ``"png"``
    (``overview.png``, needs ``slide``). Parts the result lacks (a task not run) are skipped.
    """
    wanted = [str(f).lower() for f in formats]
    unknown = sorted(set(wanted) - set(_ALL_FORMATS))
    if unknown:
        msg = f"unknown export format(s) {unknown}; choose from {list(_ALL_FORMATS)}"
        raise ValueError(msg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    timings: dict[str, float] = {}
    nuc, tiles = result.nuclei, result.tiles
    mpp0 = level0_mpp(result)

    def timed(kind: str, fn, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        files[kind] = fn(*args, **kwargs)
        timings[kind] = round(time.perf_counter() - t0, 4)

    if "geojson" in wanted:
        if nuc is not None:
            timed(
                "nuclei.geojson",
                lambda: save_geojson(
                    out / "nuclei.geojson",
                    nuclei_feature_collection(result, tolerance=tolerance, lazy=True),
                ),
            )
        if tiles is not None:
            timed(
                "tiles.geojson",
                lambda: save_geojson(out / "tiles.geojson", tiles_feature_collection(result)),
            )
    if "csv" in wanted:
        if nuc is not None:
            timed("nuclei.csv", _save_csv, out / "nuclei.csv", nuc.features)
        if tiles is not None:
            timed("tiles.csv", _save_csv, out / "tiles.csv", tiles_table(tiles, result.region))
    for fmt, suffix in (("ome-tiff", ".ome.tif"), ("ome-zarr", ".ome.zarr")):
        if fmt not in wanted:
            continue
        if fmt == "ome-tiff":
            saver: Any = _save_ome_tiff
        else:

            def saver(*args: Any, **kwargs: Any) -> Path:
                return _save_ome_zarr(*args, level0_um=mpp0, **kwargs)

        masks: list[tuple[str, np.ndarray, float, Sequence[float], str]] = []
        if nuc is not None:
            labels = _smallest_uint(np.asarray(nuc.labels))
            masks.append(("nuclei_labels", labels, nuc.downsample, nuc.origin, "nuclei"))
        if tiles is not None:
            classes = _smallest_uint(np.asarray(tiles.classes).clip(min=0))
            masks.append(("tile_classes", classes, tiles.cell, tiles.origin, "tile classes"))
        for att in result.attention:
            # Heat in [0, 1] as float32 images, on the slide like the masks.
            heat = np.asarray(att.heat, dtype=np.float32)
            masks.append((f"attention_s{att.scale}", heat, att.downsample, att.origin, att.name))
        for stem, array, f, origin, label in masks:
            px, org = _mask_geometry(mpp0, f, origin)
            timed(
                stem + suffix,
                saver,
                out / (stem + suffix),
                array,
                pixel_um=px,
                origin_um=org,
                name=label,
            )
    if "png" in wanted:
        timed("overview.png", render_overview_png, slide, result, out / "overview.png")
    if "summary" in wanted:
        summary = summary_dict(result, files={**files, "summary.json": out / "summary.json"})
        summary["export_seconds"] = timings
        files["summary.json"] = _save_json(out / "summary.json", summary)
    return files


# --------------------------------------------------------------------------- PNG overview
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _read_background(slide: Any, region: Region, out_hw: tuple[int, int]) -> np.ndarray:
    """Slide pixels of ``region`` resized to ``out_hw``, read at the coarsest sufficient level."""
    from PIL import Image

    h, w = out_hw
    if slide is None:
        return np.full((h, w, 3), 245, np.uint8)
    need = region.height / h  # level-0 px per output px
    downsamples = [float(d) for d in getattr(slide, "downsamples", (1.0,))]
    level = max(
        (i for i, d in enumerate(downsamples) if d <= need * 1.01),
        key=lambda i: downsamples[i],
        default=0,
    )
    pixels = np.asarray(slide.read_region(region, level=level))
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(pixels[..., :3]).astype(np.uint8))
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))


def render_overview_png(
    slide: Any,
    result: RegionResult,
    path: str | os.PathLike[str],
    *,
    max_side: int = 2048,
    tile_alpha: float = 0.30,
) -> Path:
    """Draw the analysed region with nuclei outlines (by class), a tile-class tint and a legend.

    Nuclei under 3 output pixels across (a whole slide at overview scale) are drawn as one
    dot each in their class colour instead of outlines.

    The image covers ``result.region`` with its longer side at most ``max_side`` pixels;
    ``slide`` (anything with ``read_region(region, level)`` and ``downsamples``) gives the
    background, or a blank canvas when None. Written atomically as PNG.
    """
    from PIL import Image, ImageDraw

    region = result.region
    if region.is_empty:
        msg = f"cannot render an empty region {region}"
        raise ValueError(msg)
    s = min(1.0, float(max_side) / max(region.height, region.width))  # output px per level-0 px
    out_h, out_w = max(1, round(region.height * s)), max(1, round(region.width * s))
    base = _read_background(slide, region, (out_h, out_w)).astype(np.float32)

    legend: list[tuple[str, list[int], str]] = []
    if result.tiles is not None:
        tiles = result.tiles
        classes = np.asarray(tiles.classes)
        colors = np.array([[0, 0, 0]] + [parse_color(c) for c in tiles.class_colors], np.float32)
        # Output pixel centre -> level-0 -> tile cell (the same edge convention as GeoJSON).
        ys = region.y0 + (np.arange(out_h) + 0.5) / s
        xs = region.x0 + (np.arange(out_w) + 0.5) / s
        rows = np.floor((ys - tiles.origin[0]) / tiles.cell).astype(np.int64)
        cols = np.floor((xs - tiles.origin[1]) / tiles.cell).astype(np.int64)
        ok_r = (rows >= 0) & (rows < classes.shape[0])
        ok_c = (cols >= 0) & (cols < classes.shape[1])
        grid = np.zeros((out_h, out_w), np.int64)
        grid[np.ix_(ok_r, ok_c)] = classes[np.ix_(rows[ok_r], cols[ok_c])]
        tinted = grid > 0
        base[tinted] = (1 - tile_alpha) * base[tinted] + tile_alpha * colors[
            grid[tinted].clip(0, len(colors) - 1)
        ]
        present = np.unique(classes[classes > 0])
        for k in present:
            name = tiles.class_names[int(k) - 1]
            legend.append(
                (
                    f"{name} ({int(np.count_nonzero(classes == k))} cells)",
                    parse_color(tiles.class_colors[int(k) - 1]),
                    "fill",
                )
            )

    nuc = result.nuclei if result.nuclei is not None and result.nuclei.count else None
    cmap = _class_color_map(nuc.class_names, nuc.class_colors) if nuc is not None else {}
    dots = nuc is not None and _nucleus_diameter_px(result, s) < _MIN_OUTLINE_PX
    if dots:
        # A whole slide at overview scale: nuclei are a pixel or less, outlines would be
        # invisible (and tracing millions of them takes many minutes). One dot per nucleus.
        f = nuc.features
        yy = np.floor((f["centroid_y"].to_numpy() + 0.5 - region.y0) * s).astype(np.int64)
        xx = np.floor((f["centroid_x"].to_numpy() + 0.5 - region.x0) * s).astype(np.int64)
        rgb = np.array(
            [cmap.get(str(n), [255, 255, 0]) for n in f["class_name"].astype(str)], np.float32
        ).reshape(-1, 3)
        ok = (yy >= 0) & (yy < out_h) & (xx >= 0) & (xx < out_w)
        base[yy[ok], xx[ok]] = rgb[ok]
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if nuc is not None:
        by_label = dict(
            zip(
                nuc.features["label"].astype(int),
                nuc.features["class_name"].astype(str),
                strict=True,
            )
        )
        # Simplify at about one output pixel: finer vertices are invisible at this scale.
        tol = max(0.5, 0.8 / (s * float(nuc.downsample)))
        width = 2 if s >= 0.5 else 1
        outlines = (
            ()
            if dots
            else iter_label_polygons(
                nuc.labels, downsample=nuc.downsample, origin=nuc.origin, tolerance=tol
            )
        )
        for label_id, rings in outlines:
            color = tuple(cmap.get(by_label.get(label_id, ""), [255, 255, 0]))
            for ring in rings:
                pts = [((x - region.x0) * s, (y - region.y0) * s) for x, y in ring]
                if len(pts) >= 3:
                    draw.line(pts, fill=color, width=width)
        counts = nuc.features["class_name"].value_counts()
        for name in nuc.class_names:
            if counts.get(name, 0):
                legend.insert(0, (f"{name} nuclei ({int(counts[name])})", cmap[name], "outline"))
    _draw_legend(img, legend, result)
    target = Path(path)
    with atomic_path(target) as tmp:
        img.save(tmp, format="PNG")
    return target


def _nucleus_diameter_px(result: RegionResult, scale: float) -> float:
    """Median nucleus diameter in output pixels at ``scale`` output px per level-0 px (inf
    when unknown, so outlines are drawn)."""
    mpp0 = level0_mpp(result)
    area = result.nuclei.features["area_um2"].to_numpy(dtype=np.float64)
    if not mpp0 or not len(area) or not np.isfinite(np.median(area)):
        return math.inf
    return 2.0 * math.sqrt(float(np.median(area)) / math.pi) / mpp0 * scale


def _draw_legend(img: Any, entries: list[tuple[str, list[int], str]], result: RegionResult) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img, "RGBA")
    size = max(11, min(22, img.width // 60))
    font = _font(size)
    title = f"{result.provenance.slide_name}  {result.provenance.model_name}"
    mpp0 = level0_mpp(result)
    if mpp0:
        title += f"  {mpp0:.3g} um/px"
    lines = [(title, None, "")] + [(t, c, k) for t, c, k in entries]
    pad, box = size // 2, size
    widths = [
        draw.textlength(t, font=font) + (box + pad if c is not None else 0) for t, c, _ in lines
    ]
    lw = int(max(widths) + 2 * pad)
    lh = int(len(lines) * (size + pad) + pad)
    x0, y0 = pad, img.height - lh - pad
    if y0 < 0 or lw > img.width:  # a tiny render: no room for a legend that would hide it all
        return
    draw.rectangle([x0, y0, x0 + lw, y0 + lh], fill=(255, 255, 255, 210), outline=(60, 60, 60, 255))
    y = y0 + pad
    for text, color, kind in lines:
        x = x0 + pad
        if color is not None:
            rgb = tuple(color)
            if kind == "fill":
                draw.rectangle([x, y, x + box, y + box], fill=rgb + (160,), outline=rgb + (255,))
            else:
                draw.ellipse([x, y, x + box, y + box], outline=rgb + (255,), width=2)
            x += box + pad
        draw.text((x, y), text, fill=(20, 20, 20, 255), font=font)
        y += size + pad


# --------------------------------------------------------------------------- import back
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


def geojson_to_layer_data(
    path: str | os.PathLike[str],
    *,
    as_labels: bool = False,
    mpp: float | None = None,
    downsample: float = 1.0,
) -> list[tuple[Any, dict[str, Any], str]]:
    """Read a (QuPath or HistoLens) GeoJSON file back as napari LayerDataTuples.

    Default: one ``"shapes"`` layer of polygons (every ring kept, vertices ``(y, x)``), edge
    colours from each feature's classification, a ``features`` table of class + measurements.
    ``as_labels=True`` rasterises the polygons instead into a ``"labels"`` layer at
    ``downsample`` level-0 px per pixel covering their bounding box. Both are aligned on the
    slide layer through :func:`histolens.region.layer_transform`, using ``mpp`` (um/px) from
    the argument, else the file's ``histolens.mpp``, else 1 (world units = level-0 px).
    """
    from ._geojson import check_sizes, load_features, polygon_parts, positive_number

    src = Path(path)
    features, meta_extra = load_features(src)
    if mpp is None:
        mpp = meta_extra.get("mpp")
        if mpp is not None:
            mpp = positive_number(mpp, f"{src}: 'histolens.mpp' (um per level-0 px)")
    else:
        mpp = positive_number(mpp, "mpp (um per level-0 px)")
    world = float(mpp) if mpp else 1.0

    polygons: list[np.ndarray] = []  # (n, 2) (y, x) level-0 edge coordinates, ring closure dropped
    owner: list[int] = []
    records: list[dict[str, Any]] = []
    colors: list[list[int]] = []
    for i, feature in enumerate(features):
        parts = polygon_parts(feature, i, src)
        if parts is None:
            continue  # points and lines have no area to show as a nucleus or a tile
        rec, color = _feature_record(feature)
        index = len(records)
        records.append(rec)
        colors.append(color)
        polygons.extend(parts)
        owner.extend([index] * len(parts))
    check_sizes(src, polygons)
    table = (
        pd.DataFrame.from_records(records)
        if records
        else pd.DataFrame(columns=["id", "objectType", "class_name"])
    )
    layer_name = str(meta_extra.get("layer") or src.name.split(".")[0])
    metadata = {
        "histolens": {"source": os.fspath(src), "mpp": mpp, "frame": "level-0 pixels", **meta_extra}
    }

    if not as_labels:
        scale, translate = layer_transform(world, 1.0, (0.0, 0.0))
        # GeoJSON vertices are pixel-edge coordinates; napari data coordinates put pixel
        # centres at integers, so an edge coordinate e is data coordinate e - 0.5.
        data = [p - 0.5 for p in polygons]
        shape_features = table.iloc[owner].reset_index(drop=True) if owner else table.iloc[:0]
        edge = [np.array(colors[i] + [255], np.float32) / 255.0 for i in owner]
        meta = {
            "name": layer_name,
            "shape_type": "polygon",
            "scale": scale,
            "translate": translate,
            "edge_color": np.array(edge) if edge else "yellow",
            "face_color": "transparent",
            "edge_width": 1.0,
            "features": shape_features,
            "metadata": metadata,
        }
        if world != 1.0 or mpp:
            meta["units"] = "um"
        return [(data, meta, "shapes")]

    from ._geojson import MAX_LABEL_PX, GeoJSONError, fill_polygon

    f = positive_number(downsample, "downsample (level-0 px per label pixel)")
    if not polygons:
        labels = np.zeros((0, 0), np.uint32)
        y0 = x0 = 0
    else:
        allpts = np.vstack(polygons)
        y0, x0 = (int(math.floor(v)) for v in allpts.min(axis=0))
        y1, x1 = (int(math.ceil(v)) for v in allpts.max(axis=0))
        shape = (max(1, math.ceil((y1 - y0) / f)), max(1, math.ceil((x1 - x0) / f)))
        if shape[0] * shape[1] > MAX_LABEL_PX:
            msg = (
                f"{src}: its shapes span {y1 - y0} x {x1 - x0} level-0 px, a {shape[0]} x "
                f"{shape[1]} labels layer at downsample {f:g} (more than {MAX_LABEL_PX:.3g} px); "
                "import it as shapes, or with a larger downsample"
            )
            raise GeoJSONError(msg)
        labels = np.zeros(shape, np.uint32)
        for poly, index in zip(polygons, owner, strict=True):
            # Array pixel (r, c) has its centre at level-0 edge coordinate y0 + (r + 0.5) f.
            fill_polygon(
                labels, (poly[:, 0] - y0) / f - 0.5, (poly[:, 1] - x0) / f - 0.5, index + 1
            )
    scale, translate = layer_transform(world, f, (y0, x0))
    label_table = table.copy()
    label_table.insert(0, "index", np.arange(1, len(table) + 1))
    meta = {
        "name": layer_name,
        "scale": scale,
        "translate": translate,
        "features": label_table,
        "metadata": {**metadata, "downsample": f, "origin": (y0, x0)},
    }
    return [(labels, meta, "labels")]
