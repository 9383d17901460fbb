"""Step 5 metrics: how good is a soft map, and how good is a binary mask?

* A **soft map** (attention, saliency) is judged by AUC-ROC: the probability that a random
  foreground pixel scores higher than a random background pixel (ties count one half).  It
  needs no threshold.  The paper reports 97.1 for the raw attention maps on CUB.
* A **binary mask** is judged by its confusion counts against the ground truth:
  accuracy, foreground IoU, mIoU (mean of foreground and background IoU) and Dice.

Pooling: the paper sums the confusion counts over *all pixels of all test images* and
computes the ratios once (:func:`segmentation_metrics`).  That is not the mean of per-image
IoUs (:func:`per_image_iou`): large objects weigh more in the pooled number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "auc_roc",
    "Confusion",
    "segmentation_metrics",
    "per_image_iou",
    "mean_auc",
    "separation_auc",
]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def _as_binary(a, name: str) -> np.ndarray:
    """bool array from a bool array or a numeric array holding only 0 and 1."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name}: expected a binary mask (bool or 0/1), got values other than 0/1; "
                         "threshold it first")
    return a.astype(bool)


def auc_roc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (any equal shapes).

    Ties are counted one half, exactly as ``sklearn.metrics.roc_auc_score``.  Returns nan
    when all labels belong to one class (the AUC is undefined then).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _as_binary(labels, "auc_roc labels")
    if s.shape != y.shape:
        raise ValueError(f"auc_roc: scores shape {s.shape} != labels shape {y.shape}")
    s, y = s.ravel(), y.ravel()
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


@dataclass
class Confusion:
    """Pixel confusion counts, accumulated (pooled) over any number of images.

    >>> c = Confusion(); c.update(pred, gt); c.update(pred2, gt2); c.iou
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, pred, gt) -> "Confusion":
        """Add the counts of one (pred, gt) pair of equal-shaped binary masks; returns self."""
        p = _as_binary(pred, "Confusion.update pred")
        g = _as_binary(gt, "Confusion.update gt")
        if p.shape != g.shape:
            raise ValueError(f"Confusion.update: pred shape {p.shape} != gt shape {g.shape}")
        tp = int(np.count_nonzero(p & g))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(g)) - tp
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += int(p.size) - tp - fp - fn
        return self

    def __add__(self, other: "Confusion") -> "Confusion":
        if not isinstance(other, Confusion):
            return NotImplemented
        return Confusion(self.tp + other.tp, self.fp + other.fp,
                         self.fn + other.fn, self.tn + other.tn)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def acc(self) -> float:
        """Pixel accuracy (tp + tn) / all."""
        return _ratio(self.tp + self.tn, self.n)

    @property
    def iou(self) -> float:
        """Foreground IoU tp / (tp + fp + fn)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def bg_iou(self) -> float:
        """Background IoU tn / (tn + fn + fp): the same with the classes swapped."""
        return _ratio(self.tn, self.tn + self.fn + self.fp)

    @property
    def miou(self) -> float:
        """Mean of foreground and background IoU (nan if either is nan)."""
        return (self.iou + self.bg_iou) / 2

    @property
    def dice(self) -> float:
        """Dice / F1: 2 tp / (2 tp + fp + fn)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def as_dict(self, ndigits: int | None = None) -> dict:
        """{"acc", "iou", "miou", "dice"}, rounded to ``ndigits`` if given."""
        d = {"acc": self.acc, "iou": self.iou, "miou": self.miou, "dice": self.dice}
        if ndigits is not None:
            d = {k: round(v, ndigits) for k, v in d.items()}
        return d


def _pairs(preds, gts, name: str):
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"{name}: {len(preds)} predictions but {len(gts)} ground truths")
    return zip(preds, gts)


def segmentation_metrics(preds, gts) -> dict:
    """Pooled acc / IoU / mIoU / Dice over lists of (pred, gt) masks (the paper's protocol).

    The images may have different sizes; each pred must match its gt.
    """
    c = Confusion()
    for p, g in _pairs(preds, gts, "segmentation_metrics"):
        c.update(p, g)
    return c.as_dict()


def per_image_iou(preds, gts) -> np.ndarray:
    """Foreground IoU of each image separately (nan where pred and gt are both empty)."""
    return np.array([Confusion().update(p, g).iou
                     for p, g in _pairs(preds, gts, "per_image_iou")], dtype=np.float64)


def mean_auc(maps, gts) -> tuple[float, int, int]:
    """Mean over images of the per-image AUC-ROC of a soft map against its binary gt.

    Images whose gt is all foreground or all background have no AUC; they are skipped and
    counted.  Returns ``(mean, n_used, n_skipped)``; mean is nan when no image is usable.
    """
    aucs = [auc_roc(m, g) for m, g in _pairs(maps, gts, "mean_auc")]
    used = [a for a in aucs if not np.isnan(a)]
    mean = float(np.mean(used)) if used else float("nan")
    return mean, len(used), len(aucs) - len(used)


def separation_auc(score_map, pos_mask, neg_mask) -> float:
    """AUC of ``score_map`` separating ``pos_mask`` pixels from ``neg_mask`` pixels only.

    Pixels in neither mask are ignored, e.g. "does attention prefer the bird over the
    distractor object?" without the plain background.  The masks must not overlap.
    """
    s = np.asarray(score_map, dtype=np.float64)
    pos = _as_binary(pos_mask, "separation_auc pos_mask")
    neg = _as_binary(neg_mask, "separation_auc neg_mask")
    if not (s.shape == pos.shape == neg.shape):
        raise ValueError(f"separation_auc: score shape {s.shape}, pos shape {pos.shape}, "
                         f"neg shape {neg.shape} must be equal")
    if np.any(pos & neg):
        raise ValueError("separation_auc: pos_mask and neg_mask overlap")
    keep = pos | neg
    return auc_roc(s[keep], pos[keep])
