"""The engine behind :func:`histolens.inference.analyze` and the batch runner.

:func:`prepare_run` decides everything about a run once, before any pixel is read
(validation, the model with its device and precision, the pyramid level and tile grid, the
cache keys, the provenance). A :class:`BlockRunner` does the per-block work: read and
tissue-test a model block (a few adjacent tiles plus the card's halo), run the model on
batches of blocks (halving the batch on an out-of-memory error, prefetching the next batch's
pixels while the model runs), post-process nuclei once per block and split everything into
the tiles' :class:`TileOutput`, timing each stage. :class:`ResultAssembly` pastes tile
outputs into region-sized canvases and builds the :class:`~histolens.result.RegionResult`.

``analyze`` (one region, cached, partial results) and the batch runner (shards, maybe on
dask workers) are thin loops over these, so a tile's output is the same whichever ran it.
Private: users call :mod:`histolens.inference`. Coordinates are global analysis pixels
(level-0 px divided by ``plan.f``), ``(y, x)``, half-open boxes. Nothing here imports torch
at module level; the model object hides it.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from .colors import to_hex
from .models.card import ALL_TASKS
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
from .slide._read import read_analysis_box
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
    split_instances,
    tissue_fraction,
)

__all__ = [
    "AnalysisPlan",
    "BlockRunner",
    "PreparedRun",
    "ResultAssembly",
    "RunSettings",
    "TileCache",
    "TileModel",
    "TileOutput",
    "batch_blocks",
    "level0_mpp",
    "nuclei_box",
    "order_blocks",
    "plan_analysis",
    "prepare_run",
    "resolve_device",
    "resolve_model",
    "resolve_precision",
    "resolve_settings",
    "run_provenance",
]

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

    def get(self, key: tuple) -> TileOutput | None:
        with self._lock:
            out = self._data.get(key)
            if out is not None:
                self._data.move_to_end(key)
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

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)


#: The process-wide tile cache, used when ``analyze(cache=None)``.
_DEFAULT_CACHE = TileCache()


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


# -- model and tasks -------------------------------------------------------------------------


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
            stacklevel=5,  # the caller of analyze()
        )
    return tuple(t for t in asked if t in offered)


def card_to_dict(card: Any) -> dict[str, Any]:
    if hasattr(card, "to_dict"):
        return dict(card.to_dict())
    from dataclasses import asdict, is_dataclass

    return asdict(card) if is_dataclass(card) else dict(vars(card))


# -- one run, decided once -------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """The model and how it runs: decided once per region (or per batch of slides)."""

    model: Any
    tasks: tuple[str, ...]
    device: str
    precision: str  # "bf16", "fp16" or "fp32"

    @property
    def card(self) -> Any:
        return self.model.card


def resolve_settings(
    model: Any, tasks: Iterable[str], *, device: str | None = None, precision: str = "auto"
) -> RunSettings:
    """The model (a name, None for the default, or an object), the tasks it offers among
    ``tasks``, the device it sits on and the precision it runs in."""
    model = resolve_model(model, device)
    task_t = resolve_tasks(tasks, model.card)
    dev = str(getattr(model, "device", device or "cpu"))
    return RunSettings(model, task_t, dev, resolve_precision(dev, precision))


def run_provenance(
    slide: Any,
    region: Region,
    plan: AnalysisPlan,
    settings: RunSettings,
    *,
    slide_mpp: float,
    mpp_source: str,
    tiles_total: int,
    started: str | None = None,
    slide_path: str | None = None,
) -> Provenance:
    """Where a run's result comes from; its counters and timings are filled as it runs."""
    if slide_path is None:
        slide_path = str(getattr(slide, "path", "") or "")
    return Provenance(
        slide_path=slide_path,
        slide_name=str(getattr(slide, "name", "")),
        region=region,
        level=plan.level.level,
        level_downsample=plan.level.downsample,
        slide_mpp=slide_mpp,  # the level-0 mpp actually used (slide's or user's)
        mpp_source=mpp_source,
        analysis_mpp=plan.analysis_mpp,
        model_name=str(settings.card.name),
        model_card=card_to_dict(settings.card),
        device=settings.device,
        precision=settings.precision,
        started=started or _now(),
        tiles_total=tiles_total,
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PreparedRun:
    """One region's run, before any pixel is read: settings, plan, tiles, cache, provenance.

    ``cache_key`` prefixes every tile's cache key (slide identity, model name and weights,
    analysis mpp, level, grid, tasks, precision); ``provenance`` is this run's own record,
    whose counters the caller fills as tiles land.
    """

    slide: Any
    settings: RunSettings
    plan: AnalysisPlan
    tiles: list[Tile]
    cache: TileCache | None
    cache_key: tuple
    provenance: Provenance

    def tile_key(self, tile: Tile) -> tuple:
        return (*self.cache_key, tile.row, tile.col)

    def lookup(self) -> tuple[list[tuple[Tile, TileOutput]], list[Tile]]:
        """The tiles the cache holds (with their outputs) and the tiles still to compute."""
        cached: list[tuple[Tile, TileOutput]] = []
        todo: list[Tile] = []
        for t in self.tiles:
            hit = self.cache.get(self.tile_key(t)) if self.cache is not None else None
            if hit is not None and not hit.has_nuclei_for(t.inner.intersection(self.plan.box)):
                hit = None  # computed for another view, its nuclei stop short of this one
            if hit is None:
                todo.append(t)
            else:
                cached.append((t, hit))
        return cached, todo

    def store(
        self, done: Sequence[tuple[Block, list[TileOutput]]]
    ) -> list[tuple[Tile, TileOutput]]:
        """Cache the outputs of finished blocks; return them per tile, in block order."""
        items = []
        for block, outputs in done:
            for tile, res in zip(block.tiles, outputs, strict=True):
                if self.cache is not None:
                    self.cache.put(self.tile_key(tile), res)
                items.append((tile, res))
        return items


def prepare_run(
    slide: Any,
    region: Region | Sequence[int],
    *,
    model: Any = None,
    tasks: Sequence[str] = ALL_TASKS,
    mpp: float | None = None,
    device: str | None = None,
    precision: str = "auto",
    batch_size: int = 4,
    tile_size: int | None = None,
    cache: TileCache | bool | None = None,
) -> PreparedRun:
    """Check the inputs and decide the run of ``region`` (level-0 px) of ``slide``.

    Arguments as in :func:`histolens.inference.analyze`. A region partly outside the slide
    is clipped with a warning; one wholly outside, a slide without mpp, a bad batch size or
    cache raise with the value and the fix.
    """
    started = _now()
    slide_mpp = level0_mpp(slide, mpp)
    mpp_source = "user" if mpp is not None else str(getattr(slide, "mpp_source", "slide"))
    region = _clip_region(slide, region if isinstance(region, Region) else Region(*region))
    settings = resolve_settings(model, tasks, device=device, precision=precision)
    if batch_size < 1:
        msg = f"batch_size must be >= 1 tile, got {batch_size}"
        raise ValueError(msg)
    card = settings.card
    plan = plan_analysis(region, slide_mpp, slide.downsamples, card, tile_size=tile_size)
    tiles = plan.grid.tiles(plan.box)
    tile_cache = _resolve_cache(cache)
    key = (
        _slide_key(slide),
        _model_key(settings.model),
        round(plan.analysis_mpp, 6),
        plan.level.level,
        round(plan.step, 6),
        plan.grid.size,
        plan.grid.halo,
        settings.tasks,
        settings.precision,
    )
    prov = run_provenance(
        slide, region, plan, settings, slide_mpp=slide_mpp, mpp_source=mpp_source,
        tiles_total=len(tiles), started=started,
    )  # fmt: skip
    return PreparedRun(slide, settings, plan, tiles, tile_cache, key, prov)


def level0_mpp(slide: Any, mpp: float | None) -> float:
    """The level-0 um/px of a run: ``mpp`` when given, else the slide's; ValueError if neither."""
    slide_mpp = mpp if mpp is not None else getattr(slide, "mpp", None)
    if slide_mpp is None:
        msg = (
            f"slide {getattr(slide, 'name', slide)!r} has no pixel size (mpp) in its metadata; "
            "pass mpp=<micrometres per level-0 pixel>, e.g. mpp=0.25 for 40x or 0.5 for 20x"
        )
        raise ValueError(msg)
    return float(slide_mpp)


def _clip_region(slide: Any, region: Region) -> Region:
    """``region`` clipped to the slide (warning when it had to be); an error when outside."""
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
            stacklevel=4,  # the caller of analyze()
        )
    return clipped


def _resolve_cache(cache: TileCache | bool | None) -> TileCache | None:
    if cache is None or cache is True:
        return _DEFAULT_CACHE
    if cache is False:
        return None
    if isinstance(cache, TileCache):
        return cache  # (an empty cache is falsy: do not test it with `or`)
    msg = f"cache must be a TileCache, None (process-wide cache) or False (none), got {cache!r}"
    raise TypeError(msg)


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


def batch_blocks(blocks: Sequence[Block], batch_size: int) -> list[list[Block]]:
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


# -- the block runner ------------------------------------------------------------------------


class BlockRunner:
    """Read -> predict -> post-process for the model blocks of one plan, batch by batch.

    One object per run (one region, or one shard of `histolens analyze`): it keeps the model-call size,
    halved for good on an out-of-memory error (``oom_retries`` counts those), and adds the
    seconds per stage to ``timings`` (``read``, ``preprocess``, ``model``, ``postprocess``)
    with the pixels the model saw (``model_input_px``, halo included) and decoded nuclei on
    (``decoded_px``). ``crop_decoder`` and ``view`` (global analysis px) as in
    :func:`histolens.inference.analyze`: nuclei are decoded over each block's owned part
    inside ``view`` plus :data:`NUCLEI_MARGIN_UM` (the whole owned part without ``view``).
    """

    def __init__(
        self,
        slide: Any,
        plan: AnalysisPlan,
        model: Any,
        tasks: tuple[str, ...],
        *,
        precision: str,
        batch_size: int,
        skip_background: bool = True,
        crop_decoder: bool = True,
        view: Region | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.plan, self.model, self.tasks, self.precision = plan, model, tasks, precision
        self.level = slide.levels[plan.level.level]
        self.skip_background = skip_background
        self.margin = _nuclei_margin(plan) if crop_decoder else None
        self.view = view
        self.batch_size = int(batch_size)
        self.oom_retries = 0
        self.timings = timings if timings is not None else {}
        for stage in ("read", "preprocess", "model", "postprocess"):
            self.timings.setdefault(stage, 0.0)

    def run(
        self, batches: Sequence[Sequence[Block]], *, prefetch: bool = False
    ) -> Iterator[list[tuple[Block, list[TileOutput]]]]:
        """Per batch of blocks, each block with its tiles' outputs (tile order).

        With ``prefetch`` the next batch is read and resampled in a background thread while
        the model runs the current one; closing the iterator stops that thread.
        """
        if not prefetch:
            for batch in batches:
                yield self._process(self._read(batch))
            return
        if not batches:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histolens-read")
        try:
            nxt: Future = pool.submit(self._read, batches[0])
            for b in range(len(batches)):
                reads = nxt.result()
                if b + 1 < len(batches):
                    nxt = pool.submit(self._read, batches[b + 1])
                yield self._process(reads)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, batch: Sequence[Block]) -> list[_Read]:
        return [_read_block(self.level, b, self.plan.step, self.skip_background) for b in batch]

    def _add(self, stage: str, value: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + value

    def _process(self, reads: Sequence[_Read]) -> list[tuple[Block, list[TileOutput]]]:
        """Model and post-processing for blocks already read (timings added from the reads)."""
        for r in reads:
            self._add("read", r.read_s)
            self._add("preprocess", r.prep_s)
        run = [r for r in reads if r.rgb is not None]
        outs: dict[int, tuple[dict[str, Any], Region]] = {}
        if run:
            t0 = time.perf_counter()
            per_input, boxes = self._predict(run)
            self._add("model", time.perf_counter() - t0)
            self._add("model_input_px", float(sum(r.block.outer.area for r in run)))
            self._add("decoded_px", float(sum(b.area for b in boxes)))
            outs = {id(r): (o, b) for r, o, b in zip(run, per_input, boxes, strict=True)}
        done: list[tuple[Block, list[TileOutput]]] = []
        for r in reads:
            if r.rgb is None:
                done.append((r.block, [TileOutput(skipped=True) for _ in r.block.tiles]))
                continue
            t0 = time.perf_counter()
            out, box = outs[id(r)]
            results = _postprocess(
                r.block, r.tissue, out, self.model.card, self.tasks, self.plan.analysis_mpp,
                box, self.view,
            )  # fmt: skip
            self._add("postprocess", time.perf_counter() - t0)
            done.append((r.block, results))
        return done

    def _predict(self, run: Sequence[_Read]) -> tuple[list[dict[str, Any]], list[Region]]:
        """Model outputs for the reads in ``run`` and, per read, the box (global analysis px)
        its nuclei maps cover.

        With a margin and a model that takes ``nuclei_box``, the maps cover only
        :func:`nuclei_box`; otherwise the whole input. Reads whose boxes sit alike in their
        inputs share one model call.
        """
        crop = self.margin is not None and "nuclei" in self.tasks
        if not (crop and getattr(self.model, "supports_nuclei_box", False)):
            outs = self._call(np.stack([r.rgb for r in run]))
            return outs, [r.block.outer for r in run]
        boxes = [nuclei_box(r.block, self.margin, self.view) for r in run]
        groups: dict[tuple[int, int, int, int], list[int]] = {}
        for k, (b, r) in enumerate(zip(boxes, run, strict=True)):
            o = r.block.outer
            groups.setdefault((b.y0 - o.y0, b.x0 - o.x0, b.y1 - o.y0, b.x1 - o.x0), []).append(k)
        outs: list[dict[str, Any]] = [{} for _ in run]
        for rel, idx in groups.items():
            got = self._call(np.stack([run[k].rgb for k in idx]), rel)
            for k, o in zip(idx, got, strict=True):
                outs[k] = o
        return outs, boxes

    def _call(
        self, batch: np.ndarray, box: tuple[int, int, int, int] | None = None
    ) -> list[dict[str, Any]]:
        """Per-input outputs of ``model.predict_tiles``; an out-of-memory error halves the batch."""
        results: list[dict[str, Any]] = []
        extra = {} if box is None else {"nuclei_box": box}
        i = 0
        while i < len(batch):
            size = max(1, min(self.batch_size, len(batch) - i))
            try:
                out = self.model.predict_tiles(
                    batch[i : i + size], tasks=self.tasks, precision=self.precision, **extra
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
                self.batch_size = size // 2
                self.oom_retries += 1
                continue
            results.extend(_slice_output(out, k) for k in range(size))
            i += size
        return results


# -- result assembly -------------------------------------------------------------------------


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
                class_colors=tuple(to_hex(c) for c in card.nucleus_colors),
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
                class_colors=tuple(to_hex(col) for col in card.tissue_colors),
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
            analysis_mpp=amp,
            nuclei=nuclei,
            tiles=tiles,
            attention=attention,
            provenance=provenance,
            complete=complete,
        )
