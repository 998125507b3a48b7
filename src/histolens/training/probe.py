"""``histolens train tiles``: a tile-class head fitted on the user's own labelled tiles.

Users train their own classes with ``histolens train tiles --images DIR [--labels CSV] --out
NEW.safetensors``: the model's tile embeddings of the tiles (:func:`tile_embeddings`), a
logistic regression on them with grouped CV, installed as the model's tile head
(:mod:`histolens.models.probe`), written as new weights and card.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainTilesConfig
from .datasets import TileSet, group_near_duplicates, resample_image

__all__ = ["tile_embeddings", "train_tiles"]

log = logging.getLogger("histolens.train")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


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


def train_tiles(cfg: TrainTilesConfig) -> int:
    """Fit a tile head on user tiles, print grouped CV, write weights + card."""
    import torch

    from histolens.models import create_model
    from histolens.models._model import save_model_weights
    from histolens.models.probe import cross_validate, fit_logistic, install_linear_head

    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tiles = load_tile_folder(cfg.images, cfg.labels)
    model = create_model(cfg.model, weights=cfg.weights) if cfg.weights else create_model(cfg.model)
    x = tile_embeddings(model, tiles.images, image_mpp=cfg.mpp)
    n_classes = len(tiles.classes)
    report: dict[str, Any] = {"classes": list(tiles.classes), "n": len(tiles.labels)}
    if cfg.folds:
        cv = cross_validate(x, tiles.labels, tiles.groups, n_classes, k=cfg.folds, l2=cfg.l2)
        report["grouped_cv"] = cv
        print(
            f"grouped {cfg.folds}-fold CV: accuracy {cv['accuracy_mean']:.3f} +- {cv['accuracy_std']:.3f}, "
            f"balanced {cv['balanced_accuracy_mean']:.3f} ({cv['groups']} groups, {cv['n']} tiles)"
        )
    probe = fit_logistic(x, tiles.labels, n_classes, l2=cfg.l2)
    install_linear_head(model, probe, tiles.classes)
    metrics = dict(model.card.metrics)
    if "grouped_cv" in report:
        metrics["tiles_grouped_cv_accuracy"] = report["grouped_cv"]["accuracy_mean"]
    card = save_model_weights(
        model,
        cfg.out,
        metrics=metrics,
        recipe=model.card.recipe
        + f" | tile head: logistic regression on tile embeddings of {cfg.images} "
        f"({len(tiles.labels)} tiles, classes {', '.join(tiles.classes)}), l2={cfg.l2}",
    )
    print(f"wrote {cfg.out} (sha256 {card.weights_sha256[:12]}...) and its card")
    print(json.dumps(report, indent=1))
    return 0
