"""Nuclei metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.training.metrics import aji, dice, match_instances, panoptic_quality, type_scores


def _square(shape=(12, 12), top=2, left=2, size=4, label=1, out=None):
    img = np.zeros(shape, np.int32) if out is None else out
    img[top : top + size, left : left + size] = label
    return img


def test_identical_labels_score_one_whatever_the_ids():
    rng = np.random.default_rng(0)
    true = np.zeros((40, 40), np.int32)
    for k in range(1, 6):
        _square(true.shape, int(rng.integers(0, 30)), 7 * k - 5, 5, k, out=true)
    pred = np.where(true > 0, true * 10 + 3, 0)  # same nuclei, other ids
    assert dice(true, pred) == 1.0
    assert aji(true, pred) == 1.0
    r = panoptic_quality(true, pred)
    assert (r.pq, r.tp, r.fp, r.fn) == (1.0, 5, 0, 0)


def test_shift_by_one_column():
    # 4x4 square vs the same square shifted right by 1: inter 12, union 20, IoU 0.6
    true = _square()
    pred = _square(left=3)
    assert dice(true, pred) == pytest.approx(24 / 32)
    assert aji(true, pred) == pytest.approx(12 / 20)
    r = panoptic_quality(true, pred)
    assert r.tp == 1 and r.sq == pytest.approx(0.6) and r.pq == pytest.approx(0.6)


def test_shift_by_two_columns_is_not_a_match():
    # inter 8, union 24: IoU 1/3 < 0.5 -> one FN and one FP, PQ 0, AJI 1/3
    true = _square()
    pred = _square(left=4)
    assert aji(true, pred) == pytest.approx(8 / 24)
    r = panoptic_quality(true, pred)
    assert (r.tp, r.fp, r.fn, r.pq) == (0, 1, 1, 0.0)


def test_false_positive_enters_aji_union_and_pq():
    true = _square()
    pred = _square(left=3)
    pred[10, 5:10] = 2  # 5 px spurious nucleus
    assert aji(true, pred) == pytest.approx(12 / (20 + 5))
    assert dice(true, pred) == pytest.approx(24 / 37)
    r = panoptic_quality(true, pred)
    assert r.pq == pytest.approx((1 / 1.5) * 0.6)


def test_merged_prediction():
    # Two touching true nuclei predicted as one: each has IoU exactly 0.5 with it.
    true = _square(left=2)
    _square(left=6, label=2, out=true)
    pred = (true > 0).astype(np.int32)
    assert aji(true, pred) == pytest.approx(32 / 64)
    r = panoptic_quality(true, pred)
    assert (r.tp, r.fp, r.fn) == (0, 1, 2)
    assert dice(true, pred) == 1.0


def test_empty_images():
    z = np.zeros((5, 5), np.int32)
    assert dice(z, z) == 1.0 and aji(z, z) == 1.0 and panoptic_quality(z, z).pq == 1.0
    one = _square((5, 5), 0, 0, 2)
    assert aji(one, z) == 0.0 and aji(z, one) == 0.0
    assert panoptic_quality(one, z).fn == 1


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_match_instances_returns_pairs():
    true = _square()
    _square(top=7, left=7, label=5, out=true)
    pred = _square(left=3, label=9)
    t, p, iou = match_instances(true, pred)
    assert t.tolist() == [1] and p.tolist() == [9] and iou[0] == pytest.approx(0.6)


def test_type_scores_by_hand():
    t = np.array([0, 0, 1, 1, 2, -1])
    p = np.array([0, 1, 1, 1, 0, 2])
    s = type_scores(t, p, 3)
    assert s["n"] == 5 and s["accuracy"] == pytest.approx(3 / 5)
    assert s["type0"]["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert s["type1"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert s["type2"]["f1"] == 0.0
