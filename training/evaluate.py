"""Evaluation of a model on studies in the RSNA layout, through the serving pipeline.

Writes ``evaluation.json`` (competition score and its four parts, the class-prior baseline on the
same studies, per-condition log loss, accuracy, precision/recall/F1, AUC, confusion matrices,
Severe recall per condition, level-localisation error in mm) and PNG plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from inference.analyze import NotAssessedLabel, Runner, analyze_study
from inference.labels import CONDITIONS, LABELS, LEVELS, ConditionGroup, Severity
from training.data import ground_truth_points, level_error_mm
from training.metrics import (
    classification_report,
    competition_score,
    fill_not_assessed,
    per_condition_log_loss,
)
from training.rsna import load_rsna, read_instances

log = structlog.stdlib.get_logger(__name__)


def severe_recall(probs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """Per condition: the share of labelled Severe rows predicted Severe (None when there are none)."""
    out: dict[str, float | None] = {}
    for cond in CONDITIONS:
        cols = [i for i, lb in enumerate(LABELS) if lb.condition == cond]
        t, p = targets[:, cols].ravel(), probs[:, cols].reshape(-1, 3).argmax(axis=1)
        severe = t == Severity.SEVERE
        out[cond.key] = float((p[severe] == Severity.SEVERE).mean()) if severe.any() else None
    return out


def evaluate(runner: Runner, data: Path, class_prior: Sequence[Sequence[float]], out: Path | None = None,
             history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Grade every study under ``data`` with ``runner`` and compare with its labels.

    ``class_prior`` is the model's (25 rows of 3 class probabilities, LABELS order, from the training
    split): it fills the labels the pipeline does not assess, and is the baseline scored alongside."""
    records = load_rsna(data)
    prior = np.asarray(class_prior, np.float64)  # (25, 3)
    all_probs, all_targets, errors, seconds = [], [], [], []
    not_assessed: dict[str, int] = {}
    for record in records:
        instances = read_instances(record)
        t0 = time.perf_counter()
        result = analyze_study(instances, runner)
        seconds.append(time.perf_counter() - t0)
        probs = result.probabilities()
        for r in result.labels:
            if isinstance(r, NotAssessedLabel):
                not_assessed[r.reason] = not_assessed.get(r.reason, 0) + 1
        all_probs.append(fill_not_assessed(probs, prior))
        all_targets.append(record.targets())
        truth = {lb.level: p for lb, p in ground_truth_points(record).items()
                 if lb.condition.group is ConditionGroup.SPINAL}
        predicted = {lv: np.array(result.levels[lv]) for lv in LEVELS if lv in result.levels}
        errors += level_error_mm(predicted, truth, np.array([1.0, 0.0, 0.0]))
    probs, targets = np.stack(all_probs), np.array(all_targets)
    score = competition_score(probs, targets)
    baseline = competition_score(np.broadcast_to(prior, probs.shape), targets)
    level_error = {"median": float(np.median(errors)) if errors else None,
                   "p90": float(np.percentile(errors, 90)) if errors else None,
                   "mean": float(np.mean(errors)) if errors else None, "n": len(errors)}
    report = {
        "data": str(data), "studies": len(records), "model": runner.info.name, "version": runner.info.version,
        "score": score.as_dict(), "class_prior_baseline": baseline.as_dict(),
        "score_over_baseline": score.total / baseline.total,
        "per_condition_log_loss": per_condition_log_loss(probs, targets),
        "severe_recall": severe_recall(probs, targets),
        "classification": classification_report(probs, targets),
        "level_error_mm": level_error,
        "not_assessed": not_assessed,
        "seconds_per_study": {"median": float(np.median(seconds)), "max": float(np.max(seconds))},
    }
    log.info("evaluated", studies=len(records), score=score.total, class_prior_score=baseline.total,
             score_over_baseline=report["score_over_baseline"],
             median_level_error_mm=level_error["median"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=1))
        plot(report, history or [], out)
    return report


def plot(report: dict[str, Any], history: list[dict[str, Any]], out: Path) -> None:
    """confusion_matrices.png and, with a training history, training_curves.png; none (a log line)
    where matplotlib is not installed (a serving-only install)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed: PNG plots skipped (evaluation.json written)", out=str(out))
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["Normal/Mild", "Moderate", "Severe"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (group, rep) in zip(axes, report["classification"].items(), strict=True):
        cm = np.array(rep["confusion"])
        ax.imshow(cm, cmap="Blues")
        for i in range(3):
            for j in range(3):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="black" if cm[i, j] < cm.max() / 2 else "white")
        ax.set_xticks(range(3), names, rotation=20)
        ax.set_yticks(range(3), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{group.replace('_', ' ')}\naccuracy {rep['accuracy']:.2f}")
    fig.suptitle(f"{report['studies']} studies from {report['data']} - score {report['score']['total']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrices.png", dpi=90)
    plt.close(fig)
    if not history:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    loc = [h for h in history if h["stage"] == "localiser"]
    grd = [h for h in history if h["stage"] == "grader"]
    if loc:
        epochs = [h["epoch"] for h in loc]
        axes[0].plot(epochs, [h["val_median_error_mm"] for h in loc], "o-", label="validation median error (mm)")
        if "val_mean_error_mm" in loc[0]:
            axes[0].plot(epochs, [h["val_mean_error_mm"] for h in loc], "s-", label="validation mean error (mm)")
        axes[0].set_title("localiser")
        axes[0].set_xlabel("epoch")
        axes[0].legend()
    if grd:
        axes[1].plot([h["epoch"] for h in grd], [h["loss"] for h in grd], "o-", label="training loss")
        axes[1].plot([h["epoch"] for h in grd], [h["val_score"] for h in grd], "s-", label="validation score")
        axes[1].set_title("grader")
        axes[1].set_xlabel("epoch")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=90)
    plt.close(fig)
