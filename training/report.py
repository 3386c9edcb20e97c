"""A run's out-of-fold predictions and its report: what the model is, and its cross-validated score.

Every run writes ``oof.npz`` (its validation studies' predictions through the serving pipeline);
a folds run (``training.folds``) has one per ``fold-<i>`` folder, together covering every study once.

    oof.npz       study_ids (n,), targets (n, 25), probabilities (n, 25, 3) calibrated, NaN where not
                  assessed, uncalibrated (n, 25, 3) the same at temperature 1, prior (25, 3) the
                  training split's class frequencies, temperatures (5,)
    report.json   the competition metric on all out-of-fold predictions, per group and per level, with
                  bootstrap 95% intervals (studies resampled), the class-prior baseline, per fold scores,
                  and what the model is (preset, data, folds, training time, device)
    report.md     the same for people; report.png its plots
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from inference.labels import CONDITIONS, LABELS, LEVELS, SEVERITY_WEIGHTS, ConditionGroup, Severity
from training.metrics import EPS, UNLABELLED, competition_score, fill_not_assessed

log = structlog.stdlib.get_logger(__name__)

OOF_FILE = "oof.npz"
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0
DEFAULT_PRESET = "small"
_FOLD = re.compile(r"fold-(\d+)$")
_PARTS = ("total", "spinal", "foraminal", "subarticular", "any_severe_spinal")
_GROUP_ROWS = {g: np.array([i for i, lab in enumerate(LABELS) if lab.condition.group is g]) for g in ConditionGroup}


def _label_temperatures(temperatures: list[float] | tuple[float, ...]) -> NDArray[np.float64]:
    """Each label's condition's temperature (25,)."""
    return np.array([temperatures[CONDITIONS.index(label.condition)] for label in LABELS], np.float64)


def _powered(probs: NDArray[np.floating], exponent: NDArray[np.float64]) -> NDArray[np.float64]:
    """p ** exponent per label, renormalised (computed in logs); NaN rows stay NaN."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-30, 1.0)) * exponent[None, :, None]
    out = np.exp(logp - np.max(logp, axis=-1, keepdims=True))
    return out / out.sum(axis=-1, keepdims=True)


def uncalibrated(probs: NDArray[np.floating], temperatures: list[float] | tuple[float, ...]) -> NDArray[np.float64]:
    """Probabilities at temperature 1 from calibrated ones: softmax(z / T) raised to T and renormalised
    is softmax(z), so no second pass through the pipeline is needed. NaN rows stay NaN."""
    return _powered(probs, _label_temperatures(temperatures))


def calibrated(probs: NDArray[np.floating], temperatures: list[float] | tuple[float, ...]) -> NDArray[np.float64]:
    """Probabilities p at each condition's temperature T: softmax(log p / T) (as the graders serve)."""
    return _powered(probs, 1.0 / _label_temperatures(temperatures))


def write_oof(path: Path, study_ids: tuple[int, ...] | list[int], targets: NDArray[np.int64],
              probs: NDArray[np.floating], prior: NDArray[np.floating], temperatures: list[float]) -> None:
    """Write a run's out-of-fold predictions (see the module docstring)."""
    np.savez(path, study_ids=np.asarray(study_ids, np.int64), targets=np.asarray(targets, np.int64),
             probabilities=np.asarray(probs, np.float64), uncalibrated=uncalibrated(probs, temperatures),
             prior=np.asarray(prior, np.float64), temperatures=np.asarray(temperatures, np.float64))


@dataclass(frozen=True)
class Oof:
    """Out-of-fold predictions of one run or fold (arrays as in oof.npz, prior per study)."""

    study_ids: NDArray[np.int64]
    targets: NDArray[np.int64]
    probabilities: NDArray[np.float64]
    uncalibrated: NDArray[np.float64]
    prior: NDArray[np.float64]  # (n, 25, 3)
    fold: NDArray[np.int64]  # (n,) the fold that predicted each study (-1: a run without folds)

    @classmethod
    def read(cls, path: Path, fold: int = -1) -> Oof:
        with np.load(path) as z:
            n = len(z["study_ids"])
            return cls(z["study_ids"], z["targets"], z["probabilities"], z["uncalibrated"],
                       np.broadcast_to(z["prior"], (n, *z["prior"].shape)).copy(), np.full(n, fold, np.int64))

    @classmethod
    def concat(cls, parts: list[Oof]) -> Oof:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("study_ids", "targets", "probabilities", "uncalibrated", "prior", "fold")))

    def filled(self) -> NDArray[np.float64]:
        """Calibrated probabilities with the not-assessed rows given the class prior (as served)."""
        return fill_not_assessed(self.probabilities, self.prior)


def fold_folders(run: Path) -> list[Path]:
    """The ``fold-<i>`` folders of a folds run, by fold number ([] for a plain run)."""
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _FOLD.match(p.name))]
    return [p for _, p in sorted(found)]


def fold_of(folder: Path) -> int | None:
    """The fold number of a ``fold-<i>`` folder, else None."""
    m = _FOLD.match(folder.name)
    return int(m.group(1)) if m else None


def read_oof(run: Path) -> Oof:
    """All out-of-fold predictions of a run: its folds' together, or a plain run's own."""
    folds = fold_folders(run)
    if folds:
        missing = [str(f) for f in folds if not (f / OOF_FILE).is_file()]
        if missing:
            raise FileNotFoundError(f"folds without {OOF_FILE} (not finished): {', '.join(missing)}")
        return Oof.concat([Oof.read(f / OOF_FILE, fold_of(f) or 0) for f in folds])
    if not (run / OOF_FILE).is_file():
        raise FileNotFoundError(f"{run} has no {OOF_FILE} (a run trained before out-of-fold predictions were kept)")
    return Oof.read(run / OOF_FILE)


# ---- scores with bootstrap intervals ------------------------------------------------------------------


def level_targets(targets: NDArray[np.int64], level_index: int) -> NDArray[np.int64]:
    """``targets`` with every label of another level unscored (-1): the metric on one level."""
    keep = np.array([lb.level == LEVELS[level_index] for lb in LABELS])
    return np.where(keep[None, :], targets, -1)


def study_terms(probs: NDArray[np.floating],
                targets: NDArray[np.int64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each study's share of the metric's four parts (spinal, foraminal, subarticular, any severe spinal):
    numerators and denominators (n, 4), so that a part over any studies, repeats included, is
    sum(numerators) / sum(denominators), as ``training.metrics.competition_score`` computes it."""
    p = np.asarray(probs, np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    t = np.asarray(targets, np.int64)
    scored, tt = t != UNLABELLED, np.maximum(t, 0)
    w = np.where(scored, np.asarray(SEVERITY_WEIGHTS, np.float64)[tt], 0.0)
    loss = -np.log(np.clip(np.take_along_axis(p, tt[..., None], axis=-1)[..., 0], EPS, 1 - EPS))
    num, den = np.zeros((len(t), 4)), np.zeros((len(t), 4))
    for j, group in enumerate(ConditionGroup):
        rows = _GROUP_ROWS[group]
        num[:, j], den[:, j] = (w[:, rows] * loss[:, rows]).sum(axis=1), w[:, rows].sum(axis=1)
    spinal = _GROUP_ROWS[ConditionGroup.SPINAL]
    labelled = scored[:, spinal].any(axis=1)
    severe = (t[:, spinal] == Severity.SEVERE).any(axis=1)
    prob = np.clip(p[:, spinal, Severity.SEVERE].max(axis=1), EPS, 1 - EPS)  # all 5 rows, labelled or not
    weight = np.where(labelled, w[:, spinal].max(axis=1), 0.0)
    num[:, 3], den[:, 3] = weight * -np.where(severe, np.log(prob), np.log1p(-prob)), weight
    return num, den


def _parts(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    """(..., 4) summed terms -> (..., 5): total (the mean of the scored parts, NaN if none), then the parts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        parts = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    scored = ~np.isnan(parts)
    total = np.where(scored.any(axis=-1), np.nansum(parts, axis=-1) / np.maximum(scored.sum(axis=-1), 1), np.nan)
    return np.concatenate([total[..., None], parts], axis=-1)


def bootstrap_scores(probs: NDArray[np.float64], targets: NDArray[np.int64], draws: int = BOOTSTRAP_DRAWS,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, float]]:
    """Each score (total, groups, levels: the metric on one level's labels) with its bootstrap 95%
    interval: ``draws`` resamples of the studies with replacement (numpy seed ``seed``), the 2.5th and
    97.5th percentiles of the resampled scores (computed from per-study terms, ``study_terms``)."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)]).astype(np.float64)
    out: dict[str, dict[str, float]] = {}
    sets = [(_PARTS, targets), *(((lv.key,), level_targets(targets, k)) for k, lv in enumerate(LEVELS))]
    for keys, t in sets:
        num, den = study_terms(probs, t)
        point, resampled = _parts(num.sum(axis=0), den.sum(axis=0)), _parts(counts @ num, counts @ den)
        for j, key in enumerate(keys):
            column = resampled[:, j][~np.isnan(resampled[:, j])]
            lo, hi = np.percentile(column, [2.5, 97.5]) if len(column) else (math.nan, math.nan)
            out[key] = {"score": float(point[j]), "low": float(lo), "high": float(hi)}
    return out


# ---- what the model is ------------------------------------------------------------------------------


def describe_device(device: Any) -> str:
    """The device a run trained on, in words (the GPU's name, or the CPU and its core count)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _timing(folders: list[Path]) -> dict[str, Any]:
    """Training time from history.json: seconds per epoch (training, validation) per stage, and in total."""
    per_stage: dict[str, dict[str, list[float]]] = {}
    total = 0.0
    for folder in folders:
        for h in _read_json(folder / "history.json") or []:
            stage = per_stage.setdefault(h["stage"], {"train_seconds": [], "validation_seconds": []})
            for key in stage:
                stage[key].append(float(h.get(key, 0.0)))
                total += float(h.get(key, 0.0))
    return {"total_seconds": round(total, 1),
            "per_epoch_seconds": {s: {k: round(float(np.mean(v)), 2) for k, v in d.items() if v}
                                  for s, d in per_stage.items()},
            "epochs": {s: len(d["train_seconds"]) for s, d in per_stage.items()}}


def build_report(run: Path, draws: int = BOOTSTRAP_DRAWS) -> dict[str, Any]:
    """The report of a run (plain or folds) from its oof.npz files, config.json and history.json."""
    folds = fold_folders(run)
    folders = folds or [run]
    oof = read_oof(run)
    config = _read_json(folders[0] / "config.json") or {}
    probs, baseline = oof.filled(), oof.prior
    scores = bootstrap_scores(probs, oof.targets, draws)
    base = bootstrap_scores(baseline, oof.targets, draws)
    per_fold = []
    for k in sorted(set(oof.fold.tolist())):
        m = oof.fold == k
        per_fold.append({"fold": k, "studies": int(m.sum()),
                         "score": competition_score(probs[m], oof.targets[m]).total,
                         "class_prior_score": competition_score(baseline[m], oof.targets[m]).total})
    cache = _read_json(Path(config["cache"]) / "manifest.json") if config.get("cache") else None
    return {
        "run": str(run),
        "preset": config.get("preset", DEFAULT_PRESET),
        "training_data": config.get("training_data"),
        "data": cache.get("data") if cache else None,
        "studies": len(oof.study_ids),
        "folds": len(folds) if folds else None,
        "seed": config.get("seed"),
        "device": config.get("device_used") or config.get("device"),
        "timing": _timing(folders),
        "bootstrap": {"draws": draws, "seed": BOOTSTRAP_SEED, "interval": "95% percentile, studies resampled"},
        "cv_score": scores["total"],
        "scores": scores,
        "class_prior_baseline": base,
        "per_fold": per_fold,
        "not_assessed_rows": int(np.isnan(oof.probabilities).any(axis=-1).sum()),
    }


def _ci(s: dict[str, float]) -> str:
    return "n/a" if math.isnan(s["score"]) else f"{s['score']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: what the model is, then its out-of-fold scores."""
    t = report["timing"]
    folds = report["folds"]
    what = (f"{folds}-fold cross-validation (by study, seed {report['seed']}): every study graded once by the "
            "fold model that did not train on it" if folds else
            "one run: scores on its validation split (out of sample, not cross-validated)")
    epochs = "; ".join(f"{s}: {d.get('train_seconds', 0):.1f} s training + {d.get('validation_seconds', 0):.1f} s "
                       f"validation per epoch ({t['epochs'][s]} epochs)" for s, d in t["per_epoch_seconds"].items())
    lines = [
        f"# Run report: {report['run']}",
        "",
        f"- Preset: {report['preset']}",
        f"- Data: {report['training_data']} ({report['data']}); {report['studies']} studies scored",
        f"- Validation: {what}",
        f"- CV score (competition metric, lower is better): **{_ci(report['cv_score'])}**; class-prior baseline "
        f"{_ci(report['class_prior_baseline']['total'])}",
        f"- Training time (epochs: training + validation): {t['total_seconds'] / 60:.1f} min in total "
        f"({'all folds' if folds else 'the run'}); "
        f"{epochs}",
        f"- Device: {report['device']}",
        "",
        f"Intervals: bootstrap 95% ({report['bootstrap']['draws']} draws resampling studies, seed "
        f"{report['bootstrap']['seed']}). Rows the pipeline did not assess are filled with the class prior "
        f"({report['not_assessed_rows']} rows).",
        "",
        "| part | score [95% interval] | class-prior baseline |",
        "|---|---|---|",
    ]
    for key, name in (*((k, k.replace("_", " ")) for k in _PARTS), *((lv.key, lv.value) for lv in LEVELS)):
        lines.append(f"| {name} | {_ci(report['scores'][key])} | {_ci(report['class_prior_baseline'][key])} |")
    if folds:
        lines += ["", "| fold | studies | score | class-prior baseline |", "|---|---|---|---|"]
        lines += [f"| {f['fold']} | {f['studies']} | {f['score']:.3f} | {f['class_prior_score']:.3f} |"
                  for f in report["per_fold"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], out: Path) -> None:
    """report.png: the scores with their intervals next to the baseline, per part, level and fold."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed: report.png skipped", out=str(out))
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*_PARTS, *(lv.key for lv in LEVELS)]
    names = [*(k.replace("_", " ") for k in _PARTS), *(lv.value for lv in LEVELS)]
    folds = report["per_fold"] if report["folds"] else []
    fig, panels = plt.subplots(1, 2 if folds else 1, figsize=(13 if folds else 10, 4.2), squeeze=False,
                               gridspec_kw={"width_ratios": [3, 1] if folds else [1]})
    axes = panels[0]
    x = np.arange(len(keys))
    for offset, (name, scores) in zip((-0.2, 0.2), (("model", report["scores"]),
                                                    ("class prior", report["class_prior_baseline"])), strict=True):
        mid = np.array([scores[k]["score"] for k in keys])
        err = np.abs(np.array([[scores[k]["low"] for k in keys], [scores[k]["high"] for k in keys]]) - mid)
        axes[0].bar(x + offset, mid, 0.4, yerr=err, capsize=3, label=name)
    axes[0].set_xticks(x, names, rotation=30, ha="right")
    axes[0].set_ylabel("competition score (lower is better)")
    scored = f"out-of-fold, {report['folds']} folds" if folds else "validation split"
    axes[0].set_title(f"{scored}, {report['studies']} studies, 95% bootstrap intervals")
    axes[0].legend()
    if folds:
        axes[1].bar([str(f["fold"]) for f in folds], [f["score"] for f in folds])
        axes[1].set_xlabel("fold")
        axes[1].set_title("per fold")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=90)
    plt.close(fig)


def write_report(run: Path, draws: int = BOOTSTRAP_DRAWS) -> dict[str, Any]:
    """Write RUN/report.json, RUN/report.md and RUN/report.png; return the report."""
    report = build_report(run, draws)
    (run / "report.json").write_text(json.dumps(report, indent=1))
    (run / "report.md").write_text(report_markdown(report))
    plot_report(report, run)
    log.info("report written", run=str(run), cv_score=report["cv_score"]["score"], studies=report["studies"],
             folds=report["folds"])
    return report
