"""Nuclei segmentation metrics on instance-label images (numpy only).

All functions take two integer label images of the same shape, ground truth first
(0 = background, any positive ids, not necessarily consecutive).

- :func:`dice`: pixel Dice of the foregrounds.
- :func:`aji`: Aggregated Jaccard Index (Kumar et al. 2017): each true nucleus is paired with
  the prediction of highest IoU; intersections over unions summed, unused predictions added to
  the union.
- :func:`panoptic_quality`: PQ = DQ x SQ with unique matching at IoU > 0.5 (Kirillov et al.).
- :func:`type_scores`: instance-level type accuracy and per-type F1 over PQ-matched nuclei.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PQResult",
    "aji",
    "dice",
    "match_instances",
    "panoptic_quality",
    "type_scores",
]


def _check(true: np.ndarray, pred: np.ndarray) -> None:
    if true.shape != pred.shape:
        msg = f"label images differ in shape: truth {true.shape} vs prediction {pred.shape}"
        raise ValueError(msg)


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Pixel Dice of ``true > 0`` and ``pred > 0``; 1.0 when both are empty."""
    _check(true, pred)
    a, b = np.asarray(true) > 0, np.asarray(pred) > 0
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def overlap_table(
    true: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel overlaps of every (true, pred) pair.

    Returns ``(true_ids, pred_ids, inter, true_area, pred_area)``: ``inter[i, j]`` is the number
    of pixels of true nucleus ``true_ids[i]`` inside predicted nucleus ``pred_ids[j]``.
    """
    _check(true, pred)
    t = np.asarray(true).ravel()
    p = np.asarray(pred).ravel()
    t_ids, t_inv = np.unique(t, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    joint = np.bincount(t_inv * len(p_ids) + p_inv, minlength=len(t_ids) * len(p_ids))
    joint = joint.reshape(len(t_ids), len(p_ids))
    t_area = joint.sum(1)
    p_area = joint.sum(0)
    # Drop the background row/column (id 0 sorts first when present).
    ti = t_ids > 0
    pi = p_ids > 0
    return t_ids[ti], p_ids[pi], joint[np.ix_(ti, pi)], t_area[ti], p_area[pi]


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index in [0, 1]; 1.0 when both images have no nuclei."""
    _, _, inter, t_area, p_area = overlap_table(true, pred)
    if len(t_area) == 0:
        return 1.0 if len(p_area) == 0 else 0.0
    if len(p_area) == 0:
        return 0.0
    union = t_area[:, None] + p_area[None, :] - inter
    iou = inter / union
    best = iou.argmax(1)
    rows = np.arange(len(t_area))
    has = inter[rows, best] > 0
    c = int(inter[rows, best][has].sum())
    # A true nucleus with no overlapping prediction adds its whole area to the union.
    u = int(union[rows, best][has].sum()) + int(t_area[~has].sum())
    used = np.zeros(len(p_area), bool)
    used[best[has]] = True
    u += int(p_area[~used].sum())
    return c / u


def match_instances(
    true: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique matches with IoU > ``iou_threshold`` (>= 0.5 makes them unique by construction).

    Returns ``(true_ids, pred_ids, iou)`` of the matched pairs.
    """
    t_ids, p_ids, inter, t_area, p_area = overlap_table(true, pred)
    if len(t_ids) == 0 or len(p_ids) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    iou = inter / (t_area[:, None] + p_area[None, :] - inter)
    if iou_threshold < 0.5:
        msg = f"iou_threshold={iou_threshold} < 0.5 does not give unique matches; use >= 0.5"
        raise ValueError(msg)
    ti, pj = np.nonzero(iou > iou_threshold)
    return t_ids[ti], p_ids[pj], iou[ti, pj]


@dataclass(frozen=True)
class PQResult:
    """Panoptic quality and its parts; ``tp``/``fp``/``fn`` are nucleus counts."""

    pq: float
    dq: float
    sq: float
    tp: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        """Detection F1 at IoU > 0.5 (equals DQ)."""
        return self.dq


def panoptic_quality(true: np.ndarray, pred: np.ndarray) -> PQResult:
    """PQ with unique IoU > 0.5 matching; 1.0 when both images have no nuclei."""
    n_true = len(np.unique(true[true > 0]))
    n_pred = len(np.unique(pred[pred > 0]))
    _, _, iou = match_instances(true, pred)
    tp = len(iou)
    fp, fn = n_pred - tp, n_true - tp
    if tp + fp + fn == 0:
        return PQResult(1.0, 1.0, 1.0, 0, 0, 0)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou.mean()) if tp else 0.0
    return PQResult(dq * sq, dq, sq, tp, fp, fn)


def type_scores(true_types: np.ndarray, pred_types: np.ndarray, n_types: int) -> dict[str, object]:
    """Accuracy and per-type precision/recall/F1 of paired instance types (0-based indices).

    ``true_types[i]`` and ``pred_types[i]`` belong to the same matched nucleus; pairs whose
    true type is negative (unknown) are ignored.
    """
    t = np.asarray(true_types, int)
    p = np.asarray(pred_types, int)
    keep = t >= 0
    t, p = t[keep], p[keep]
    out: dict[str, object] = {
        "n": len(t),
        "accuracy": float((t == p).mean()) if len(t) else float("nan"),
    }
    f1s = []
    for k in range(n_types):
        tp = int(((t == k) & (p == k)).sum())
        fp = int(((t != k) & (p == k)).sum())
        fn = int(((t == k) & (p != k)).sum())
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        out[f"type{k}"] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": int((t == k).sum()),
        }
        f1s.append(f1)
    out["macro_f1"] = float(np.nanmean(f1s)) if any(np.isfinite(f1s)) else float("nan")
    return out
