"""Shared fixtures: the real data beside the repository, CPU-friendly settings, and the test
doubles, handed out as factory fixtures (request ``synthetic_image``, ``fake_model``,
``make_result``, ``brightness_atlas`` ... as arguments and call them).

The engine doubles: a synthetic pyramid slide of dark disks on pink stroma and a *local* numpy
model. Every output of the fake model at a pixel depends only on input pixels within
``FakeModel.receptive_field`` px, below the card's halo, so tiled and whole-region runs must
agree: that makes it the oracle for the tiling, stitching and alignment logic, independent of
any trained network (its own sanity checks live in ``test_inference.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.draw import disk

from histolens.models.card import ModelCard
from histolens.region import Region
from histolens.result import (
    NUCLEI_COLUMNS,
    NucleiResult,
    Provenance,
    RegionResult,
    TileClassResult,
)

REPO = Path(__file__).resolve().parents[1]
#: Real slides and labelled data live beside the repository (``../shared/data``).
SHARED_DATA = Path(os.environ.get("HISTOLENS_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests share a 2-core machine; keep BLAS/torch from oversubscribing it.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``, or skip: the real files are not part of this repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} is absent (it sits beside the repo as ../shared/data)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    path = shared_data / "wsi"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


# ------------------------------------------------------------------------------------------
# Engine doubles: a synthetic pyramid slide and a local numpy model
# ------------------------------------------------------------------------------------------
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
def _paint_synthetic_image(
    size: int = 1024, n: int = 140, radius: float = 6.0, seed: int = 0, glass_cols: int = 0
) -> tuple[np.ndarray, np.ndarray]:
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


@pytest.fixture(scope="session")
def synthetic_image():
    """``synthetic_image(size=1024, n=140, radius=6.0, seed=0, glass_cols=0)``: an RGB uint8
    ``(size, size, 3)`` image with ``n`` dark disks, and their centres ``(n, 2)`` (level-0 px).

    The rightmost ``glass_cols`` columns are blank glass (for the background-skip tests).
    Cached and read-only: copy before changing pixels.
    """
    return _paint_synthetic_image


def _pyramid_slide(
    img: np.ndarray, mpp: float | None = 0.25, n_levels: int = 4, name: str = "synthetic"
) -> FakeSlide:
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


@pytest.fixture(scope="session")
def pyramid_slide():
    """``pyramid_slide(img, mpp=0.25, n_levels=4, name="synthetic")``: a slide (the Slide
    contract over dask arrays) whose level ``k`` is the 2^k block mean of ``img``."""
    return _pyramid_slide


def _fake_card(
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


@pytest.fixture(scope="session")
def fake_card():
    """``fake_card(mpp=0.5, *, tile_size=128, halo=32, name="fake-local")``: the fake model's
    card (two nucleus types, two tissue classes, 32 px class cells, attention strides 32, 64)."""
    return _fake_card


class FakeModel:
    """``predict_tiles`` from local image statistics (see the module docstring)."""

    #: Receptive field (px) of the dense outputs.
    receptive_field = 12

    def __init__(self, card: ModelCard | None = None) -> None:
        self.card = card or _fake_card()
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
            out.update(self._nuclei(dark))
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

    @staticmethod
    def _nuclei(dark: np.ndarray) -> dict[str, np.ndarray]:
        prob = np.clip((ndimage.uniform_filter(dark, size=(1, 3, 3)) - 0.35) * 5.0, 0, 1)
        # A centre-pointing vector field: the negative gradient of a blurred blob map.
        blob = ndimage.gaussian_filter(prob, sigma=(0, 3, 3), truncate=3.0)
        # Per tile: ndimage.sobel smooths along every other axis, the batch axis included.
        gy = np.stack([ndimage.sobel(t, axis=0) for t in blob])
        gx = np.stack([ndimage.sobel(t, axis=1) for t in blob])
        # A fixed scale (about the peak gradient of a painted disk), never a per-tile max:
        # that would make the output depend on the whole tile.
        hv = np.clip(-np.stack([gx, gy], axis=1) / 3.8, -1, 1) * (prob[:, None] > 0.05)
        t1 = np.clip((dark - 0.55) * 10, 0, 1)
        return {
            "nuclei_prob": prob.astype(np.float32),
            "hv": hv.astype(np.float32),
            "type_prob": np.stack([1 - t1, t1], axis=1).astype(np.float32),
        }


@pytest.fixture(scope="session")
def fake_model() -> type[FakeModel]:
    """The local numpy model's class: ``fake_model(card=None)`` is a new model
    (``fake_card()`` by default) recording the batch size (``calls``) and input size
    (``shapes``) of every call; tests that need another behaviour subclass it."""
    return FakeModel


def _simple_instances(nuclei_prob, hv, type_prob=None, *, mpp):
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


@pytest.fixture
def simple_postprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine labels nuclei as connected components of ``nuclei_prob > 0.5`` with a
    majority type instead of ``hover_instances``: engine tests stay independent of the
    watershed's tuning."""
    import histolens._engine as engine

    monkeypatch.setattr(engine, "_hover_instances", _simple_instances)


@pytest.fixture(scope="session")
def match_instances():
    """``match_instances(a, b, iou=0.9) -> (matched, instances in a, instances in b)`` for two
    label images: the unique IoU > ``iou`` matches of ``histolens.training.metrics``."""
    from histolens.training.metrics import match_instances as unique_matches

    def counts(a: np.ndarray, b: np.ndarray, iou: float = 0.9) -> tuple[int, int, int]:
        matched, _, _ = unique_matches(a, b, iou_threshold=iou)
        return len(matched), len(np.unique(a[a > 0])), len(np.unique(b[b > 0]))

    return counts


# ------------------------------------------------------------------------------------------
# A hand-built RegionResult (the export tests)
# ------------------------------------------------------------------------------------------
def _hand_built_nuclei(downsample: float, origin, mpp: float) -> NucleiResult:
    types = ("epithelial", "inflammatory", "stromal")
    labels = np.zeros((96, 128), np.uint32)
    centres = [(12, 14), (20, 60), (48, 30), (50, 100), (80, 20), (83, 110)]
    rows = []
    for k, (cy, cx) in enumerate(centres, start=1):
        rr, cc = disk((cy, cx), 4 + k % 3, shape=labels.shape)
        labels[rr, cc] = k
        cls = (k - 1) % 3
        rows.append(
            {
                "label": k,
                # the engine's convention: level-0 pixel-index coordinates (pixel k centred on k)
                "centroid_y": origin[0] + (cy + 0.5) * downsample - 0.5,
                "centroid_x": origin[1] + (cx + 0.5) * downsample - 0.5,
                "area_um2": float(len(rr)) * (mpp * downsample) ** 2,
                "class_id": cls,
                "class_name": types[cls],
                "probability": 0.5 + 0.05 * k,
            }
        )
    features = pd.DataFrame(rows, columns=list(NUCLEI_COLUMNS))
    colors = ("#ff0000", "#00ff00", "#0000ff")
    return NucleiResult(labels, features, downsample, tuple(origin), types, colors)


def _make_result(
    *, downsample: float = 2.0, origin=(1000, 2000), mpp: float = 0.25
) -> RegionResult:
    nuclei = _hand_built_nuclei(downsample, origin, mpp)
    cell = 64.0  # level-0 px per tile cell
    classes = np.array([[1, 2, 0], [2, 1, 1]], np.int32)
    probs = np.zeros((2, 3, 2), np.float32)
    probs[..., 0] = np.where(classes == 1, 0.8, 0.3)
    probs[..., 1] = 1 - probs[..., 0]
    tissue, tissue_colors = ("tumour", "stroma"), ("#aa3377", "#66ccee")
    tiles = TileClassResult(classes, probs, None, cell, tuple(origin), tissue, tissue_colors)
    h, w = nuclei.labels.shape
    region = Region(
        origin[0], origin[1], origin[0] + h * int(downsample), origin[1] + w * int(downsample)
    )
    prov = Provenance(
        slide_path="/data/synthetic.tif",
        slide_name="synthetic",
        region=region,
        level=0,
        level_downsample=1.0,
        slide_mpp=mpp,
        mpp_source="user",
        analysis_mpp=mpp * downsample,
        model_name="hand-made",
        model_card={"name": "hand-made", "mpp": mpp * downsample, "tasks": ("nuclei", "tiles")},
        device="cpu",
        precision="fp32",
        started="2026-01-01T00:00:00",
        seconds=1.5,
        tiles_total=4,
        tiles_done=4,
    )
    return RegionResult(region, mpp * downsample, nuclei, tiles, [], prov)


@pytest.fixture(scope="session")
def make_result():
    """``make_result(*, downsample=2.0, origin=(1000, 2000), mpp=0.25)``: a new hand-built
    result: 6 disk nuclei of 3 types and a 2 x 3 grid of 2 tissue classes (64 level-0 px
    cells), at a non-trivial level-0 ``origin``; ``mpp`` is the slide's (um/px)."""
    return _make_result


# ------------------------------------------------------------------------------------------
# Atlas models whose attention is known in advance (torch is imported only when asked for)
# ------------------------------------------------------------------------------------------
def _brightness_stem(dim: int):
    """Stride-16 tokens: channel 0 = mean brightness of the 16x16 patch (-1 black, +1 white,
    after the card's 0.5/0.5 normalisation), channel 1 = 1; the skip features are zeros."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BrightnessStem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dim = dim
            self.channels = {2: 1, 4: 1, 8: 1, 16: dim}

        def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
            b, _, h, w = x.shape
            t = torch.zeros(b, self.dim, h // 16, w // 16, dtype=x.dtype)
            t[:, 0] = F.avg_pool2d(x.mean(1, keepdim=True), 16)[:, 0]
            t[:, 1] = 1.0
            return {**{s: torch.zeros(b, 1, h // s, w // s) for s in (2, 4, 8)}, 16: t}

    return BrightnessStem()


def _brightness_atlas(set_weights, *, name: str, halo: int, description: str):
    import torch
    from torch import nn

    from histolens.models import atlas as A
    from histolens.models._model import HistoLensModel

    cfg = A.AtlasConfig(
        stem_in=8, stem_features=8, heads=2, depths=(1,), g=2, pos_hidden=8, scale_blocks=3
    )
    net = A.Atlas(cfg)
    net.stem = _brightness_stem(cfg.dim)
    hd = cfg.dim // cfg.heads
    with torch.no_grad():
        for s, blk in enumerate(net.stages[0][0].scales):
            blk.norm_q, blk.norm_kv, blk.norm2 = nn.Identity(), nn.Identity(), nn.Identity()
            for p in (*blk.q.parameters(), *blk.kv.parameters(), *blk.proj.parameters()):
                p.zero_()
            for p in (*blk.mlp.fc2.parameters(), blk.pos[2].weight):
                p.zero_()
            set_weights(s, blk, hd)
    card = ModelCard(
        name=name,
        backbone="atlas",
        mpp=0.5,
        tile_size=1024,
        halo=halo,
        input_multiple=64,
        tasks=("attention",),
        class_cell_px=64,
        attention_strides=(16, 32),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        description=description,
    )
    return HistoLensModel(card, net, None, None).eval()


@pytest.fixture(scope="session")
def brightness_atlas():
    """``brightness_atlas(set_weights, *, name, halo, description) -> HistoLensModel``: a
    3-scale Atlas, attention task only, on brightness tokens (stride 16: channel 0 = mean
    brightness of the patch, -1 black to +1 white; channel 1 = 1).

    Every MSA block's projections, MLP output and position MLP are zeroed and its norms made
    identities, so a token passes through unchanged and its attention follows only the
    query/key weights that ``set_weights(scale, block, head_dim)`` sets (under
    ``torch.no_grad``) afterwards.
    """
    pytest.importorskip("torch")
    return _brightness_atlas


@pytest.fixture(scope="session")
def attend_reference():
    """``attend_reference(block, queries (n, C), sources) -> (weights (n, heads, N), outputs
    (n, C))``: one Atlas scale block's attention written out plainly, the reference of the MSA
    tests. ``sources`` are ``(block, tokens (N, C))`` pairs, whose keys every query sees."""
    torch = pytest.importorskip("torch")

    def attend(blk, xq, sources):
        h = blk.heads
        q = blk.q(blk.norm_q(xq)).reshape(len(xq), h, -1)
        ks, vs = [], []
        for kb, toks in sources:
            k, v = kb.kv(kb.norm_kv(toks)).chunk(2, -1)
            ks.append(k.reshape(len(toks), h, -1))
            vs.append(v.reshape(len(toks), h, -1))
        k, v = torch.cat(ks), torch.cat(vs)
        a = torch.softmax(torch.einsum("qhd,nhd->qhn", q, k) / q.shape[-1] ** 0.5, -1)
        return a, blk.proj(torch.einsum("qhn,nhd->qhd", a, v).reshape(len(xq), -1))

    return attend


# ------------------------------------------------------------------------------------------
# The real default model and the project's slide fuzzer
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def default_model():
    """The real default model (``histolens-default``, embedded weights) on the CPU, loaded once
    for the session: tests only read it."""
    pytest.importorskip("torch")
    from histolens.models import create_model

    return create_model(None, device="cpu")


def _benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, so tests build inputs with the benchmarks' code."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def slide_fuzz(wsi_dir: Path) -> ModuleType:
    """``benchmarks/slide_fuzz.py`` as a module: its mutations, handmade files and runner."""
    pytest.importorskip("pydicom")
    module = _benchmark_module("slide_fuzz")
    assert module.WSI == wsi_dir  # the workers find the slides where the fixtures do
    return module


@pytest.fixture(scope="session")
def dicom_open(wsi_dir: Path) -> ModuleType:
    """``benchmarks/dicom_open.py`` as a module: its WSI DICOM writer (``write_frames``)."""
    pytest.importorskip("pydicom")
    module = _benchmark_module("dicom_open")
    assert module.WSI == wsi_dir
    return module
