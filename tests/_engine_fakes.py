"""Test doubles for the inference engine: a synthetic pyramid slide and a local numpy model.

The fake model is *local*: every output at a pixel depends only on input pixels within
``RF`` px, which is below the card's halo, so tiled and whole-region runs must agree. That
makes it the oracle for the tiling, stitching and alignment logic, independent of any
trained network. A helper module, not a test module: the engine tests import it, and its
own sanity checks live in ``test_inference.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
from scipy import ndimage

from histolens.models.card import ModelCard

#: Receptive field (px) of the fake model's dense outputs.
RF = 12

BACKGROUND = (236, 196, 222)  # pale pink stroma: counts as tissue
NUCLEUS = (70, 30, 120)  # dark purple haematoxylin
GLASS = (245, 245, 245)


@dataclass
class FakeSlide:
    """The Slide contract (``docs/architecture.md``) over in-memory dask arrays."""

    levels: tuple
    downsamples: tuple[float, ...]
    mpp: float | None
    name: str = "synthetic"
    path: str = ""
    mpp_source: str = "synthetic"
    vendor: str = "synthetic"
    metadata: dict = field(default_factory=dict)
    associated: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape[:2])


@functools.lru_cache(maxsize=8)
def synthetic_image(
    size: int = 1024, n: int = 140, radius: float = 6.0, seed: int = 0, glass_cols: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``(size, size, 3)`` with dark disks, and their centres ``(n, 2)`` (level-0 px).

    The rightmost ``glass_cols`` columns are blank glass (for the background-skip tests).
    Cached and read-only: copy before changing pixels.
    """
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    centres: list[tuple[float, float]] = []
    yy, xx = np.mgrid[0:size, 0:size]
    lim = size - glass_cols - 3 * radius
    tries = 0
    while len(centres) < n and tries < 20 * n:
        tries += 1
        c = rng.uniform(3 * radius, [size - 3 * radius, lim])
        if any((c[0] - p[0]) ** 2 + (c[1] - p[1]) ** 2 < (3.2 * radius) ** 2 for p in centres):
            continue
        centres.append((float(c[0]), float(c[1])))
    for cy, cx in centres:
        y0, y1 = int(cy - radius - 2), int(cy + radius + 3)
        x0, x1 = int(cx - radius - 2), int(cx + radius + 3)
        d = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        img[y0:y1, x0:x1][d <= radius**2] = NUCLEUS
    if glass_cols:
        img[:, size - glass_cols :] = GLASS
    pts = np.array(centres)
    img.setflags(write=False)
    pts.setflags(write=False)
    return img, pts


def pyramid_slide(
    img: np.ndarray, mpp: float | None = 0.25, n_levels: int = 4, name: str = "synthetic"
) -> FakeSlide:
    """A slide whose level ``k`` is the 2^k block mean of ``img``."""
    levels = [img]
    for _ in range(1, n_levels):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        levels.append(np.rint(a).astype(np.uint8))
    return FakeSlide(
        levels=tuple(da.from_array(lv, chunks=(256, 256, 3)) for lv in levels),
        downsamples=tuple(float(2**k) for k in range(n_levels)),
        mpp=mpp,
        name=name,
    )


def fake_card(
    mpp: float = 0.5, *, tile_size: int = 128, halo: int = 32, name: str = "fake-local"
) -> ModelCard:
    return ModelCard(
        name=name,
        backbone="numpy-local",
        mpp=mpp,
        tile_size=tile_size,
        halo=halo,
        input_multiple=32,
        nucleus_types=("dark", "very dark"),
        nucleus_colors=((200, 0, 200), (0, 200, 200)),
        tissue_classes=("light", "dark"),
        tissue_colors=((240, 200, 220), (90, 40, 140)),
        class_cell_px=32,
        attention_strides=(32, 64),
    )


class FakeModel:
    """``predict_tiles`` from local image statistics (see module docstring)."""

    def __init__(self, card: ModelCard | None = None) -> None:
        self.card = card or fake_card()
        self.device = "cpu"
        self.calls: list[int] = []  # batch size of each call
        self.shapes: list[tuple[int, int]] = []  # input (H, W) of each call

    def predict_tiles(self, tiles, *, tasks=("nuclei", "tiles", "attention"), precision="auto"):
        x = np.asarray(tiles, np.float32) / 255.0
        b, h, w, _ = x.shape
        m = self.card.input_multiple
        if h % m or w % m:
            raise ValueError(f"fake model needs multiples of {m}, got {h}x{w}")
        self.calls.append(b)
        self.shapes.append((h, w))
        dark = 1.0 - x.mean(axis=3)  # (B, H, W)
        out = {}
        if "nuclei" in tasks:
            prob = np.clip((ndimage.uniform_filter(dark, size=(1, 3, 3)) - 0.35) * 5.0, 0, 1)
            # A centre-pointing vector field: the negative gradient of a blurred blob map.
            blob = ndimage.gaussian_filter(prob, sigma=(0, 3, 3), truncate=3.0)
            # Per tile: ndimage.sobel smooths along every other axis, the batch axis included.
            gy = np.stack([ndimage.sobel(t, axis=0) for t in blob])
            gx = np.stack([ndimage.sobel(t, axis=1) for t in blob])
            # A fixed scale (about the peak gradient of a painted disk), never a per-tile max:
            # that would make the output depend on the whole tile.
            hv = np.clip(-np.stack([gx, gy], axis=1) / 3.8, -1, 1) * (prob[:, None] > 0.05)
            out["nuclei_prob"] = prob.astype(np.float32)
            out["hv"] = hv.astype(np.float32)
            t1 = np.clip((dark - 0.55) * 10, 0, 1)
            out["type_prob"] = np.stack([1 - t1, t1], axis=1).astype(np.float32)
        c = self.card.class_cell_px
        cell = dark.reshape(b, h // c, c, w // c, c).mean(axis=(2, 4))
        if "tiles" in tasks:
            p_dark = np.clip(cell * 4, 0, 1)
            out["tile_probs"] = np.stack([1 - p_dark, p_dark], axis=-1).astype(np.float32)
            emb = x.reshape(b, h // c, c, w // c, c, 3).mean(axis=(2, 4))
            out["embeddings"] = emb.astype(np.float32)
        if "attention" in tasks:
            att = {}
            for s_i, s in enumerate(self.card.attention_strides):
                att[s_i] = np.clip(
                    dark.reshape(b, h // s, s, w // s, s).mean(axis=(2, 4)) * 3, 0, 1
                ).astype(np.float32)
            out["attention"] = att
        return out


def simple_instances(nuclei_prob, hv, type_prob=None, *, mpp):
    """Connected components of ``nuclei_prob > 0.5`` with majority type: a stand-in for
    ``hover_instances`` that keeps engine tests independent of the watershed's tuning."""
    from skimage.measure import label

    lab = label(nuclei_prob > 0.5, connectivity=1).astype(np.uint32)
    n = int(lab.max())
    types = np.zeros(n, np.int32)
    probs = np.ones(n, np.float32)
    if type_prob is not None and n:
        arg = np.argmax(type_prob, axis=0)
        for k in range(1, n + 1):
            votes = np.bincount(arg[lab == k], minlength=type_prob.shape[0])
            types[k - 1] = int(np.argmax(votes))
            probs[k - 1] = votes.max() / votes.sum()
    return lab, types, probs


def match_instances(a: np.ndarray, b: np.ndarray, iou: float = 0.9) -> tuple[int, int, int]:
    """(matched, instances in a, instances in b) with one-to-one IoU >= ``iou`` matches."""
    ids_a = np.unique(a[a > 0])
    ids_b = np.unique(b[b > 0])
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    area_a = dict(zip(*np.unique(a[a > 0], return_counts=True), strict=True))
    area_b = dict(zip(*np.unique(b[b > 0], return_counts=True), strict=True))
    matched = 0
    for (la, lb), n in zip(pairs.T, inter, strict=True):
        if n / (area_a[la] + area_b[lb] - n) >= iou:
            matched += 1  # IoU > 0.5 matches are unique, so no double counting
    return matched, len(ids_a), len(ids_b)
