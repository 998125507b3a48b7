"""Do per-tile nucleus and colour statistics help the tile probe beyond the backbone's embeddings?

Grouped, stratified 5-fold CV of the project's logistic regression
(:func:`histolens.models.probe.cross_validate`), exactly as the model card's probes
(Kather 2016 sample resampled to the model's mpp; LC25000 lung, 600 tiles in whole
near-duplicate families, at their own scale), with three feature sets:

- ``embedding``: the mean tile embedding (what the shipped tile head and "Teach" use);
- ``+nuclei``: plus nuclei per type per 32 um cell and the mean nucleus area (um^2), from the
  default model's own nuclei output on the same tile;
- ``+nuclei+colour``: plus mean and std of the haematoxylin and eosin optical densities
  (``skimage.color.rgb2hed``).

    PYTHONPATH=src python benchmarks/teach_features.py [--data ../shared/data] [--threads 1]

Prints one line per set and feature set, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CELL_UM = 32.0


def tile_statistics(images: np.ndarray, mpp: float, model) -> np.ndarray:
    """(N, n_types + 1) nuclei per type per 32 um cell and mean area; (N, 4) H/E OD mean/std."""
    from skimage.color import rgb2hed

    from histolens.nuclei import segment_nuclei

    types = tuple(model.card.nucleus_types)
    nuc, col = [], []
    for im in images:
        _labels, table = segment_nuclei(im, mpp=mpp, model=model)
        cells = im.shape[0] * im.shape[1] * mpp * mpp / CELL_UM**2
        counts = [float((table["type"] == t).sum()) / cells for t in types]
        area = float(table["area_um2"].mean()) if len(table) else 0.0
        nuc.append([*counts, area])
        hed = rgb2hed(im)
        col.append([hed[..., 0].mean(), hed[..., 0].std(), hed[..., 1].mean(), hed[..., 1].std()])
    return np.asarray(nuc, np.float32), np.asarray(col, np.float32)


def compare(name: str, x: np.ndarray, nuc: np.ndarray, col: np.ndarray, y, groups, n_classes):
    from histolens.models.probe import cross_validate

    out = {}
    for label, feats in (
        ("embedding", x),
        ("+nuclei", np.hstack([x, nuc])),
        ("+nuclei+colour", np.hstack([x, nuc, col])),
    ):
        cv = cross_validate(feats, y, groups, n_classes, k=5, seed=0)
        out[label] = {k: cv[k] for k in ("accuracy_mean", "accuracy_std", "balanced_accuracy_mean")}
        print(
            f"{name:8s} {label:16s} grouped 5-fold CV accuracy {cv['accuracy_mean']:.3f} "
            f"+- {cv['accuracy_std']:.3f} (balanced {cv['balanced_accuracy_mean']:.3f}, "
            f"n={cv['n']}, {cv['groups']} groups)",
            flush=True,
        )
    return out


def lc25000_subset(lc, n_tiles: int, seed: int = 0) -> np.ndarray:
    """Indices of whole near-duplicate families, about ``n_tiles`` tiles (as the release does)."""
    rng = np.random.default_rng(seed)
    groups = np.unique(lc.groups)
    rng.shuffle(groups)
    chosen, n = [], 0
    for g in groups:
        if n >= n_tiles:
            break
        chosen.append(g)
        n += int((lc.groups == g).sum())
    return np.nonzero(np.isin(lc.groups, chosen))[0]


def main() -> None:
    import torch

    from histolens.models import create_model
    from histolens.training.datasets import load_kather, load_lc25000
    from histolens.training.probe import tile_embeddings
    from histolens.training.release import KATHER_EFFECTIVE_MPP

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lc25000-tiles", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(None)
    report = {"model": model.card.name, "threads": args.threads}
    t0 = time.perf_counter()
    kather = load_kather(args.data)
    xk = tile_embeddings(model, kather.images, image_mpp=KATHER_EFFECTIVE_MPP)
    nk, ck = tile_statistics(kather.images, KATHER_EFFECTIVE_MPP, model)
    report["kather"] = compare(
        "kather", xk, nk, ck, kather.labels, kather.groups, len(kather.classes)
    )
    lc = load_lc25000(args.data)
    idx = lc25000_subset(lc, args.lc25000_tiles)
    xl = tile_embeddings(model, lc.images[idx])  # mpp unknown: the tiles' own scale
    nl, cl = tile_statistics(lc.images[idx], float(model.card.mpp), model)
    report["lc25000"] = compare(
        "lc25000", xl, nl, cl, lc.labels[idx], lc.groups[idx], len(lc.classes)
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
