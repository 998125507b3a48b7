"""``overview.png``: the analysed region with nuclei outlines (by class), a tile-class tint
and a legend, for a report or a quick look without napari."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histolens.colors import class_color_map, parse_color

from ._atomic import atomic_path
from ._polygons import iter_label_polygons

if TYPE_CHECKING:
    from histolens.region import Region
    from histolens.result import NucleiResult, RegionResult

__all__ = ["render_overview_png"]

#: Overview PNGs outline nuclei at least this many output pixels across, and dot smaller ones.
_MIN_OUTLINE_PX = 3.0

#: A legend line: text, colour (None for the title), "fill" (tiles) or "outline" (nuclei).
Legend = list[tuple[str, Any, str]]


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
    from PIL import Image

    region = result.region
    if region.is_empty:
        msg = f"cannot render an empty region {region}"
        raise ValueError(msg)
    s = min(1.0, float(max_side) / max(region.height, region.width))  # output px per level-0 px
    out_hw = (max(1, round(region.height * s)), max(1, round(region.width * s)))
    base = _read_background(slide, region, out_hw).astype(np.float32)
    if result.tiles is not None:
        _tint_tiles(base, result, s, tile_alpha)
    nuc = result.nuclei if result.nuclei is not None and result.nuclei.count else None
    dots = nuc is not None and _nucleus_diameter_px(result, s) < _MIN_OUTLINE_PX
    if dots:
        _dot_nuclei(base, nuc, region, s)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    if nuc is not None:
        if not dots:
            _outline_nuclei(img, nuc, region, s)
    _draw_legend(img, _legend(result), result)
    target = Path(path)
    with atomic_path(target) as tmp:
        img.save(tmp, format="PNG")
    return target


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


def _tint_tiles(base: np.ndarray, result: RegionResult, s: float, alpha: float) -> None:
    """Blend each analysed tile cell's class colour into ``base`` (in place)."""
    region, tiles = result.region, result.tiles
    out_h, out_w = base.shape[:2]
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
    paint = colors[grid[tinted].clip(0, len(colors) - 1)]
    base[tinted] = (1 - alpha) * base[tinted] + alpha * paint


def _dot_nuclei(base: np.ndarray, nuc: NucleiResult, region: Region, s: float) -> None:
    """One class-coloured pixel per nucleus (in place): a whole slide at overview scale, where
    outlines would be invisible (and tracing millions of them takes many minutes)."""
    out_h, out_w = base.shape[:2]
    cmap = class_color_map(nuc.class_names, nuc.class_colors)
    f = nuc.features
    yy = np.floor((f["centroid_y"].to_numpy() + 0.5 - region.y0) * s).astype(np.int64)
    xx = np.floor((f["centroid_x"].to_numpy() + 0.5 - region.x0) * s).astype(np.int64)
    rgb = np.array(
        [cmap.get(str(n), [255, 255, 0]) for n in f["class_name"].astype(str)], np.float32
    ).reshape(-1, 3)
    ok = (yy >= 0) & (yy < out_h) & (xx >= 0) & (xx < out_w)
    base[yy[ok], xx[ok]] = rgb[ok]


def _outline_nuclei(img: Any, nuc: NucleiResult, region: Region, s: float) -> None:
    """Trace every nucleus outline onto ``img`` in its class colour."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    cmap = class_color_map(nuc.class_names, nuc.class_colors)
    by_label = dict(
        zip(nuc.features["label"].astype(int), nuc.features["class_name"].astype(str), strict=True)
    )
    # Simplify at about one output pixel: finer vertices are invisible at this scale.
    tol = max(0.5, 0.8 / (s * float(nuc.downsample)))
    width = 2 if s >= 0.5 else 1
    outlines = iter_label_polygons(
        nuc.labels, downsample=nuc.downsample, origin=nuc.origin, tolerance=tol
    )
    for label_id, rings in outlines:
        color = tuple(cmap.get(by_label.get(label_id, ""), [255, 255, 0]))
        for ring in rings:
            pts = [((x - region.x0) * s, (y - region.y0) * s) for x, y in ring]
            if len(pts) >= 3:
                draw.line(pts, fill=color, width=width)


def _legend(result: RegionResult) -> Legend:
    """Nuclei classes (last class first), then tile classes, with their counts; empty ones left
    out. The counts are the result's :meth:`~histolens.result.RegionResult.summary`."""
    summary = result.summary()
    nuclei = [
        (f"{row.name} nuclei ({row.count})", parse_color(row.color), "outline")
        for row in reversed(summary.nuclei_by_class)
        if row.count
    ]
    tiles = [
        (f"{row.name} ({row.count} cells)", parse_color(row.color), "fill")
        for row in summary.tiles_by_class
        if row.count
    ]
    return nuclei + tiles


def _nucleus_diameter_px(result: RegionResult, scale: float) -> float:
    """Median nucleus diameter in output pixels at ``scale`` output px per level-0 px (inf
    when unknown, so outlines are drawn)."""
    mpp0 = result.slide_mpp
    area = result.nuclei.features["area_um2"].to_numpy(dtype=np.float64)
    if not mpp0 or not len(area) or not np.isfinite(np.median(area)):
        return math.inf
    return 2.0 * math.sqrt(float(np.median(area)) / math.pi) / mpp0 * scale


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _draw_legend(img: Any, entries: list[tuple[str, list[int], str]], result: RegionResult) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img, "RGBA")
    size = max(11, min(22, img.width // 60))
    font = _font(size)
    title = f"{result.provenance.slide_name}  {result.provenance.model_name}"
    mpp0 = result.slide_mpp
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
