"""Metrics: the RSNA weighted log loss, ROC AUC, sensitivity/specificity and thresholds.

All functions take numpy arrays with labels in :data:`~triage_node.domain.LABELS` order
(``any`` first) and are pure: no torch, no I/O.

The RSNA 2019 metric (Kaggle "weighted multi-label logarithmic loss"): every (image, label)
row has the binary log loss ``-(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to
``[1e-15, 1 - 1e-15]``; rows are weighted 2 for ``any`` and 1 for each subtype, and the
score is the weighted mean over all rows, ``sum(w * l) / sum(w)``. Since every image has
all six rows this equals the mean over images of ``sum_j w_j l_ij / 7``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from triage_node.domain import LABELS

__all__ = [
    "EPS",
    "LABEL_WEIGHTS",
    "Confusion",
    "confusion",
    "log_loss",
    "roc_auc",
    "roc_curve",
    "threshold_for_sensitivity",
    "weighted_log_loss",
]

#: Weight of each label in the RSNA metric, LABELS order: 2 for ``any``, 1 for subtypes.
LABEL_WEIGHTS: tuple[float, ...] = tuple(2.0 if label == "any" else 1.0 for label in LABELS)
#: Probability clipping of the metric (as in scikit-learn's and Kaggle's log loss).
EPS = 1e-15

FloatArray = NDArray[np.float64]


def _pair(y_true: ArrayLike, y_prob: ArrayLike, name: str = "y_prob") -> tuple[FloatArray, ...]:
    """Validate and convert labels and probabilities to float64 arrays of one shape."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true has shape {y.shape} but {name} has shape {p.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError(f"{name} must hold probabilities in [0, 1]")
    return y, p


def _row_losses(y: FloatArray, p: FloatArray) -> FloatArray:
    q = np.clip(p, EPS, 1.0 - EPS)
    out: FloatArray = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
    return out


def log_loss(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean binary log loss of one label (probabilities clipped to ``[EPS, 1 - EPS]``).

    Parameters
    ----------
    y_true : array_like
        0/1 labels, shape ``(N,)``.
    y_prob : array_like
        Probabilities, shape ``(N,)``.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If shapes differ, the arrays are empty, labels are not 0/1 or probabilities are
        outside [0, 1].
    """
    y, p = _pair(y_true, y_prob)
    return float(_row_losses(y, p).mean())


def weighted_log_loss(
    y_true: ArrayLike, y_prob: ArrayLike, weights: Sequence[float] = LABEL_WEIGHTS
) -> float:
    """The RSNA weighted multi-label log loss, exactly as Kaggle scored it.

    Parameters
    ----------
    y_true : array_like
        0/1 labels, shape ``(N, 6)`` in LABELS order.
    y_prob : array_like
        Probabilities, same shape.
    weights : sequence of float, optional
        Per-label weights; default 2 for ``any``, 1 for each subtype.

    Returns
    -------
    float
        ``sum_ij w_j l_ij / sum_ij w_j``.

    Raises
    ------
    ValueError
        If the arrays are not 2-D with one column per weight, or as for :func:`log_loss`.
    """
    y, p = _pair(y_true, y_prob)
    w = np.asarray(weights, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != w.shape[0]:
        raise ValueError(f"y_true must have shape (N, {w.shape[0]}), got {y.shape}")
    losses = _row_losses(y, p) * w[None, :]
    return float(losses.sum() / (w.sum() * y.shape[0]))


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC curve: false positive rates, true positive rates and the thresholds.

    Points are at each distinct score (descending), starting at (0, 0) with threshold
    ``inf``; a slice is called positive when ``score >= threshold``.

    Returns
    -------
    (fpr, tpr, thresholds) : tuple of numpy.ndarray
        NaN rates for a class that is absent.
    """
    y, s = _pair(y_true, y_score, "y_score")
    y, s = y.ravel(), s.ravel()
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (1 + distinct) - tps
    n_pos, n_neg = y.sum(), y.size - y.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(distinct.size + 1, np.nan)
        fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(distinct.size + 1, np.nan)
    thresholds = np.r_[np.inf, s_sorted[distinct]]
    return fpr, tpr, thresholds


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is absent.

    Computed as the Mann-Whitney U statistic from average ranks.

    Parameters
    ----------
    y_true : array_like
        0/1 labels, shape ``(N,)``.
    y_score : array_like
        Scores in [0, 1], shape ``(N,)``.

    Returns
    -------
    float
    """
    y, s = _pair(y_true, y_score, "y_score")
    y, s = y.ravel(), s.ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # 1-based ranks, ties sharing their average rank.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True, slots=True)
class Confusion:
    """Confusion counts at a threshold (positive when ``p >= threshold``)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        """``tp / (tp + fn)``; NaN without positives."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def specificity(self) -> float:
        """``tn / (tn + fp)``; NaN without negatives."""
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else math.nan


def confusion(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> Confusion:
    """Confusion counts of one label at ``threshold`` (``p >= threshold`` is positive).

    Raises
    ------
    ValueError
        If ``threshold`` is not a finite number, or as for :func:`log_loss`.
    """
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    y, p = _pair(y_true, y_prob)
    called = p >= threshold
    pos = y == 1
    return Confusion(
        tp=int((called & pos).sum()),
        fp=int((called & ~pos).sum()),
        tn=int((~called & ~pos).sum()),
        fn=int((~called & pos).sum()),
    )


def threshold_for_sensitivity(
    y_true: ArrayLike, y_prob: ArrayLike, target: float
) -> tuple[float, Confusion]:
    """The highest threshold whose sensitivity is at least ``target``.

    With the positives' probabilities sorted descending, the threshold is the
    ``ceil(target * n_pos)``-th of them, so at least that many positives are called; the
    highest such threshold gives the best specificity for that sensitivity.

    Parameters
    ----------
    y_true : array_like
        0/1 labels, shape ``(N,)``.
    y_prob : array_like
        Probabilities, shape ``(N,)``.
    target : float
        Wanted sensitivity, in (0, 1].

    Returns
    -------
    (threshold, confusion) : tuple of float and Confusion
        The threshold and the counts it gives on these data.

    Raises
    ------
    ValueError
        If ``target`` is out of range or there is no positive.
    """
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target!r}")
    y, p = _pair(y_true, y_prob)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("cannot choose a threshold for a sensitivity without positive cases")
    k = max(1, math.ceil(target * positives.size - 1e-9))
    threshold = float(positives[k - 1])
    return threshold, confusion(y, p, threshold)
