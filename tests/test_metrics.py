"""Metrics on hand-computed examples."""
import math

import numpy as np
import pytest

from fgbg.metrics import (
    Confusion,
    auc_roc,
    mean_auc,
    per_image_iou,
    segmentation_metrics,
    separation_auc,
)

# tp=2, fp=1, fn=0, tn=1
PRED_A = np.array([[1, 1], [1, 0]], bool)
GT_A = np.array([[1, 0], [1, 0]], bool)
# tp=0, fp=1, fn=1, tn=2
PRED_B = np.array([[1, 0], [0, 0]], bool)
GT_B = np.array([[0, 0], [0, 1]], bool)


def test_confusion_2x2():
    c = Confusion().update(PRED_A, GT_A)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 0, 1)
    assert c.acc == pytest.approx(3 / 4)
    assert c.iou == pytest.approx(2 / 3)
    assert c.bg_iou == pytest.approx(1 / 2)
    assert c.miou == pytest.approx(7 / 12)
    assert c.dice == pytest.approx(4 / 5)
    assert c.as_dict(3) == {"acc": 0.75, "iou": 0.667, "miou": 0.583, "dice": 0.8}


def test_pooled_differs_from_mean_per_image():
    np.testing.assert_allclose(per_image_iou([PRED_A, PRED_B], [GT_A, GT_B]), [2 / 3, 0.0])
    # pooled: tp=2, fp=2, fn=1, tn=3
    m = segmentation_metrics([PRED_A, PRED_B], [GT_A, GT_B])
    assert m["iou"] == pytest.approx(2 / 5)            # mean of per-image IoU would be 1/3
    assert m["acc"] == pytest.approx(5 / 8)
    assert m["miou"] == pytest.approx((2 / 5 + 3 / 6) / 2)
    assert m["dice"] == pytest.approx(4 / 7)
    c = Confusion().update(PRED_A, GT_A) + Confusion().update(PRED_B, GT_B)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 2, 1, 3)


def test_confusion_nan_and_errors():
    c = Confusion()
    assert math.isnan(c.acc) and math.isnan(c.iou) and math.isnan(c.dice)
    c.update(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert math.isnan(c.iou) and c.bg_iou == 1.0 and c.acc == 1.0 and math.isnan(c.miou)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        Confusion().update(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    with pytest.raises(ValueError):
        Confusion().update(np.full((2, 2), 0.7), np.zeros((2, 2), bool))   # not binary
    with pytest.raises(ValueError):
        segmentation_metrics([PRED_A], [GT_A, GT_B])


def test_auc_roc():
    y = np.array([0, 0, 1, 1])
    assert auc_roc([0.1, 0.2, 0.3, 0.4], y) == 1.0
    assert auc_roc([0.4, 0.3, 0.2, 0.1], y) == 0.0
    assert auc_roc([0.5, 0.5, 0.5, 0.5], y) == 0.5
    assert auc_roc([0.1, 0.4, 0.35, 0.8], y) == pytest.approx(0.75)
    # one tied pos/neg pair counts 1/2: (0.5 + 1) / 2
    assert auc_roc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(auc_roc([0.1, 0.2], [1, 1]))
    assert auc_roc(np.array([[0.9, 0.1], [0.2, 0.8]]), np.eye(2, dtype=bool)) == 1.0


def test_mean_auc_skips_one_class_images():
    maps = [np.array([0.1, 0.9]), np.array([0.5, 0.5]), np.array([0.3, 0.7])]
    gts = [np.array([0, 1]), np.array([1, 0]), np.array([0, 0])]
    mean, used, skipped = mean_auc(maps, gts)
    assert (mean, used, skipped) == (pytest.approx(0.75), 2, 1)


def test_separation_auc_ignores_other_pixels():
    score = np.array([[0.9, 0.8, 0.0], [0.2, 0.1, 1.0]])
    pos = np.array([[1, 1, 0], [0, 0, 0]], bool)
    neg = np.array([[0, 0, 0], [1, 1, 0]], bool)
    assert separation_auc(score, pos, neg) == 1.0       # the 0.0 and 1.0 pixels would spoil it
    assert auc_roc(score, pos) < 1.0
    with pytest.raises(ValueError):
        separation_auc(score, pos, pos)
