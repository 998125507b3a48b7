"""Tile-class probes: logistic regression on the model's tile embeddings, with grouped CV.

The shipped tile head is ``embeddings -> 1x1 conv classifier``; a multinomial logistic
regression fitted on tile embeddings (mean over the tile's cells) *is* such a classifier, so
it drops into the model exactly (:func:`install_linear_head`). Users train their own classes
with ``histolens train tiles --images DIR [--labels CSV] --out NEW.safetensors``.

Cross-validation is always grouped (near-duplicate families never straddle folds) and
stratified by class; :func:`grouped_folds` makes the folds.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import TileSet, group_near_duplicates, resample_image

__all__ = [
    "LinearProbe",
    "add_tile_arguments",
    "cross_validate",
    "fit_logistic",
    "grouped_folds",
    "install_linear_head",
    "load_tile_folder",
    "tile_embeddings",
    "train_tiles",
]

log = logging.getLogger("histolens.train")

#: Colours for user-defined tile classes (r, g, b), cycled when there are more classes.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class LinearProbe:
    """Multinomial logistic regression ``logits = x @ weight.T + bias`` on raw embeddings.

    ``weight`` (C, D) and ``bias`` (C,) already include the feature standardisation.
    """

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(1)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2, iters: int = 200
) -> LinearProbe:
    """Fit an L2-regularised multinomial logistic regression (torch L-BFGS, full batch).

    Features are standardised for conditioning; the scaling is folded back into the weights.
    """
    import torch

    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mu) / sd).astype(np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    wn = w.detach().numpy() / sd[None, :]
    bn = b.detach().numpy() - wn @ mu
    return LinearProbe(wn.astype(np.float32), bn.astype(np.float32))


def grouped_folds(labels: np.ndarray, groups: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per sample; whole groups per fold, balanced per class.

    Groups are dealt to folds class by class (a group's class = its majority label) in a
    seeded random order, each to the fold that holds fewest samples of that class so far.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    fold_of_group: dict[Any, int] = {}
    counts = np.zeros((k, int(labels.max()) + 1), int)
    uniq = np.unique(groups)
    rng.shuffle(uniq)
    # Big groups first so they do not unbalance the folds at the end.
    sizes = {g: int((groups == g).sum()) for g in uniq}
    for g in sorted(uniq, key=lambda g: -sizes[g]):
        cls = int(np.bincount(labels[groups == g]).argmax())
        f = int(np.argmin(counts[:, cls] + 1e-3 * counts.sum(1)))
        fold_of_group[g] = f
        counts[f, cls] += sizes[g]
    return np.array([fold_of_group[g] for g in groups])


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    *,
    k: int = 5,
    seed: int = 0,
    l2: float = 1e-2,
) -> dict[str, Any]:
    """k-fold CV of :func:`fit_logistic` with :func:`grouped_folds`: accuracy and balanced accuracy."""
    folds = grouped_folds(y, groups, k, seed=seed)
    accs, baccs = [], []
    pred = np.full(len(y), -1)
    for f in range(k):
        test = folds == f
        if not test.any() or test.all():
            continue
        probe = fit_logistic(x[~test], y[~test], n_classes, l2=l2)
        p = probe.predict(x[test])
        pred[test] = p
        accs.append(float((p == y[test]).mean()))
        baccs.append(_balanced_accuracy(y[test], p, n_classes))
    return {
        "folds": k,
        "n": len(y),
        "groups": len(np.unique(groups)),
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "balanced_accuracy_mean": float(np.mean(baccs)),
        "pooled_accuracy": float((pred == y).mean()),
        "fold_accuracy": accs,
    }


def _balanced_accuracy(y: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    rec = [float((p[y == c] == c).mean()) for c in range(n_classes) if (y == c).any()]
    return float(np.mean(rec))


def tile_embeddings(
    model: Any, images: np.ndarray, *, image_mpp: float | None = None, batch_size: int = 16
) -> np.ndarray:
    """Mean tile embedding (N, D) of uint8 tiles (N, H, W, 3) from ``model.predict_tiles``.

    With ``image_mpp`` (um/px), tiles are first resampled to the model's mpp, as at inference.
    Tiles are reflect-padded to ``card.input_multiple``; only cells whose centre lies inside
    the original tile are averaged.
    """
    card = model.card
    f = 1.0 if image_mpp is None else image_mpp / card.mpp
    out = []
    c = card.class_cell_px
    m = int(np.lcm(card.input_multiple, c))
    for i in range(0, len(images), batch_size):
        chunk = [resample_image(im, f) for im in images[i : i + batch_size]]
        h, w = chunk[0].shape[:2]
        hp, wp = -(-h // m) * m, -(-w // m) * m
        arr = np.stack(
            [np.pad(im, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect") for im in chunk]
        )
        emb = model.predict_tiles(arr, tasks=("tiles",))["embeddings"]
        gy = max(1, int(np.floor(h / c + 0.5)))
        gx = max(1, int(np.floor(w / c + 0.5)))
        out.append(emb[:, :gy, :gx].reshape(len(arr), -1, emb.shape[-1]).mean(1))
    return np.concatenate(out).astype(np.float32)


def install_linear_head(
    model: Any,
    probe: LinearProbe,
    classes: Sequence[str],
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> Any:
    """Replace the model's tile classifier by ``probe`` and its card's classes; returns the model."""
    import torch

    head = model.tile_head
    if head is None:
        msg = f"model {model.card.name!r} has no tile head (card tasks {model.card.tasks}); use a model with task 'tiles'"
        raise ValueError(msg)
    d = probe.weight.shape[1]
    if d != head.embed_dim:
        msg = f"probe has {d} features but the tile head embeds {head.embed_dim}; fit it on this model's embeddings"
        raise ValueError(msg)
    conv = torch.nn.Conv2d(d, len(classes), 1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(probe.weight)[:, :, None, None])
        conv.bias.copy_(torch.from_numpy(probe.bias))
    head.classifier = conv.to(next(model.parameters()).device)
    colors = (
        tuple(colors) if colors else tuple(PALETTE[i % len(PALETTE)] for i in range(len(classes)))
    )
    model.card = model.card.replace(tissue_classes=tuple(classes), tissue_colors=colors)
    return model


# ----------------------------------------------------------------------------- CLI


def load_tile_folder(images: Path, labels_csv: Path | None = None) -> TileSet:
    """Tiles from ``images``: folder-per-class (``DIR/<class>/*.png``) or flat with a CSV.

    The CSV has columns ``image`` (path relative to ``images``) and ``label`` (class name).
    Groups come from the dihedral dHash, so flipped/rotated copies share a fold.
    """
    images = Path(images)
    if not images.is_dir():
        msg = f"--images {images} is not a folder"
        raise FileNotFoundError(msg)
    pairs: list[tuple[Path, str]] = []
    if labels_csv is not None:
        with open(labels_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
                msg = (
                    f"{labels_csv} needs the columns 'image' and 'label', found {reader.fieldnames}"
                )
                raise ValueError(msg)
            pairs = [(images / r["image"], r["label"]) for r in reader]
    else:
        for d in sorted(p for p in images.iterdir() if p.is_dir()):
            pairs += [
                (p, d.name) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
            ]
    if not pairs:
        msg = f"no labelled tiles found in {images}: use one sub-folder per class or pass --labels CSV"
        raise ValueError(msg)
    classes = tuple(sorted({lab for _, lab in pairs}))
    from PIL import Image

    arrs = []
    for p, _ in pairs:
        with Image.open(p) as im:
            arrs.append(np.asarray(im.convert("RGB")))
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        msg = f"tiles in {images} differ in size ({sorted(shapes)[:3]}...); resize them to one size first"
        raise ValueError(msg)
    stack = np.stack(arrs)
    labels = np.array([classes.index(lab) for _, lab in pairs])
    return TileSet(
        stack, labels, group_near_duplicates(stack), classes, tuple(str(p) for p, _ in pairs)
    )


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``histolens train tiles``."""
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder of tiles: one sub-folder per class, or flat with --labels",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV with columns image,label (image relative to --images)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="new weights file (.safetensors); its card is written beside it",
    )
    parser.add_argument(
        "--model", default="histolens-default", help="model whose backbone embeds the tiles"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights of that model (default: its embedded weights)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="um/px of the tiles; resampled to the model's mpp (default: used as is)",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="grouped cross-validation folds (0 = skip)"
    )
    parser.add_argument(
        "--l2", type=float, default=1e-2, help="L2 penalty of the logistic regression"
    )
    parser.add_argument("--threads", type=int, default=2)


def train_tiles(args: argparse.Namespace) -> int:
    """Fit a tile head on user tiles, print grouped CV, write weights + card."""
    import torch

    from histolens.models import create_model
    from histolens.models._model import save_model_weights

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tiles = load_tile_folder(args.images, args.labels)
    model = (
        create_model(args.model, weights=args.weights) if args.weights else create_model(args.model)
    )
    x = tile_embeddings(model, tiles.images, image_mpp=args.mpp)
    n_classes = len(tiles.classes)
    report: dict[str, Any] = {"classes": list(tiles.classes), "n": len(tiles.labels)}
    if args.folds and args.folds > 1:
        cv = cross_validate(x, tiles.labels, tiles.groups, n_classes, k=args.folds, l2=args.l2)
        report["grouped_cv"] = cv
        print(
            f"grouped {args.folds}-fold CV: accuracy {cv['accuracy_mean']:.3f} +- {cv['accuracy_std']:.3f}, "
            f"balanced {cv['balanced_accuracy_mean']:.3f} ({cv['groups']} groups, {cv['n']} tiles)"
        )
    probe = fit_logistic(x, tiles.labels, n_classes, l2=args.l2)
    install_linear_head(model, probe, tiles.classes)
    metrics = dict(model.card.metrics)
    if "grouped_cv" in report:
        metrics["tiles_grouped_cv_accuracy"] = report["grouped_cv"]["accuracy_mean"]
    card = save_model_weights(
        model,
        args.out,
        metrics=metrics,
        recipe=model.card.recipe
        + f" | tile head: logistic regression on tile embeddings of {args.images} "
        f"({len(tiles.labels)} tiles, classes {', '.join(tiles.classes)}), l2={args.l2}",
    )
    print(f"wrote {args.out} (sha256 {card.weights_sha256[:12]}...) and its card")
    print(json.dumps(report, indent=1))
    return 0
