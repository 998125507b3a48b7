"""Explain one spot: where the Atlas backbone looked, at every scale, for the token under a point.

:func:`explain_point` re-runs only the model input block that owns a level-0 point (the same
block, tiles and pixels :func:`histolens.inference.analyze` runs for that region) with the
top-down attention of the one finest-scale backbone token holding the point captured per head
(the fused attention kernel stays in use for every other token and for normal runs). The
:class:`PointExplanation` holds, per scale, the token's attention over the window of that scale
it read and the level-0 box that window covers; :func:`histolens.layers.explanation_to_layer_data`
turns it into napari layers aligned by :func:`histolens.region.layer_transform`.

Attention is not attribution: the weights say which tokens the query *read*, averaged over the
backbone's MSA blocks, not which pixels changed a prediction.

Frames: points and boxes are level-0 pixels ``(y, x)``, half-open; a scale-``s`` token is
``stride_s`` analysis pixels square (``stride_s * f`` level-0 pixels, ``f`` level-0 px per
analysis px). No torch at import; no Qt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._engine import AnalysisPlan, level0_mpp, order_blocks, plan_analysis, resolve_model
from .region import Region
from .result import RegionResult
from .slide._read import read_analysis_box
from .tiles import Block, group_tiles

__all__ = ["PointExplanation", "ScaleWindow", "explain_point"]


@dataclass(frozen=True)
class ScaleWindow:
    """The window of one backbone scale the explained token read, and its weights there.

    ``weights`` is float32 ``(blocks, heads, mh, mw)``: the token's softmax attention (taken
    jointly over the windows of all scales, so all scales together sum to 1 per block and
    head) on each token of this window. Token ``(0, 0)`` starts at level-0 ``origin``; each
    token is ``downsample`` level-0 pixels square. The window may reach past the model input
    (zero-padded tokens the model also attended to) or the slide.
    """

    scale: int
    weights: np.ndarray
    downsample: float
    origin: tuple[float, float]

    @property
    def box(self) -> Region:
        """Level-0 box the window covers (outward-rounded)."""
        mh, mw = self.weights.shape[-2:]
        y0, x0 = self.origin
        d = self.downsample
        return Region(
            math.floor(y0), math.floor(x0), math.ceil(y0 + mh * d), math.ceil(x0 + mw * d)
        )

    def heat(self, head: int | None = None) -> np.ndarray:
        """``(mh, mw)`` weights averaged over MSA blocks and heads (or for one ``head``)."""
        w = self.weights.mean(axis=0)
        return w.mean(axis=0) if head is None else w[int(head)]

    def share(self, head: int | None = None) -> float:
        """Fraction of the token's attention spent on this scale (averaged like :meth:`heat`)."""
        return float(self.heat(head).sum())


@dataclass(frozen=True)
class PointExplanation:
    """Where the backbone token under ``point`` (level-0 ``(y, x)``) looked, scale by scale.

    ``scales[0]`` is the token's own window ("same scale"), ``scales[k]`` the scale-``k``
    window it read (coarser with ``k``). ``token_box`` is the token's level-0 box,
    ``input_box`` the model input block that was re-run (level-0, halo included).
    Predictions at the point: ``nucleus_type`` (None where no nucleus was found) with its
    confidence, ``tissue_class`` with the probability of every class.
    """

    point: tuple[float, float]
    scales: tuple[ScaleWindow, ...]
    token_box: Region
    input_box: Region
    slide_mpp: float
    analysis_mpp: float
    model_name: str
    heads: int
    blocks: int
    nucleus_type: str | None = None
    nucleus_probability: float | None = None
    tissue_class: str | None = None
    tissue_probabilities: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def shares(self, head: int | None = None) -> dict[int, float]:
        """Share of the token's attention per scale (sums to 1)."""
        return {w.scale: w.share(head) for w in self.scales}

    def field_of_view_um(self) -> dict[int, float]:
        """Side of each scale's window in micrometres (its longer side)."""
        out = {}
        for w in self.scales:
            b = w.box
            out[w.scale] = max(b.height, b.width) * self.slide_mpp
        return out


# -- the engine ----------------------------------------------------------------------------


def _check_point(slide: Any, point: Sequence[float]) -> tuple[float, float]:
    h, w = (int(v) for v in slide.shape[:2])
    try:
        y, x = (float(v) for v in point)
    except (TypeError, ValueError):
        msg = f"point {point!r} must be two numbers (y, x) in level-0 pixels"
        raise ValueError(msg) from None
    if not (0 <= y < h and 0 <= x < w):
        msg = (
            f"point ({y:g}, {x:g}) (y, x in level-0 px) is outside slide "
            f"{getattr(slide, 'name', '')!r}, whose level-0 pixels are y in [0, {h}), x in [0, {w})"
        )
        raise ValueError(msg)
    return y, x


def _analysis_pixel(plan: AnalysisPlan, y: float, x: float) -> tuple[int, int]:
    """Analysis pixel holding level-0 pixel ``(floor(y), floor(x))`` (its centre)."""
    return (
        math.floor((math.floor(y) + 0.5) / plan.f),
        math.floor((math.floor(x) + 0.5) / plan.f),
    )


def _owning_block(plan: AnalysisPlan, ay: int, ax: int, *, around: bool) -> Block:
    """The model input block holding analysis pixel ``(ay, ax)``.

    ``around``: the ``block_cells`` x ``block_cells`` tiles centred on the pixel's tile;
    otherwise the block an uncached :func:`~histolens.inference.analyze` of ``plan.region``
    runs for it.
    """
    grid = plan.grid
    if around:
        r, c, k = ay // grid.size, ax // grid.size, plan.block_cells
        tiles = [grid.tile(r - k // 2 + i, c - k // 2 + j) for i in range(k) for j in range(k)]
        return group_tiles(tiles, grid, k)[0]
    for block in order_blocks(grid.tiles(plan.box), plan):
        inner = block.inner
        if inner.y0 <= ay < inner.y1 and inner.x0 <= ax < inner.x1:
            return block
    msg = f"analysis pixel ({ay}, {ax}) is in no block of region {plan.region.as_tuple()}"
    raise ValueError(msg)


def explain_point(
    slide: Any,
    point: Sequence[float],
    *,
    model: Any = None,
    region: Region | None = None,
    result: RegionResult | None = None,
    mpp: float | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> PointExplanation:
    """Where the backbone looked, at each scale, for the token holding level-0 ``point``.

    Parameters
    ----------
    point
        ``(y, x)`` level-0 pixel (fractions are floored) inside the slide; a point outside
        raises ValueError naming the point and the slide's bounds.
    model
        An Atlas-based model (name or object); None for the default, or ``result``'s model.
        A backbone without cross-scale attention (a plain ViT) raises ValueError.
    region
        The analysed region (level-0 px, a Region or ``(y0, x0, y1, x1)``) the point lies in:
        the block re-run is the one ``analyze(slide, region)`` runs for the point (uncached;
        also where the analysis skipped glass). None: ``result.region``, or without a result
        the 3 x 3 tiles centred on the point.
    result
        The analysis of that region: predictions at the point are read from it (what the
        view shows; nothing extra is computed). Without it the nuclei and tile heads run on
        the same input, and the nucleus is the pixel's most likely type when its foreground
        probability is at least 0.5.
    precision
        ``"auto"``, ``"bf16"`` or ``"fp32"``; None: the precision ``result`` was computed in
        (the same arithmetic as the analysis shown), else ``"auto"``. The shown weights are
        always computed in float32 from the block's queries and keys.
    """
    t0 = time.perf_counter()
    y, x = _check_point(slide, point)
    if result is not None:
        region = region if region is not None else result.region
        mpp = mpp if mpp is not None else result.slide_mpp
        model = model if model is not None else result.provenance.model_name
        precision = precision if precision is not None else result.provenance.precision
    if region is not None and not isinstance(region, Region):
        region = Region(*region)
    slide_mpp = level0_mpp(slide, mpp)
    if region is not None and not (region.y0 <= y < region.y1 and region.x0 <= x < region.x1):
        msg = (
            f"point ({y:g}, {x:g}) is outside the analysed region {region.as_tuple()} "
            "(y0, x0, y1, x1 in level-0 px); explain a point inside it or analyse that view"
        )
        raise ValueError(msg)
    model = resolve_model(model, device)
    if not getattr(model, "has_cross_scale_attention", False):
        msg = (
            f"model {model.card.name!r} has no cross-scale attention to explain (Explain needs "
            "an Atlas-based model, e.g. 'histolens-default')"
        )
        raise ValueError(msg)
    where = region if region is not None else Region(int(y), int(x), int(y) + 1, int(x) + 1)
    plan = plan_analysis(where, float(slide_mpp), slide.downsamples, model.card)
    ay, ax = _analysis_pixel(plan, y, x)
    block = _owning_block(plan, ay, ax, around=region is None)
    rgb = read_analysis_box(slide.levels[plan.level.level], block.outer, plan.step)
    qy, qx = ay - block.outer.y0, ax - block.outer.x0
    tasks = () if result is not None else ("nuclei", "tiles")
    precision = precision if precision is not None else "auto"
    out = model.predict_tiles(rgb[None], tasks=tasks, precision=precision, query=(qy, qx))
    if result is not None:
        preds = _predictions_from_result(result, y, x)
    else:
        preds = _predictions_from_heads(out, model.card, qy, qx)
    return _assemble(out, plan, block, (y, x), float(slide_mpp), model, preds, t0)


def _assemble(
    out: dict[str, Any],
    plan: AnalysisPlan,
    block: Block,
    point: tuple[float, float],
    slide_mpp: float,
    model: Any,
    preds: dict[str, Any],
    t0: float,
) -> PointExplanation:
    """Split the query's key axis into one :class:`ScaleWindow` per scale, placed on level 0."""
    weights = np.asarray(out["query_attention"], dtype=np.float32)  # (blocks, heads, keys)
    keys = out["query_keys"]
    f = plan.f
    oy, ox = block.outer.y0, block.outer.x0  # analysis px of the model input's pixel (0, 0)
    windows = []
    start = 0
    for k in keys:
        w = weights[..., start : start + k.tokens].reshape(*weights.shape[:2], k.mh, k.mw)
        start += k.tokens
        origin = ((oy + k.row0 * k.stride) * f, (ox + k.col0 * k.stride) * f)
        windows.append(ScaleWindow(k.scale, w, k.stride * f, origin))
    if start != weights.shape[-1]:
        msg = f"query keys cover {start} tokens but the model returned {weights.shape[-1]} weights"
        raise RuntimeError(msg)
    fine = keys[0].stride
    ay, ax = _analysis_pixel(plan, *point)
    ty, tx = (ay - oy) // fine * fine + oy, (ax - ox) // fine * fine + ox
    token_box = Region(
        math.floor(ty * f),
        math.floor(tx * f),
        math.ceil((ty + fine) * f),
        math.ceil((tx + fine) * f),
    )
    outer = block.outer
    input_box = Region(
        math.floor(outer.y0 * f),
        math.floor(outer.x0 * f),
        math.ceil(outer.y1 * f),
        math.ceil(outer.x1 * f),
    )
    return PointExplanation(
        point=point,
        scales=tuple(sorted(windows, key=lambda w: w.scale)),
        token_box=token_box,
        input_box=input_box,
        slide_mpp=slide_mpp,
        analysis_mpp=plan.analysis_mpp,
        model_name=str(model.card.name),
        heads=int(weights.shape[1]),
        blocks=int(weights.shape[0]),
        seconds=time.perf_counter() - t0,
        **preds,
    )


def _cell(origin: Sequence[float], downsample: float, y: float, x: float) -> tuple[int, int]:
    """Index of the array pixel holding level-0 pixel ``(floor(y), floor(x))``."""
    return (
        math.floor((math.floor(y) + 0.5 - origin[0]) / downsample),
        math.floor((math.floor(x) + 0.5 - origin[1]) / downsample),
    )


def _inside(arr: np.ndarray, i: int, j: int) -> bool:
    return 0 <= i < arr.shape[0] and 0 <= j < arr.shape[1]


def _predictions_from_result(result: RegionResult, y: float, x: float) -> dict[str, Any]:
    """Nucleus instance and tile class under level-0 ``(y, x)`` in an analysed result."""
    preds: dict[str, Any] = {}
    nuc = result.nuclei
    if nuc is not None:
        i, j = _cell(nuc.origin, nuc.downsample, y, x)
        label = int(nuc.labels[i, j]) if _inside(nuc.labels, i, j) else 0
        rows = nuc.features[nuc.features["label"] == label] if label else nuc.features[:0]
        if len(rows):
            preds["nucleus_type"] = str(rows["class_name"].iloc[0])
            preds["nucleus_probability"] = float(rows["probability"].iloc[0])
    tiles = result.tiles
    if tiles is not None:
        i, j = _cell(tiles.origin, tiles.cell, y, x)
        cls = int(tiles.classes[i, j]) if _inside(tiles.classes, i, j) else 0
        if cls > 0:
            preds["tissue_class"] = tiles.class_names[cls - 1]
            probs = tiles.probabilities[i, j]
            preds["tissue_probabilities"] = {
                n: float(p) for n, p in zip(tiles.class_names, probs, strict=True)
            }
    return preds


def _predictions_from_heads(out: dict[str, Any], card: Any, qy: int, qx: int) -> dict[str, Any]:
    """Pixel-level nucleus type and cell-level tile class at input pixel ``(qy, qx)``."""
    preds: dict[str, Any] = {}
    if "nuclei_prob" in out and float(out["nuclei_prob"][0, qy, qx]) >= 0.5:
        types = out["type_prob"][0, :, qy, qx]
        best = int(np.argmax(types))
        preds["nucleus_type"] = str(card.nucleus_types[best])
        preds["nucleus_probability"] = float(types[best])
    if "tile_probs" in out:
        c = int(card.class_cell_px)
        probs = out["tile_probs"][0, qy // c, qx // c]
        names = tuple(card.tissue_classes)
        preds["tissue_class"] = names[int(np.argmax(probs))]
        preds["tissue_probabilities"] = {n: float(p) for n, p in zip(names, probs, strict=True)}
    return preds
