"""K-fold assignment by study, out-of-fold probabilities at another temperature, and the report's
bootstrap intervals (pure numpy, no training)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.labels import LABELS, LEVELS
from training.metrics import competition_score
from training.report import bootstrap_scores, calibrated, level_targets, uncalibrated
from training.rsna import fold_study_ids


def test_folds_are_disjoint_cover_every_study_and_depend_only_on_the_seed() -> None:
    ids = list(range(100, 131))
    folds = [fold_study_ids(ids, 4, k, seed=3) for k in range(4)]
    vals = [set(v) for _, v in folds]
    assert sorted(s for v in vals for s in v) == ids  # every study in exactly one validation fold
    assert all(set(t) == set(ids) - v for (t, _), v in zip(folds, vals, strict=True))
    assert sorted(len(v) for v in vals) == [7, 8, 8, 8]
    assert fold_study_ids(ids[::-1], 4, 2, seed=3) == folds[2]  # input order does not matter
    assert fold_study_ids(ids, 4, 2, seed=4) != folds[2]
    with pytest.raises(ValueError, match="fold 4 of 4"):
        fold_study_ids(ids, 4, 4)


def test_uncalibrated_inverts_the_temperatures() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, len(LABELS), 3))
    plain = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    temps = [0.5, 1.7, 2.4, 1.0, 0.8]
    served = calibrated(plain, temps)
    assert not np.allclose(served, plain)
    served[2, 7] = np.nan  # a label not assessed
    back = uncalibrated(served, temps)
    assert np.isnan(back[2, 7]).all()
    mask = ~np.isnan(back)
    assert np.allclose(back[mask], plain[mask], atol=1e-9)


def test_bootstrap_intervals_hold_the_score_and_narrow_with_more_studies() -> None:
    rng = np.random.default_rng(1)

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        targets = rng.integers(0, 3, (n, len(LABELS)))
        probs = np.full((n, len(LABELS), 3), 0.2)
        np.put_along_axis(probs, targets[..., None], 0.6, axis=-1)  # right class 0.6
        flip = rng.random((n, len(LABELS))) < 0.3
        probs[flip] = probs[flip][:, ::-1]
        return probs, targets

    small = bootstrap_scores(*data(20), draws=200)
    large = bootstrap_scores(*data(400), draws=200)
    probs, targets = data(30)
    probs[3, :5] = [0.1, 0.1, 0.8]  # a confident severe spinal study among them
    targets[5:, ::7] = -1  # unlabelled rows
    targets[0, :5] = -1  # a study without any spinal label
    scores = bootstrap_scores(probs, targets, draws=10)
    assert scores["total"]["score"] == pytest.approx(competition_score(probs, targets).total, rel=1e-12)
    assert scores["any_severe_spinal"]["score"] == pytest.approx(competition_score(probs, targets).any_severe_spinal)
    assert scores["l2_l3"]["score"] == pytest.approx(competition_score(probs, level_targets(targets, 1)).total)
    for scores in (small, large):
        for key in ("total", "spinal", "any_severe_spinal", LEVELS[2].key):
            assert scores[key]["low"] <= scores[key]["score"] <= scores[key]["high"], key
    assert (large["total"]["high"] - large["total"]["low"]) < (small["total"]["high"] - small["total"]["low"]) / 2
    probs, targets = data(20)
    assert bootstrap_scores(probs, targets, 50, seed=7) == bootstrap_scores(probs, targets, 50, seed=7)  # seeded


def test_the_score_of_one_level_scores_only_that_levels_labels() -> None:
    targets = np.zeros((3, len(LABELS)), np.int64)
    probs = np.full((3, len(LABELS), 3), 1 / 3)
    wrong = [i for i, lb in enumerate(LABELS) if lb.level != LEVELS[0]]
    probs[:, wrong] = [0.01, 0.01, 0.98]  # every other level's labels badly wrong
    probs[:, [i for i in range(len(LABELS)) if i not in wrong]] = [0.98, 0.01, 0.01]
    alone = competition_score(probs, level_targets(targets, 0))
    assert alone.spinal < 0.05 and alone.foraminal < 0.05
    assert competition_score(probs, targets).spinal > 1
