"""The RSNA 2024 Lumbar Spine competition metric, and diagnostics around it (pure numpy).

Score = mean of four parts: for each condition group (spinal, foraminal, subarticular) a log loss
weighted by the true grade (Normal/Mild 1, Moderate 2, Severe 4) and normalised by the sum of weights,
plus an "any severe spinal" binary log loss per study. Rows labelled -1 are not scored; a part with no
scored rows is NaN and left out of the mean. This follows the Kaggle host's implementation.

Arrays: ``probs`` float (n_studies, 25, 3) and ``targets`` int (n_studies, 25), both in LABELS order,
classes in Severity order, -1 in ``targets`` meaning "no label".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from inference.labels import (
    CONDITIONS,
    LABELS,
    SEVERITY_WEIGHTS,
    ConditionGroup,
    Severity,
)

EPS = 1e-15  # probabilities are clipped to [EPS, 1 - EPS] before taking logs
N_CLASSES = len(Severity)
UNLABELLED = -1

_WEIGHTS = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
_GROUP_ROWS = {g: np.array([i for i, lab in enumerate(LABELS) if lab.condition.group is g]) for g in ConditionGroup}
_CONDITION_ROWS = {c.key: np.array([i for i, lab in enumerate(LABELS) if lab.condition == c]) for c in CONDITIONS}


@dataclass(frozen=True)
class Score:
    """The competition score (``total``, lower is better) and its four parts; NaN parts were not scored."""

    total: float
    spinal: float
    foraminal: float
    subarticular: float
    any_severe_spinal: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _check(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and values; return (row-normalised probs as float64, targets as int64)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets)
    if p.ndim != 3 or p.shape[1:] != (len(LABELS), N_CLASSES):
        raise ValueError(f"probs must have shape (n, {len(LABELS)}, {N_CLASSES}), got {p.shape}")
    if t.shape != p.shape[:2]:
        raise ValueError(f"targets must have shape {p.shape[:2]}, got {t.shape}")
    if not np.isin(t, (UNLABELLED, *range(N_CLASSES))).all():
        raise ValueError("targets must be -1 (no label) or a Severity value")
    sums = p.sum(axis=-1, keepdims=True)
    if not np.isfinite(p).all() or (p < 0).any() or (sums <= 0).any():
        raise ValueError("probs must be finite, non-negative, with a positive sum in every row")
    return p / sums, t.astype(np.int64)


def _weighted_log_loss(p: np.ndarray, t: np.ndarray) -> float:
    """Weighted log loss of rows p (m, 3) against t (m,); rows with t == -1 are skipped, NaN if none left."""
    scored = t != UNLABELLED
    if not scored.any():
        return math.nan
    tt = t[scored]
    p_true = np.clip(p[scored][np.arange(tt.size), tt], EPS, 1 - EPS)
    w = _WEIGHTS[tt]
    return float(np.sum(w * -np.log(p_true)) / np.sum(w))


def _rows_loss(p: np.ndarray, t: np.ndarray, rows: np.ndarray) -> float:
    return _weighted_log_loss(p[:, rows].reshape(-1, N_CLASSES), t[:, rows].reshape(-1))


def _any_severe_spinal(p: np.ndarray, t: np.ndarray) -> float:
    """Binary log loss of "any spinal level severe", one row per study with a labelled spinal level."""
    rows = _GROUP_ROWS[ConditionGroup.SPINAL]
    ts = t[:, rows]
    labelled = ts != UNLABELLED
    studies = labelled.any(axis=1)
    if not studies.any():
        return math.nan
    y = (ts == Severity.SEVERE).any(axis=1)[studies]
    prob = np.clip(p[:, rows, Severity.SEVERE].max(axis=1)[studies], EPS, 1 - EPS)  # all 5 rows, labelled or not
    w = np.where(labelled, _WEIGHTS[np.maximum(ts, 0)], 0.0).max(axis=1)[studies]
    loss = -np.where(y, np.log(prob), np.log1p(-prob))
    return float(np.sum(w * loss) / np.sum(w))


def competition_score(probs: np.ndarray, targets: np.ndarray) -> Score:
    """The competition score: the mean of the non-NaN parts (NaN if every part is NaN)."""
    p, t = _check(probs, targets)
    groups = {g.name.lower(): _rows_loss(p, t, rows) for g, rows in _GROUP_ROWS.items()}
    parts = {**groups, "any_severe_spinal": _any_severe_spinal(p, t)}
    scored = [v for v in parts.values() if not math.isnan(v)]
    total = sum(scored) / len(scored) if scored else math.nan
    return Score(total=total, **parts)


def per_condition_log_loss(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Weighted log loss of each of the five conditions, keyed by ``Condition.key`` (NaN if unlabelled)."""
    p, t = _check(probs, targets)
    return {key: _rows_loss(p, t, rows) for key, rows in _CONDITION_ROWS.items()}


def prior_baseline(targets: np.ndarray, train_targets: np.ndarray | None = None) -> np.ndarray:
    """Probabilities, shaped like ``targets`` + (3,), predicting each group's class frequencies.

    Every row of a group gets the frequencies of the labelled rows of that group in ``train_targets``
    (``targets`` when not given; a group without labels gets 1/3 each). Used honestly, compute the
    frequencies on the training split (``train_targets``) and score the result against the test split;
    taking them from the test targets themselves leaks the test labels into the baseline.
    """
    t = np.asarray(targets)
    src = np.asarray(t if train_targets is None else train_targets)
    if t.ndim != 2 or t.shape[1] != len(LABELS) or src.ndim != 2 or src.shape[1] != len(LABELS):
        raise ValueError(f"targets must have shape (n, {len(LABELS)})")
    out = np.empty((*t.shape, N_CLASSES), dtype=np.float64)
    for rows in _GROUP_ROWS.values():
        counts = np.bincount(src[:, rows][src[:, rows] != UNLABELLED], minlength=N_CLASSES).astype(np.float64)
        out[:, rows] = counts / counts.sum() if counts.sum() > 0 else 1.0 / N_CLASSES
    return out


def fill_not_assessed(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Rows without a prediction (NaN: not assessed) get the class prior; the metric needs every row."""
    prior = np.broadcast_to(prior, probs.shape)
    return np.where(np.isnan(probs).any(axis=-1, keepdims=True), prior, probs)


def _div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """One-vs-rest ROC AUC by the Mann-Whitney rank formula; NaN without positives or negatives."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(probs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Per condition group (keyed by ``ConditionGroup.value``), on labelled rows with argmax predictions.

    Each entry: ``n`` (labelled rows), ``accuracy`` (NaN when n == 0), ``confusion`` (3x3 nested lists,
    rows = true, cols = predicted, Severity order), and ``classes`` keyed by severity display name with
    ``support``, ``precision``, ``recall``, ``f1`` (0/0 taken as 0.0) and one-vs-rest ``auc`` (NaN when
    the class has no positives or no negatives). Argmax ties go to the lower grade. Plain Python types.
    """
    p, t = _check(probs, targets)
    report: dict[str, Any] = {}
    for group, rows in _GROUP_ROWS.items():
        pg, tg = p[:, rows].reshape(-1, N_CLASSES), t[:, rows].reshape(-1)
        scored = tg != UNLABELLED
        pg, tg = pg[scored], tg[scored]
        pred = pg.argmax(axis=1)
        confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
        np.add.at(confusion, (tg, pred), 1)
        classes = {}
        for sev in Severity:
            tp, n_pred, n_true = confusion[sev, sev], confusion[:, sev].sum(), confusion[sev].sum()
            precision, recall = _div(tp, n_pred), _div(tp, n_true)
            classes[sev.display] = {
                "support": int(n_true),
                "precision": precision,
                "recall": recall,
                "f1": _div(2 * precision * recall, precision + recall),
                "auc": _roc_auc(pg[:, sev], tg == sev),
            }
        report[group.value] = {
            "n": int(tg.size),
            "accuracy": float(np.trace(confusion) / tg.size) if tg.size else math.nan,
            "confusion": confusion.tolist(),
            "classes": classes,
        }
    return report
