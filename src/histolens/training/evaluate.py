"""``histolens evaluate nuclei``: score nuclei instances against ground truth (Dice, AJI, PQ).

Predictions come from ``--pred DIR`` (``<stem>.tif`` label images, as written by
``histolens nuclei``), from the model (default), or from the classical baseline
(``--baseline``: haematoxylin channel, Otsu threshold, distance-transform watershed), so the
model and the baseline are scored by the same code on the same tiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import EvaluateConfig
from .metrics import aji, dice, match_instances, panoptic_quality, type_scores

__all__ = [
    "classical_nuclei",
    "error_decomposition",
    "evaluate_images",
    "evaluate_nuclei",
    "evaluate_types",
    "find_pairs",
    "read_aperio_xml",
    "score_pair",
]

#: Instance label images, or Aperio ImageScope XML outlines (how MoNuSeg ships its labels).
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".xml")


def classical_nuclei(
    image: np.ndarray, *, mpp: float, min_area_um2: float = 8.0, peak_distance_um: float = 2.5
) -> np.ndarray:
    """The classical baseline: uint32 nuclei instances of an RGB image at ``mpp`` um/px.

    Haematoxylin optical density (``rgb2hed``), lightly smoothed; Otsu threshold; holes filled
    and objects under ``min_area_um2`` removed; touching nuclei split by a watershed of the
    distance transform from its peaks at least ``peak_distance_um`` apart.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    h = rgb2hed(image)[..., 0]
    h = gaussian(h, sigma=max(0.5, 0.5 / mpp * 0.25))
    fg = h > threshold_otsu(h)
    fg = ndi.binary_fill_holes(fg)
    min_px = max(1, round(min_area_um2 / (mpp * mpp)))
    fg = remove_small_objects(fg, max_size=min_px - 1) if min_px > 1 else fg
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(
        dist,
        min_distance=max(1, round(peak_distance_um / mpp)),
        labels=ndi.label(fg)[0],
        exclude_border=False,
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    return labels.astype(np.uint32)


def score_pair(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice, AJI, PQ (with DQ, SQ and counts) of one image."""
    pq = panoptic_quality(true, pred)
    return {
        "dice": dice(true, pred),
        "aji": aji(true, pred),
        "pq": pq.pq,
        "dq": pq.dq,
        "sq": pq.sq,
        "n_true": pq.tp + pq.fn,
        "n_pred": pq.tp + pq.fp,
    }


def error_decomposition(
    true: np.ndarray, nuclei_prob: np.ndarray, hv: np.ndarray, *, mpp: float
) -> dict[str, dict[str, float]]:
    """Where a model's instance score is lost: its maps scored with parts swapped for the truth.

    All on the model grid at ``mpp`` um/px (``true`` instances, ``nuclei_prob`` (H, W), ``hv``
    (2, H, W)). Returns :func:`score_pair` figures for

    - ``"model"``: the shipped post-processing on the model's maps;
    - ``"true_foreground"``: the same post-processing with the true nucleus mask as
      probability (the model's HV maps still place the cuts): what a perfect foreground gains;
    - ``"true_markers"``: the model's foreground split by a watershed of its distance transform
      from one marker per true nucleus centre inside it: what perfect separation gains;
    - ``"true_both"``: true foreground and true markers, the ceiling of that watershed.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from histolens.models.postprocess import hover_instances

    true = np.asarray(true).astype(np.int64)
    prob = np.asarray(nuclei_prob, np.float32)

    def centre_markers(mask: np.ndarray) -> np.ndarray:
        ids = np.arange(1, int(true.max()) + 1)
        markers = np.zeros(true.shape, np.int32)
        if len(ids) == 0:
            return markers
        cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(true), true, ids)).T
        ok = np.isfinite(cy)
        y, x = np.rint(cy[ok]).astype(int), np.rint(cx[ok]).astype(int)
        inside = mask[y, x]
        markers[y[inside], x[inside]] = ids[ok][inside]
        return markers

    def split(mask: np.ndarray) -> np.ndarray:
        dist = ndi.distance_transform_edt(mask)
        return watershed(-dist, centre_markers(mask), mask=mask).astype(np.int64)

    fg_pred, fg_true = prob >= 0.5, true > 0
    return {
        "model": score_pair(true, hover_instances(prob, hv, mpp=mpp)[0].astype(np.int64)),
        "true_foreground": score_pair(
            true, hover_instances(fg_true.astype(np.float32), hv, mpp=mpp)[0].astype(np.int64)
        ),
        "true_markers": score_pair(true, split(fg_pred)),
        "true_both": score_pair(true, split(fg_true)),
    }


def find_pairs(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    """(image, label) paths matched by file stem; errors name unmatched files."""
    images, labels = Path(images), Path(labels)
    for p, what in ((images, "--images"), (labels, "--labels")):
        if not p.is_dir():
            msg = f"{what} {p} is not a folder"
            raise FileNotFoundError(msg)
    # A label image wins over an XML of the same stem (XML first, then overwritten).
    found = sorted(labels.iterdir(), key=lambda p: (p.suffix.lower() != ".xml", p.name))
    lab = {p.stem: p for p in found if p.suffix.lower() in LABEL_SUFFIXES}
    pairs = []
    missing = []
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in (".tif", ".tiff", ".png", ".jpg", ".jpeg"):
            continue
        if p.stem in lab:
            pairs.append((p, lab[p.stem]))
        else:
            missing.append(p.name)
    if not pairs:
        msg = f"no image in {images} has a label file of the same stem in {labels}"
        raise ValueError(msg)
    if missing:
        print(f"warning: no labels for {len(missing)} images (skipped): {', '.join(missing[:5])}")
    return pairs


def read_aperio_xml(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """uint32 instances ``shape`` (h, w) from an Aperio ImageScope XML of nucleus outlines.

    Each ``Region``'s ``Vertex`` list (``X``, ``Y`` in pixels of the image, x to the right) is
    one nucleus, numbered 1..N in file order; a pixel belongs to a polygon when its centre lies
    inside, and where outlines overlap the earlier nucleus keeps the pixel (as the MoNuSeg
    organisers' rasteriser does).
    """
    import xml.etree.ElementTree as ET

    from skimage.draw import polygon

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        msg = f"{path}: not a readable XML file ({exc}); pass Aperio ImageScope XML (MoNuSeg's Annotations) or a label image"
        raise ValueError(msg) from exc
    out = np.zeros(shape, np.uint32)
    n = 0
    for region in root.iter("Region"):
        try:
            xy = np.array(
                [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
            )
        except (KeyError, ValueError) as exc:
            msg = f"{path}: Region {region.attrib.get('Id', '?')} has a Vertex without numeric X and Y ({exc})"
            raise ValueError(msg) from exc
        if len(xy) < 3:
            continue
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape=shape)
        free = out[rr, cc] == 0
        n += 1
        out[rr[free], cc[free]] = n
    if n == 0:
        msg = f"{path}: no Region with 3 or more Vertex elements; is it an Aperio ImageScope XML of outlines?"
        raise ValueError(msg)
    return out


def _read_labels(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An instance label image, or outlines rasterised to ``shape`` (required for ``.xml``)."""
    if path.suffix.lower() == ".xml":
        if shape is None:
            msg = f"{path}: XML outlines need the image's shape to be rasterised"
            raise ValueError(msg)
        return read_aperio_xml(path, shape)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def evaluate_images(
    pairs: Sequence[tuple[Path, Path]],
    predict: Callable[[np.ndarray, str], np.ndarray] | None = None,
    *,
    pred_dir: Path | None = None,
) -> pd.DataFrame:
    """Per-image scores; predictions from ``predict(image, stem)`` or ``pred_dir/<stem>.tif``."""
    from histolens.nuclei import read_rgb

    rows = []
    for img_path, lab_path in pairs:
        xml = lab_path.suffix.lower() == ".xml"
        image = read_rgb(img_path) if predict is not None or xml else None
        shape = None if image is None else image.shape[:2]
        true = _read_labels(lab_path, shape).astype(np.int64)
        if pred_dir is not None:
            pred_path = Path(pred_dir) / f"{img_path.stem}.tif"
            if not pred_path.is_file():
                msg = f"prediction {pred_path} is missing; run `histolens nuclei ... --out {pred_dir}` first"
                raise FileNotFoundError(msg)
            pred = _read_labels(pred_path)
        else:
            assert predict is not None
            pred = predict(image, img_path.stem)
        rows.append({"image": img_path.stem, **score_pair(true, np.asarray(pred).astype(np.int64))})
    return pd.DataFrame(rows)


def evaluate_types(
    samples: Sequence[Any],
    predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    n_types: int,
) -> dict[str, Any]:
    """Instance-type scores over nuclei matched at IoU > 0.5, pooled over ``samples``.

    ``samples`` are :class:`~histolens.training.datasets.NucleiSample` with instances and
    types; ``predict(image)`` returns (labels, type index per label ``1..N``). Also gives the
    samples' mean PQ.
    """
    t_all, p_all, pqs = [], [], []
    for s in samples:
        labels, types = predict(s.image)
        t_ids, p_ids, _ = match_instances(s.instances, labels)
        # True type of an instance: its majority type-map value (all its pixels share it).
        for ti, pi in zip(t_ids, p_ids, strict=True):
            tv = s.types[s.instances == ti]
            tv = tv[tv > 0]
            t_all.append(int(np.bincount(tv).argmax()) - 1 if len(tv) else -1)
            p_all.append(int(types[pi - 1]))
        pqs.append(panoptic_quality(s.instances, labels).pq)
    out = type_scores(np.array(t_all, int), np.array(p_all, int), n_types)
    out["pq_mean"] = float(np.mean(pqs)) if pqs else float("nan")
    out["images"] = len(samples)
    return out


def _summarise(df: pd.DataFrame) -> str:
    cols = ["dice", "aji", "pq", "dq", "sq"]
    lines = [df.to_string(index=False, float_format=lambda v: f"{v:.4f}")]
    lines.append("mean  " + "  ".join(f"{c} {df[c].mean():.4f}" for c in cols))
    return "\n".join(lines)


def evaluate_nuclei(cfg: EvaluateConfig) -> int:
    """``histolens evaluate nuclei``: score and print per-image and mean Dice, AJI, PQ."""
    pairs = find_pairs(cfg.images, cfg.labels)
    if cfg.only:
        wanted = set(cfg.only)
        pairs = [p for p in pairs if p[0].stem in wanted or p[0].stem[:12] in wanted]
        if not pairs:
            msg = f"--only {','.join(cfg.only)} matches none of the images in {cfg.images}"
            raise ValueError(msg)
    if cfg.pred is not None:
        df = evaluate_images(pairs, pred_dir=cfg.pred)
        what = f"predictions in {cfg.pred}"
    elif cfg.baseline:
        df = evaluate_images(pairs, lambda img, _: classical_nuclei(img, mpp=cfg.mpp))
        what = "classical baseline (rgb2hed + Otsu + distance watershed)"
    else:
        df, what = _evaluate_model(pairs, cfg)
    print(f"# {what} on {len(df)} images at {cfg.mpp} um/px")
    print(_summarise(df))
    if cfg.json:
        means = {c: float(df[c].mean()) for c in ("dice", "aji", "pq", "dq", "sq")}
        cfg.json.write_text(
            json.dumps(
                {"source": what, "per_image": df.to_dict("records"), "mean": means}, indent=1
            )
        )
    return 0


def _evaluate_model(
    pairs: Sequence[tuple[Path, Path]], cfg: EvaluateConfig
) -> tuple[pd.DataFrame, str]:
    """Scores of the model's nuclei (``histolens nuclei``'s path) and what was scored."""
    import torch

    from histolens.models import create_model
    from histolens.nuclei import segment_nuclei

    torch.set_num_threads(cfg.threads)
    model = create_model(cfg.model, weights=cfg.weights)
    df = evaluate_images(
        pairs,
        lambda img, stem: segment_nuclei(img, mpp=cfg.mpp, model=model, name=stem, tta=cfg.tta)[0],
    )
    return df, f"model {model.card.name}" + (" with TTA" if cfg.tta else "")
