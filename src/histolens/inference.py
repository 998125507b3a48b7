"""Region -> tiles -> model -> aligned :class:`~histolens.result.RegionResult`.

:func:`analyze` is a generator: it yields a partial result (``complete=False``) each time a
batch of tiles finishes, so a GUI can show progress, paint overlays as they arrive and cancel,
and it ends with the full result (also its return value). :func:`analyze_region` drains it.

Pipeline per region: choose the pyramid level by the model's mpp (``choose_level``), lay the
global tile grid (:mod:`histolens.tiles`) over the region in *analysis pixels*, look tiles up
in a byte-bounded LRU cache, read the missing ones in a background thread (prefetching the
next batch while the model runs the current one), skip glass by a cheap tissue test, run the
model in batches (halving the batch on an out-of-memory error), post-process nuclei per tile
and keep the instances whose centroid the tile owns, and paste everything into region-sized
canvases. Nothing here imports torch at module level; the model object hides it.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from .models.precision import resolve_precision
from .region import LevelChoice, Region, choose_level
from .result import (
    NUCLEI_COLUMNS,
    AttentionMap,
    NucleiResult,
    Provenance,
    RegionResult,
    TileClassResult,
)
from .tiles import (
    Block,
    CellCanvas,
    InstanceCanvas,
    Tile,
    TileGrid,
    TileInstances,
    cells_covering,
    group_tiles,
    plan_grid,
    read_analysis_box,
    split_instances,
    tissue_fraction,
)

__all__ = [
    "ALL_TASKS",
    "AnalysisPlan",
    "TileCache",
    "TileModel",
    "analyze",
    "analyze_region",
    "default_cache",
    "ResultAssembly",
    "TileOutput",
    "card_to_dict",
    "order_blocks",
    "plan_analysis",
    "resolve_device",
    "resolve_model",
    "resolve_precision",
    "resolve_tasks",
    "nuclei_box",
    "run_blocks",
]

ALL_TASKS: tuple[str, ...] = ("nuclei", "tiles", "attention")

#: Fraction of a tile's owned pixels that must look like tissue for the model to run on it.
MIN_TISSUE_FRACTION = 0.02

#: Context (um) kept around a block's owned area when its nuclei are decoded and
#: post-processed: a nucleus whose centroid the block owns lies inside it (nuclei are
#: under ~15 um across), with room for the watershed's distance map. The rest of the halo
#: serves only the backbone's context, so the full-resolution decoder skips it.
NUCLEI_MARGIN_UM = 16.0


@runtime_checkable
class TileModel(Protocol):
    """What the engine needs from a model (``histolens.models`` objects satisfy it)."""

    card: Any

    def predict_tiles(
        self, tiles: np.ndarray, *, tasks: Sequence[str] = ..., precision: str = ...
    ) -> dict[str, Any]: ...


# -- cache ---------------------------------------------------------------------------------


@dataclass
class TileOutput:
    """Everything kept from one tile, cropped to the cells/pixels the tile owns."""

    skipped: bool
    instances: TileInstances | None = None
    tile_probs: np.ndarray | None = None  # (n, n, C) cells of class_cell_px
    embeddings: np.ndarray | None = None  # (n, n, D)
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # scale -> (n, n)
    #: Where ``instances`` are complete (global analysis px): None for the whole tile, else
    #: the part inside the view it was computed for (its nuclei were decoded there only).
    nuclei_area: Region | None = None

    def has_nuclei_for(self, need: Region) -> bool:
        """True when the instances cover ``need`` (a part of the tile, analysis px)."""
        return self.nuclei_area is None or self.nuclei_area.contains(need)

    @property
    def nbytes(self) -> int:
        n = 256  # bookkeeping overhead of the entry itself
        if self.instances is not None:
            n += self.instances.nbytes
        for a in (self.tile_probs, self.embeddings, *self.attention.values()):
            if a is not None:
                n += int(a.nbytes)
        return n


class TileCache:
    """LRU of :class:`TileOutput` bounded by bytes; thread-safe.

    Keys hold the slide identity, the model name and weights hash, the analysis mpp, the
    level and the tile's global box, so panning back (or a region overlapping a previous one)
    costs only the tiles not seen yet.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if max_bytes < 0:
            msg = f"TileCache max_bytes must be >= 0 bytes, got {max_bytes}"
            raise ValueError(msg)
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[tuple, TileOutput] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> TileOutput | None:
        with self._lock:
            out = self._data.get(key)
            if out is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return out

    def put(self, key: tuple, value: TileOutput) -> None:
        size = value.nbytes
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._data[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._data:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)


_DEFAULT_CACHE = TileCache()


def default_cache() -> TileCache:
    """The process-wide tile cache used when ``analyze(cache=None)``."""
    return _DEFAULT_CACHE


# Objects without a stable content hash (in-memory slides, random-weight models) get a
# token that lives as long as they do, so a new object never reuses a dead one's entries.
_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _object_token(obj: Any) -> str:
    try:
        tok = _TOKENS.get(obj)
        if tok is None:
            tok = uuid.uuid4().hex
            _TOKENS[obj] = tok
        return tok
    except TypeError:  # not weak-referenceable or not hashable
        return f"id-{id(obj)}"


def _slide_key(slide: Any) -> tuple:
    level0 = slide.levels[0]
    name = getattr(level0, "name", None)  # dask graph name: a hash of the source
    path = getattr(slide, "path", None)
    if name is not None and isinstance(name, str):
        return (str(path or ""), name, tuple(slide.shape))
    return (str(path or ""), _object_token(slide), tuple(slide.shape))


def _model_key(model: Any) -> tuple:
    card = model.card
    sha = getattr(card, "weights_sha256", "") or ""
    return (str(card.name), sha if sha else _object_token(model))


# -- device and precision --------------------------------------------------------------------


def resolve_device(device: str | None = None) -> str:
    """``"cuda"``, then ``"mps"``, then ``"cpu"`` for ``None``/``"auto"``; else ``device`` checked."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    dev = str(device)
    kind = dev.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        msg = f"device {dev!r} asked for but CUDA is not available here; use device='cpu' or 'auto'"
        raise ValueError(msg)
    if kind not in ("cpu", "cuda", "mps"):
        msg = f"unknown device {dev!r}; choose 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        raise ValueError(msg)
    return dev


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if "OutOfMemory" in type(exc).__name__:
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- planning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisPlan:
    """Where and how a region is analysed.

    ``f`` is level-0 pixels per analysis pixel, ``step`` level pixels per analysis pixel
    (1.0 when a pyramid level matches the model mpp), ``box`` the region in global analysis
    pixels (outward-rounded), ``analysis_mpp`` um per analysis pixel. Uncached tiles are run
    in blocks of up to ``block_cells`` x ``block_cells`` tiles.
    """

    region: Region
    level: LevelChoice
    f: float
    step: float
    analysis_mpp: float
    box: Region
    grid: TileGrid
    block_cells: int = 1


def plan_analysis(
    region: Region,
    slide_mpp: float,
    downsamples: Sequence[float],
    card: Any,
    *,
    tile_size: int | None = None,
) -> AnalysisPlan:
    """The level, analysis grid and tile grid for ``region`` (level-0 px) and a model card.

    ``tile_size`` fixes the owned tile side in analysis pixels and runs every tile alone;
    by default tiles are a third of the card's owned size and run in blocks of up to 3 x 3.
    """
    lc = choose_level(slide_mpp, downsamples, float(card.mpp))
    if lc.exact:
        # Within 2 % of the model's mpp: use the level's own pixels, no resampling.
        f, step, amp = lc.downsample, 1.0, lc.level_mpp
    else:
        f = float(card.mpp) / float(slide_mpp)
        step, amp = f / lc.downsample, float(card.mpp)
    eps = 1e-9
    box = Region(
        math.floor(region.y0 / f + eps),
        math.floor(region.x0 / f + eps),
        math.ceil(region.y1 / f - eps) if region.height else math.floor(region.y1 / f + eps),
        math.ceil(region.x1 / f - eps) if region.width else math.floor(region.x1 / f + eps),
    )
    multiples = [
        int(card.input_multiple),
        int(card.class_cell_px),
        *map(int, card.attention_strides),
    ]
    largest = plan_grid(int(card.tile_size), int(card.halo), multiples)
    if tile_size is not None:
        grid, cells = plan_grid(int(card.tile_size), int(card.halo), multiples, inner=tile_size), 1
    else:
        # Cache on a fine global grid (a third of the largest owned size), but run uncached
        # neighbours together as one input of up to the card's tile size: panning reuses
        # small tiles while a fresh view pays the halo only once per block.
        a = largest.multiple
        fine = max(a, largest.size // 3 // a * a)
        grid = TileGrid(fine, largest.halo, a)
        cells = max(1, largest.size // fine)
    return AnalysisPlan(region, lc, float(f), float(step), float(amp), box, grid, cells)


# -- per-tile work ---------------------------------------------------------------------------


def _hover_instances(nuclei_prob, hv, type_prob, *, mpp):
    from .models.postprocess import hover_instances

    return hover_instances(nuclei_prob, hv, type_prob, mpp=mpp)


@dataclass
class _Read:
    block: Block
    rgb: np.ndarray | None  # None: all background, not worth running
    tissue: list[bool]  # per tile of the block
    read_s: float
    prep_s: float


def _read_block(level_array: Any, block: Block, step: float, skip_background: bool) -> _Read:
    t0 = time.perf_counter()
    rgb = read_analysis_box(level_array, block.outer, step)
    t1 = time.perf_counter()
    tissue = []
    for t in block.tiles:
        if skip_background:
            y, x = t.inner.y0 - block.outer.y0, t.inner.x0 - block.outer.x0
            own = rgb[y : y + t.inner.height, x : x + t.inner.width]
            tissue.append(tissue_fraction(own) >= MIN_TISSUE_FRACTION)
        else:
            tissue.append(True)
    return _Read(block, rgb if any(tissue) else None, tissue, t1 - t0, time.perf_counter() - t1)


def _read_blocks(
    level_array: Any, blocks: Sequence[Block], step: float, skip_background: bool
) -> list[_Read]:
    return [_read_block(level_array, b, step, skip_background) for b in blocks]


def _predict_with_backoff(
    model: Any,
    batch: np.ndarray,
    tasks: tuple[str, ...],
    precision: str,
    state: dict,
    nuclei_box: tuple[int, int, int, int] | None = None,
) -> list[dict[str, Any]]:
    """Per-tile outputs of ``model.predict_tiles``; an out-of-memory error halves the batch."""
    results: list[dict[str, Any]] = []
    extra = {} if nuclei_box is None else {"nuclei_box": nuclei_box}
    i = 0
    while i < len(batch):
        size = max(1, min(state["batch"], len(batch) - i))
        try:
            out = model.predict_tiles(
                batch[i : i + size], tasks=tasks, precision=precision, **extra
            )
        except Exception as exc:
            if not _is_oom(exc):
                raise
            _release_accelerator_memory()
            if size == 1:
                msg = (
                    f"out of memory on a single tile of {batch.shape[1]}x{batch.shape[2]} px; "
                    "use a smaller tile_size, precision='bf16', or device='cpu'"
                )
                raise MemoryError(msg) from exc
            state["batch"] = size // 2
            state["oom_retries"] += 1
            continue
        for k in range(size):
            results.append(_slice_output(out, k))
        i += size
    return results


def _slice_output(out: dict[str, Any], k: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for key, val in out.items():
        if isinstance(val, dict):
            res[key] = {s: np.asarray(v[k]) for s, v in val.items()}
        else:
            res[key] = np.asarray(val[k])
    return res


def nuclei_box(block: Block, margin: int, view: Region | None = None) -> Region:
    """Where a block's nuclei are decoded and post-processed (global analysis px): its owned
    area (the part inside ``view``, if given) grown by ``margin`` px, inside the model input
    (``block.outer``)."""
    i, o = block.inner, block.outer
    if view is not None and not view.intersection(i).is_empty:
        i = view.intersection(i)
    return Region(
        max(o.y0, i.y0 - margin),
        max(o.x0, i.x0 - margin),
        min(o.y1, i.y1 + margin),
        min(o.x1, i.x1 + margin),
    )


def _run_model(
    model: Any,
    run: Sequence[_Read],
    tasks: tuple[str, ...],
    precision: str,
    state: dict,
    margin: int | None,
    view: Region | None = None,
) -> tuple[list[dict[str, Any]], list[Region]]:
    """Model outputs for the reads in ``run`` (stacked calls, OOM back-off) and, per read,
    the box (global analysis px) its nuclei maps cover.

    With ``margin`` and a model that takes ``nuclei_box``, the maps cover only
    :func:`nuclei_box` (of the part inside ``view``, if given); otherwise the whole input.
    Reads whose boxes sit alike in their inputs share one model call.
    """
    crop = margin is not None and "nuclei" in tasks
    if not (crop and getattr(model, "supports_nuclei_box", False)):
        stacked = np.stack([r.rgb for r in run])
        outs = _predict_with_backoff(model, stacked, tasks, precision, state)
        return outs, [r.block.outer for r in run]
    boxes = [nuclei_box(r.block, margin, view) for r in run]
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for k, (b, r) in enumerate(zip(boxes, run, strict=True)):
        o = r.block.outer
        groups.setdefault((b.y0 - o.y0, b.x0 - o.x0, b.y1 - o.y0, b.x1 - o.x0), []).append(k)
    outs: list[dict[str, Any]] = [{} for _ in run]
    for rel, idx in groups.items():
        stacked = np.stack([run[k].rgb for k in idx])
        got = _predict_with_backoff(model, stacked, tasks, precision, state, rel)
        for k, o in zip(idx, got, strict=True):
            outs[k] = o
    return outs, boxes


def _postprocess(
    block: Block,
    tissue: Sequence[bool],
    out: dict[str, Any],
    card: Any,
    tasks,
    mpp: float,
    nuclei_outer: Region | None = None,
    view: Region | None = None,
) -> list[TileOutput]:
    """Split one block's model outputs into its tiles' :class:`TileOutput` (tile order).

    ``nuclei_outer`` is the box (global analysis px) the nuclei maps cover, by default the
    model input ``block.outer``. With ``view``, a tile keeps only the nuclei whose centroid
    lies in its part inside ``view`` (the maps were decoded for that part only) and says so
    in ``TileOutput.nuclei_area``.
    """
    labels = types = probs = None
    if "nuclei" in tasks:
        # Post-process the whole block once: its margin covers every tile's seam nuclei.
        labels, types, probs = _hover_instances(
            out["nuclei_prob"], out["hv"], out.get("type_prob"), mpp=mpp
        )
        labels = np.asarray(labels)
    owned = None
    areas = [_nuclei_area(t, view) for t in block.tiles]
    if labels is not None:
        tiles = tuple(
            t if a is None else Tile(t.row, t.col, a, t.outer)
            for t, a in zip(block.tiles, areas, strict=True)
        )
        where = Block(tiles, block.inner, nuclei_outer or block.outer)
        owned = split_instances(labels, where, types, probs)
    results = []
    for k, (tile, is_tissue) in enumerate(zip(block.tiles, tissue, strict=True)):
        if not is_tissue:
            results.append(TileOutput(skipped=True))
            continue
        res = TileOutput(skipped=False, nuclei_area=areas[k] if owned is not None else None)
        oy, ox = tile.inner.y0 - block.outer.y0, tile.inner.x0 - block.outer.x0
        n = tile.inner.height
        if owned is not None:
            res.instances = owned[k]
        if "tiles" in tasks:
            c = int(card.class_cell_px)
            sy, sx = slice(oy // c, (oy + n) // c), slice(ox // c, (ox + n) // c)
            res.tile_probs = np.ascontiguousarray(out["tile_probs"][sy, sx], dtype=np.float32)
            if out.get("embeddings") is not None:
                res.embeddings = np.ascontiguousarray(out["embeddings"][sy, sx], dtype=np.float32)
        if "attention" in tasks:
            for scale, heat in out.get("attention", {}).items():
                st = int(card.attention_strides[int(scale)])
                sy, sx = slice(oy // st, (oy + n) // st), slice(ox // st, (ox + n) // st)
                res.attention[int(scale)] = np.ascontiguousarray(heat[sy, sx], dtype=np.float32)
        results.append(res)
    return results


def _nuclei_area(tile: Tile, view: Region | None) -> Region | None:
    """The part of ``tile`` inside ``view`` when that is not the whole tile, else None."""
    if view is None or view.contains(tile.inner):
        return None
    part = view.intersection(tile.inner)
    return None if part.is_empty else part


# -- result assembly -------------------------------------------------------------------------


def _hex(color: Any) -> str:
    if isinstance(color, str):
        return color
    r, g, b = (int(v) for v in tuple(color)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _origin(cells0: tuple[int, int], level0_per_cell: float) -> tuple[float, float]:
    def tidy(v: float) -> float:
        return float(round(v)) if abs(v - round(v)) < 1e-6 else v

    return (tidy(cells0[0] * level0_per_cell), tidy(cells0[1] * level0_per_cell))


class ResultAssembly:
    """Region-sized canvases filled tile by tile, and the result built from them."""

    def __init__(self, plan: AnalysisPlan, card: Any, tasks: tuple[str, ...]) -> None:
        self.plan, self.card, self.tasks = plan, card, tasks
        self.nuclei = InstanceCanvas(plan.box) if "nuclei" in tasks else None
        self.cls_box = cells_covering(plan.box, int(card.class_cell_px))
        self.classes = self.probs = self.emb = None
        if "tiles" in tasks:
            nc = len(card.tissue_classes)
            self.classes = CellCanvas(self.cls_box, (), np.int32, 0)
            self.probs = CellCanvas(self.cls_box, (nc,), np.float32, 0.0)
        self.att: dict[int, CellCanvas] = {}
        # A model may export only the scales that exist at its tile size: show those only.
        self.att_seen: set[int] = set()
        if "attention" in tasks:
            for scale, s in enumerate(card.attention_strides):
                self.att[scale] = CellCanvas(cells_covering(plan.box, int(s)), (), np.float32, 0.0)

    def paste(self, tile: Tile, out: TileOutput) -> None:
        if out.skipped:
            return
        if self.nuclei is not None and out.instances is not None:
            self.nuclei.paste(out.instances)
        if self.probs is not None and out.tile_probs is not None:
            c = int(self.card.class_cell_px)
            origin = (tile.inner.y0 // c, tile.inner.x0 // c)
            self.probs.paste(out.tile_probs, origin)
            self.classes.paste(np.argmax(out.tile_probs, axis=-1).astype(np.int32) + 1, origin)
            if out.embeddings is not None:
                if self.emb is None:
                    self.emb = CellCanvas(
                        self.cls_box, (out.embeddings.shape[-1],), np.float32, 0.0
                    )
                self.emb.paste(out.embeddings, origin)
        for scale, heat in out.attention.items():
            canvas = self.att.get(scale)
            if canvas is not None:
                self.att_seen.add(scale)
                s = int(self.card.attention_strides[scale])
                canvas.paste(heat, (tile.inner.y0 // s, tile.inner.x0 // s))

    def build(self, provenance: Provenance, *, complete: bool, copy: bool) -> RegionResult:
        plan, card = self.plan, self.card
        f, amp = plan.f, plan.analysis_mpp
        cp = (lambda a: a.copy()) if copy else (lambda a: a)
        nuclei = None
        if self.nuclei is not None:
            if complete:
                labels, rows = self.nuclei.canonical()
            else:
                labels, rows = cp(self.nuclei.labels), self.nuclei.table()
            names = tuple(card.nucleus_types)
            cls = rows[:, 4].astype(np.int64)
            features = pd.DataFrame(
                {
                    "label": rows[:, 0].astype(np.uint32),
                    # analysis pixel-index centre c lies at level-0 index (c + 0.5) * f - 0.5
                    "centroid_y": (rows[:, 1] + 0.5) * f - 0.5,
                    "centroid_x": (rows[:, 2] + 0.5) * f - 0.5,
                    "area_um2": rows[:, 3] * amp * amp,
                    "class_id": cls.astype(np.int32),
                    "class_name": [names[i] if 0 <= i < len(names) else "unknown" for i in cls],
                    "probability": rows[:, 5].astype(np.float32),
                },
                columns=list(NUCLEI_COLUMNS),
            )
            nuclei = NucleiResult(
                labels=labels,
                features=features,
                downsample=f,
                origin=_origin(plan.box.origin, f),
                class_names=names,
                class_colors=tuple(_hex(c) for c in card.nucleus_colors),
            )
        tiles = None
        if self.classes is not None:
            c = int(card.class_cell_px)
            tiles = TileClassResult(
                classes=cp(self.classes.data),
                probabilities=cp(self.probs.data),
                embeddings=None if self.emb is None else cp(self.emb.data),
                cell=c * f,
                origin=_origin(self.cls_box.origin, c * f),
                class_names=tuple(card.tissue_classes),
                class_colors=tuple(_hex(col) for col in card.tissue_colors),
            )
        attention = []
        for scale, canvas in self.att.items():
            if scale not in self.att_seen:
                continue
            s = int(card.attention_strides[scale])
            attention.append(
                AttentionMap(
                    heat=cp(canvas.data),
                    downsample=s * f,
                    origin=_origin(canvas.box.origin, s * f),
                    scale=scale,
                )
            )
        return RegionResult(
            region=plan.region,
            mpp=amp,
            nuclei=nuclei,
            tiles=tiles,
            attention=attention,
            provenance=provenance,
            complete=complete,
        )


# -- entry points ----------------------------------------------------------------------------


def resolve_model(model: Any, device: str | None) -> Any:
    if model is None or isinstance(model, str):
        from .models import create_model

        return create_model(model, device=resolve_device(device))
    missing = [a for a in ("card", "predict_tiles") if not hasattr(model, a)]
    if missing:
        msg = (
            f"model {model!r} is missing {missing}; pass a model name (see "
            "histolens.list_models()) or an object with .card and .predict_tiles()"
        )
        raise TypeError(msg)
    if device is not None and hasattr(model, "to"):
        wanted = resolve_device(device)
        if str(getattr(model, "device", "")) != wanted:
            model.to(wanted)
    return model


def resolve_tasks(tasks: Iterable[str], card: Any) -> tuple[str, ...]:
    asked = tuple(dict.fromkeys(tasks))
    unknown = [t for t in asked if t not in ALL_TASKS]
    if unknown:
        msg = f"unknown task(s) {unknown}; choose from {ALL_TASKS}"
        raise ValueError(msg)
    offered = tuple(getattr(card, "tasks", ALL_TASKS))
    missing = [t for t in asked if t not in offered]
    if missing:
        warnings.warn(
            f"model {card.name!r} does not do {missing} (it offers {offered}); skipping them",
            stacklevel=3,
        )
    return tuple(t for t in asked if t in offered)


def card_to_dict(card: Any) -> dict[str, Any]:
    if hasattr(card, "to_dict"):
        return dict(card.to_dict())
    from dataclasses import asdict, is_dataclass

    return asdict(card) if is_dataclass(card) else dict(vars(card))


def _cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def analyze(
    slide: Any,
    region: Region,
    *,
    model: str | TileModel | None = None,
    tasks: Sequence[str] = ALL_TASKS,
    mpp: float | None = None,
    device: str | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    precision: str = "auto",
    batch_size: int = 4,
    tile_size: int | None = None,
    cache: TileCache | bool | None = None,
    skip_background: bool = True,
    crop_decoder: bool = True,
) -> Generator[RegionResult, None, RegionResult]:
    """Analyse ``region`` (level-0 px) of ``slide``; yield partial results, return the full one.

    Parameters
    ----------
    model
        A registered name, a model object (``.card`` + ``.predict_tiles``), or None for the
        default model.
    mpp
        Level-0 um/px overriding the slide's (required when the slide has none).
    cancel
        A ``threading.Event`` or a callable; checked between model calls (after each
        partial result). A cancelled run ends with the tiles that finished,
        ``complete=False`` and ``provenance.cancelled``.
    precision
        ``"auto"`` (mixed precision where the device runs it natively), ``"bf16"``,
        ``"fp16"`` or ``"fp32"``.
    batch_size
        Tiles per model call (halved automatically on out-of-memory).
    tile_size
        Owned tile side in analysis pixels, each tile run alone. Default: a third of the
        card's owned size, uncached neighbours run together in blocks of up to 3 x 3.
    cache
        A :class:`TileCache`, None for the process-wide one, False for none.
    skip_background
        Skip tiles whose owned area is mostly glass (counted in ``tiles_skipped``).
    crop_decoder
        Decode and post-process nuclei only over the part of each model input's owned area
        inside the region, plus :data:`NUCLEI_MARGIN_UM` (models with
        ``supports_nuclei_box``); the halo beyond it feeds only the backbone. A tile at the
        region's edge is then cached with its nuclei for that part only
        (``TileOutput.nuclei_area``) and recomputed when a later region needs more of it.
        False decodes every whole input (the engine before issue 15, kept for benchmarks).
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    slide_mpp = mpp if mpp is not None else getattr(slide, "mpp", None)
    if slide_mpp is None:
        msg = (
            f"slide {getattr(slide, 'name', slide)!r} has no pixel size (mpp) in its metadata; "
            "pass mpp=<micrometres per level-0 pixel>, e.g. mpp=0.25 for 40x or 0.5 for 20x"
        )
        raise ValueError(msg)
    mpp_source = "user" if mpp is not None else str(getattr(slide, "mpp_source", "slide"))
    if not isinstance(region, Region):
        region = Region(*region)
    shape = tuple(int(v) for v in slide.shape[:2])
    clipped = region.clip(shape)
    if not region.is_empty and clipped != region:
        if clipped.is_empty:
            msg = (
                f"region {region.as_tuple()} (y0, x0, y1, x1 in level-0 px) lies outside slide "
                f"{getattr(slide, 'name', '')!r} of shape {shape}; give a box inside (0, 0, {shape[0]}, {shape[1]})"
            )
            raise ValueError(msg)
        warnings.warn(
            f"region {region.as_tuple()} extends beyond the slide {shape}; clipped to {clipped.as_tuple()}",
            stacklevel=2,
        )
    region = clipped
    model = resolve_model(model, device)
    card = model.card
    tasks = resolve_tasks(tasks, card)
    dev = str(getattr(model, "device", device or "cpu"))
    prec = resolve_precision(dev, precision)
    if batch_size < 1:
        msg = f"batch_size must be >= 1 tile, got {batch_size}"
        raise ValueError(msg)
    plan = plan_analysis(region, float(slide_mpp), slide.downsamples, card, tile_size=tile_size)
    tiles = plan.grid.tiles(plan.box)
    if cache is None or cache is True:
        tile_cache: TileCache | None = _DEFAULT_CACHE
    elif cache is False:
        tile_cache = None
    elif isinstance(cache, TileCache):
        tile_cache = cache  # (an empty cache is falsy: do not test it with `or`)
    else:
        msg = f"cache must be a TileCache, None (process-wide cache) or False (none), got {cache!r}"
        raise TypeError(msg)

    prov = Provenance(
        slide_path=str(getattr(slide, "path", "") or ""),
        slide_name=str(getattr(slide, "name", "")),
        region=region,
        level=plan.level.level,
        level_downsample=plan.level.downsample,
        slide_mpp=float(slide_mpp),  # the level-0 mpp actually used (slide's or user's)
        mpp_source=mpp_source,
        analysis_mpp=plan.analysis_mpp,
        model_name=str(card.name),
        model_card=card_to_dict(card),
        device=dev,
        precision=prec,
        started=started,
        tiles_total=len(tiles),
    )
    timings = {
        "read": 0.0,
        "preprocess": 0.0,
        "model": 0.0,
        "postprocess": 0.0,
        "stitch": 0.0,
        "model_input_px": 0.0,
        "decoded_px": 0.0,
    }
    prov.timings = timings
    asm = ResultAssembly(plan, card, tasks)

    def snapshot(*, complete: bool) -> RegionResult:
        prov.seconds = time.perf_counter() - t_start
        p = Provenance(**{**prov.__dict__, "timings": dict(timings)})
        return asm.build(p, complete=complete, copy=not complete)

    if not tiles:
        result = snapshot(complete=True)
        yield result
        return result

    base_key = (
        _slide_key(slide),
        _model_key(model),
        round(plan.analysis_mpp, 6),
        plan.level.level,
        round(plan.step, 6),
        plan.grid.size,
        plan.grid.halo,
        tasks,
        prec,
    )
    cached: list[tuple[Tile, TileOutput]] = []
    todo: list[Tile] = []
    for t in tiles:
        hit = tile_cache.get((*base_key, t.row, t.col)) if tile_cache is not None else None
        if hit is not None and not hit.has_nuclei_for(t.inner.intersection(plan.box)):
            hit = None  # computed for another view, its nuclei stop short of this one
        if hit is None:
            todo.append(t)
        else:
            cached.append((t, hit))
    level_array = slide.levels[plan.level.level]
    state = {"batch": int(batch_size), "oom_retries": 0}
    batches = _batch_blocks(order_blocks(todo, plan), batch_size)
    margin = _nuclei_margin(plan) if crop_decoder else None
    # Nuclei are decoded only where this view needs them (tiles at its edge partly).
    view = plan.box if crop_decoder else None
    # Work planned, for the time-left estimate (progress.seconds_left).
    timings["planned_input_px"] = float(sum(b.outer.area for batch in batches for b in batch))

    def compute() -> Generator[list[tuple[Tile, TileOutput]], None, None]:
        """Outputs of the uncached tiles, one list per batch of blocks."""
        if not batches:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histolens-read")
        try:
            nxt: Future = pool.submit(
                _read_blocks, level_array, batches[0], plan.step, skip_background
            )
            for b in range(len(batches)):
                reads = nxt.result()
                if b + 1 < len(batches):
                    # Prefetch: the next batch is read and resampled while the model runs.
                    nxt = pool.submit(
                        _read_blocks, level_array, batches[b + 1], plan.step, skip_background
                    )
                for r in reads:
                    timings["read"] += r.read_s
                    timings["preprocess"] += r.prep_s
                run = [r for r in reads if r.rgb is not None]
                outs: dict[int, tuple[dict[str, Any], Region]] = {}
                if run:
                    t0 = time.perf_counter()
                    per_input, boxes = _run_model(model, run, tasks, prec, state, margin, view)
                    timings["model"] += time.perf_counter() - t0
                    # Pixels the model saw (halo included): the compute actually spent.
                    timings["model_input_px"] += float(sum(r.block.outer.area for r in run))
                    timings["decoded_px"] += float(sum(b.area for b in boxes))
                    outs = {id(r): (o, b) for r, o, b in zip(run, per_input, boxes, strict=True)}
                done: list[tuple[Tile, TileOutput]] = []
                for r in reads:
                    if r.rgb is None:
                        results = [TileOutput(skipped=True) for _ in r.block.tiles]
                    else:
                        t0 = time.perf_counter()
                        out, box = outs[id(r)]
                        results = _postprocess(
                            r.block, r.tissue, out, card, tasks, plan.analysis_mpp, box, view
                        )
                        timings["postprocess"] += time.perf_counter() - t0
                    for tile, res in zip(r.block.tiles, results, strict=True):
                        if tile_cache is not None:
                            tile_cache.put((*base_key, tile.row, tile.col), res)
                        done.append((tile, res))
                yield done
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def paste(items: Sequence[tuple[Tile, TileOutput]]) -> None:
        t0 = time.perf_counter()
        for tile, out in items:
            asm.paste(tile, out)
            prov.tiles_done += 1
            prov.tiles_skipped += int(out.skipped)
        timings["stitch"] += time.perf_counter() - t0

    def partial() -> RegionResult:
        timings.setdefault("first_partial", time.perf_counter() - t_start)
        return snapshot(complete=False)

    # Cached tiles first: panning back paints the known part at once.
    paste(cached)
    prov.tiles_cached = len(cached)
    if cached and batches:
        yield partial()
    computed = compute()
    try:
        if _cancelled(cancel):
            prov.cancelled = True
        else:
            for items in computed:
                paste(items)
                if prov.tiles_done < len(tiles):
                    yield partial()
                # Checked after the consumer had the partial result, before the next batch runs.
                if _cancelled(cancel):
                    prov.cancelled = prov.tiles_done < len(tiles)
                    break
    finally:
        computed.close()
    timings["oom_retries"] = float(state["oom_retries"])
    result = snapshot(complete=not prov.cancelled)
    yield result
    return result


def _nuclei_margin(plan: AnalysisPlan) -> int:
    return int(math.ceil(NUCLEI_MARGIN_UM / plan.analysis_mpp))


def order_blocks(todo: Sequence[Tile], plan: AnalysisPlan) -> list[Block]:
    """Blocks to run, the tile nearest the region's centre first and alone, then outwards.

    The first model call is then one small input where the user is looking (fast first
    paint); the rest are grouped into blocks for throughput.
    """
    if len(todo) <= plan.block_cells**2 or plan.block_cells == 1:  # one block: no gain
        return group_tiles(todo, plan.grid, plan.block_cells)
    cy = (plan.box.y0 + plan.box.y1) / 2.0
    cx = (plan.box.x0 + plan.box.x1) / 2.0

    def dist(region: Region) -> float:
        return ((region.y0 + region.y1) / 2.0 - cy) ** 2 + ((region.x0 + region.x1) / 2.0 - cx) ** 2

    first = min(todo, key=lambda t: dist(t.inner))
    rest = group_tiles([t for t in todo if t is not first], plan.grid, plan.block_cells)
    return [*group_tiles([first], plan.grid, 1), *sorted(rest, key=lambda b: dist(b.inner))]


def _batch_blocks(blocks: Sequence[Block], batch_size: int) -> list[list[Block]]:
    """Consecutive blocks of the same input shape, up to ``batch_size`` per model call; the
    first batch holds one block so the first partial result comes after one model call."""
    batches: list[list[Block]] = []
    for b in blocks:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(batches) > 1  # the first batch stays alone
            and len(last) < batch_size
            and last[0].outer.shape == b.outer.shape  # one stacked input array per call
        ):
            last.append(b)
        else:
            batches.append([b])
    return batches


def run_blocks(
    slide: Any,
    plan: AnalysisPlan,
    blocks: Sequence[Block],
    model: Any,
    tasks: tuple[str, ...],
    *,
    precision: str,
    batch_size: int,
    skip_background: bool,
    crop_decoder: bool = True,
) -> tuple[list[list[TileOutput]], dict[str, float]]:
    """Run model ``blocks`` of ``plan`` without cache or assembly: what a batch worker does.

    The engine's own per-block steps (read + tissue test, batched model call with OOM
    back-off, post-processing and instance ownership), so a work unit's outputs equal
    ``analyze``'s. Returns, per block, its tiles' :class:`TileOutput` in tile order, and the
    seconds spent per stage (``read``, ``preprocess``, ``model``, ``postprocess``).
    ``crop_decoder`` as in :func:`analyze`.
    """
    margin = _nuclei_margin(plan) if crop_decoder else None

    level = slide.levels[plan.level.level]
    state = {"batch": int(batch_size), "oom_retries": 0}
    timings = {"read": 0.0, "preprocess": 0.0, "model": 0.0, "postprocess": 0.0}
    outputs: dict[int, list[Any]] = {}
    index = {id(b): i for i, b in enumerate(blocks)}
    for batch in _batch_blocks(list(blocks), batch_size):
        reads = _read_blocks(level, batch, plan.step, skip_background)
        for r in reads:
            timings["read"] += r.read_s
            timings["preprocess"] += r.prep_s
        run_reads = [r for r in reads if r.rgb is not None]
        per_input: list[dict[str, Any]] = []
        boxes: list[Region] = []
        if run_reads:
            t0 = time.perf_counter()
            per_input, boxes = _run_model(model, run_reads, tasks, precision, state, margin)
            timings["model"] += time.perf_counter() - t0
        it = iter(zip(per_input, boxes, strict=True))
        for r in reads:
            if r.rgb is None:
                outputs[index[id(r.block)]] = [TileOutput(skipped=True) for _ in r.block.tiles]
                continue
            t0 = time.perf_counter()
            out, box = next(it)
            outputs[index[id(r.block)]] = _postprocess(
                r.block, r.tissue, out, model.card, tasks, plan.analysis_mpp, box
            )
            timings["postprocess"] += time.perf_counter() - t0
    timings["oom_retries"] = float(state["oom_retries"])
    return [outputs[i] for i in range(len(blocks))], timings


def analyze_region(slide: Any, region: Region, **kwargs: Any) -> RegionResult:
    """Run :func:`analyze` to the end and return its last (full or cancelled) result."""
    result = None
    for result in analyze(slide, region, **kwargs):  # noqa: B007 (the last one is returned)
        pass
    assert result is not None  # analyze always yields at least once
    return result
