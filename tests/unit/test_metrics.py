"""The competition metric on hand-computed cases (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inference.labels import (
    CONDITIONS,
    LABELS,
    LEFT_FORAMINAL,
    LEVELS,
    RIGHT_FORAMINAL,
    SPINAL,
    Condition,
    ConditionGroup,
    Label,
    Severity,
)
from training.metrics import (
    EPS,
    Score,
    classification_report,
    competition_score,
    per_condition_log_loss,
    prior_baseline,
)

N, M, S, U = int(Severity.NORMAL_MILD), int(Severity.MODERATE), int(Severity.SEVERE), -1
LN2, LN3, LN1_5 = math.log(2), math.log(3), math.log(1.5)


def rows(condition: Condition) -> list[int]:
    """Column indices of a condition's five levels (L1/L2 .. L5/S1)."""
    return [LABELS.index(Label(condition, level)) for level in LEVELS]


def group_rows(group: ConditionGroup) -> list[int]:
    return [i for i, label in enumerate(LABELS) if label.condition.group is group]


def uniform(n_studies: int) -> np.ndarray:
    return np.full((n_studies, len(LABELS), 3), 1 / 3)


def unlabelled(n_studies: int) -> np.ndarray:
    return np.full((n_studies, len(LABELS)), U)


def values(score: Score) -> list[float]:
    return list(score.as_dict().values())


def one_study_spinal() -> tuple[np.ndarray, np.ndarray]:
    """One study, only spinal rows labelled: Severe, Moderate, (none), Normal, Normal."""
    probs, targets = uniform(1), unlabelled(1)
    probs[0, rows(SPINAL)] = [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.9, 0.05, 0.05]]
    targets[0, rows(SPINAL)] = [S, M, U, N, N]
    return probs, targets


def test_perfect_predictions_score_zero() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=(4, len(LABELS)))
    targets[0, rows(SPINAL)] = [N, M, S, N, N]  # a study with a severe spinal level ...
    targets[1, rows(SPINAL)] = [N, M, M, N, N]  # ... and one without
    probs = np.eye(3)[targets]  # one-hot on the true class; clipped to 1 - 1e-15 -> loss ~1e-15
    score = competition_score(probs, targets)
    for value in score.as_dict().values():
        assert 0 <= value < 1e-6


def test_uniform_predictions() -> None:
    # Every labelled row has p_true = 1/3, so each group loss is ln 3 whatever the weights.
    probs, targets = uniform(2), np.zeros((2, len(LABELS)), dtype=int)
    targets[:, group_rows(ConditionGroup.FORAMINAL)[:3]] = M
    targets[1, group_rows(ConditionGroup.SUBARTICULAR)[-2:]] = S
    targets[0, rows(SPINAL)] = [N, M, S, N, N]  # any severe: y=1, weight 4, p=1/3 -> -ln(1/3) = ln 3
    targets[1, rows(SPINAL)] = [N, M, U, N, N]  # no severe:  y=0, weight 2, p=1/3 -> -ln(2/3) = ln 1.5
    any_severe = (4 * LN3 + 2 * LN1_5) / (4 + 2)  # = 0.867563
    score = competition_score(probs, targets)
    assert score.spinal == pytest.approx(LN3)
    assert score.foraminal == pytest.approx(LN3)
    assert score.subarticular == pytest.approx(LN3)
    assert score.any_severe_spinal == pytest.approx(any_severe)
    assert any_severe == pytest.approx(0.867563, abs=1e-6)
    assert score.total == pytest.approx((3 * LN3 + any_severe) / 4)


def test_one_study_by_hand() -> None:
    probs, targets = one_study_spinal()
    # Spinal group, labelled rows (weight, p_true): (4, 0.5) (2, 0.6) (1, 0.7) (1, 0.9); sum of weights 8.
    # 4*0.693147 + 2*0.510826 + 0.356675 + 0.105361 = 4.256276 -> / 8 = 0.532034
    spinal = (4 * -math.log(0.5) + 2 * -math.log(0.6) - math.log(0.7) - math.log(0.9)) / 8
    # Any severe: y = 1 (L1/L2 severe); p = max severe prob over all 5 rows = 0.8 (the unlabelled L3/L4).
    any_severe = -math.log(0.8)  # = 0.223144 (one study: its weight 4 cancels)
    score = competition_score(probs, targets)
    assert score.spinal == pytest.approx(spinal) and spinal == pytest.approx(0.532034, abs=1e-6)
    assert score.any_severe_spinal == pytest.approx(any_severe) and any_severe == pytest.approx(0.223144, abs=1e-6)
    # Foraminal and subarticular have no labels: NaN, left out of the mean.
    assert math.isnan(score.foraminal) and math.isnan(score.subarticular)
    assert score.total == pytest.approx((spinal + any_severe) / 2)  # = 0.377589


def test_unnormalised_rows_are_normalised() -> None:
    probs, targets = uniform(1), unlabelled(1)
    probs[0, rows(SPINAL)[0]] = [2, 1, 1]  # -> [0.5, 0.25, 0.25]
    targets[0, rows(SPINAL)[0]] = N
    assert competition_score(probs, targets).spinal == pytest.approx(LN2)  # -ln 0.5

    probs, targets = one_study_spinal()
    scale = np.arange(1, 26, dtype=float)[None, :, None] / 7  # a different positive factor per row
    assert np.allclose(values(competition_score(probs * scale, targets)), values(competition_score(probs, targets)),
                       equal_nan=True)


def test_unlabelled_rows_are_not_scored() -> None:
    probs, targets = one_study_spinal()
    base = competition_score(probs, targets)
    changed = probs.copy()
    changed[0, group_rows(ConditionGroup.FORAMINAL)] = [0.0, 0.0, 1.0]  # unlabelled: no effect anywhere
    assert np.allclose(values(competition_score(changed, targets)), values(base), equal_nan=True)
    # The unlabelled spinal row L3/L4 leaves the spinal loss alone but still feeds the any-severe maximum.
    changed[0, rows(SPINAL)[2]] = [0.9, 0.05, 0.05]  # max severe prob is now 0.5 (L1/L2)
    score = competition_score(changed, targets)
    assert score.spinal == pytest.approx(base.spinal)
    assert score.any_severe_spinal == pytest.approx(-math.log(0.5))


def test_group_without_labels_is_nan_and_left_out() -> None:
    probs, targets = uniform(1), np.zeros((1, len(LABELS)), dtype=int)
    targets[0, group_rows(ConditionGroup.FORAMINAL)] = U
    # spinal all Normal: y = 0, p = 1/3 -> any severe = -ln(2/3) = ln 1.5; spinal = subarticular = ln 3
    score = competition_score(probs, targets)
    assert math.isnan(score.foraminal)
    assert score.any_severe_spinal == pytest.approx(LN1_5)
    assert score.total == pytest.approx((LN3 + LN3 + LN1_5) / 3)
    # No labels at all: every part (and the total) is NaN.
    assert all(math.isnan(v) for v in competition_score(probs, unlabelled(1)).as_dict().values())


def test_per_condition_log_loss() -> None:
    probs, targets = uniform(1), unlabelled(1)
    targets[0, rows(LEFT_FORAMINAL) + rows(RIGHT_FORAMINAL)] = N
    probs[0, rows(LEFT_FORAMINAL)] = [0.5, 0.25, 0.25]  # left: -ln 0.5 = ln 2; right: uniform -> ln 3
    losses = per_condition_log_loss(probs, targets)
    assert list(losses) == [c.key for c in CONDITIONS]
    assert losses[LEFT_FORAMINAL.key] == pytest.approx(LN2)
    assert losses[RIGHT_FORAMINAL.key] == pytest.approx(LN3)
    assert math.isnan(losses[SPINAL.key])
    # Equal weights (all Normal) -> the foraminal group is the plain mean of its two conditions.
    assert competition_score(probs, targets).foraminal == pytest.approx((LN2 + LN3) / 2)


def test_prior_baseline() -> None:
    train = unlabelled(2)
    train[0, rows(SPINAL)] = [N, N, N, M, S]
    train[1, rows(SPINAL)] = [N, N, N, N, U]  # 9 labelled: 7 N, 1 M, 1 S -> [7/9, 1/9, 1/9]
    train[0, group_rows(ConditionGroup.FORAMINAL)] = N  # 10 N
    train[1, rows(LEFT_FORAMINAL)] = M  # 5 M (right side unlabelled) -> [10/15, 5/15, 0]
    prior = prior_baseline(unlabelled(3), train_targets=train)  # shape from the first argument
    assert prior.shape == (3, len(LABELS), 3)
    assert np.allclose(prior[:, rows(SPINAL)], [7 / 9, 1 / 9, 1 / 9])
    assert np.allclose(prior[:, group_rows(ConditionGroup.FORAMINAL)], [2 / 3, 1 / 3, 0])
    assert np.allclose(prior[:, group_rows(ConditionGroup.SUBARTICULAR)], 1 / 3)  # no labels -> uniform
    assert np.array_equal(prior_baseline(train), prior_baseline(unlabelled(2), train_targets=train))

    # Scored on the same labels, the prior's spinal loss: weights 7*1 + 2 + 4 = 13;
    # 7*ln(9/7) + 2*ln 9 + 4*ln 9 = 1.759201 + 13.183347 = 14.942548 -> / 13 = 1.149427
    score = competition_score(prior_baseline(train), train)
    assert score.spinal == pytest.approx((7 * math.log(9 / 7) + 6 * math.log(9)) / 13)
    assert score.spinal == pytest.approx(1.149427, abs=1e-6)
    good = np.where(np.eye(3, dtype=bool)[np.maximum(train, 0)], 0.8, 0.1)  # 0.8 on the true class
    assert competition_score(good, train).spinal == pytest.approx(-math.log(0.8))
    assert competition_score(good, train).total < score.total


def test_classification_report() -> None:
    probs, targets = uniform(2), unlabelled(2)
    spinal = rows(SPINAL)
    probs[0, spinal] = [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]]
    targets[0, spinal] = [N, N, N, M, M]  # predicted: N, N, M, M, N
    probs[1, spinal] = [[0.1, 0.2, 0.7], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    targets[1, spinal] = [S, S, U, N, U]  # predicted: S, S, -, N, -
    targets[0, group_rows(ConditionGroup.FORAMINAL)] = N  # foraminal: uniform probs,
    targets[1, group_rows(ConditionGroup.FORAMINAL)] = M  # argmax tie -> all predicted Normal/Mild
    report = classification_report(probs, targets)
    json.dumps(report)  # plain Python types

    sp = report[ConditionGroup.SPINAL.value]
    assert sp["n"] == 8
    assert sp["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert sp["accuracy"] == pytest.approx(6 / 8)
    normal, moderate, severe = (sp["classes"][sev.display] for sev in Severity)
    assert (normal["precision"], normal["recall"], normal["f1"]) == pytest.approx((3 / 4, 3 / 4, 3 / 4))
    assert (moderate["precision"], moderate["recall"], moderate["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (severe["precision"], severe["recall"], severe["f1"], severe["support"]) == (1.0, 1.0, 1.0, 2)
    # Severe AUC: positives 0.7, 0.5 vs six negatives at 0.1 -> perfectly ranked -> 1.0
    assert severe["auc"] == 1.0
    # Normal AUC: positives 0.8, 0.6, 0.3, 0.7 vs negatives 0.2, 0.5, 0.1, 0.2: 4 + 4 + 3 + 4 = 15 / 16
    assert normal["auc"] == pytest.approx(15 / 16)
    # Moderate AUC: positives 0.7, 0.4 vs negatives 0.1, 0.3, 0.6, 0.2, 0.2, 0.3: 6 + 5 = 11 / 12
    assert moderate["auc"] == pytest.approx(11 / 12)

    fo = report[ConditionGroup.FORAMINAL.value]
    assert fo["confusion"] == [[10, 0, 0], [10, 0, 0], [0, 0, 0]]
    normal, moderate, severe = (fo["classes"][sev.display] for sev in Severity)
    # Normal: precision 10/20, recall 10/10, F1 = 2*0.5*1/1.5 = 2/3; Moderate and Severe: 0/0 -> 0.0
    assert (normal["precision"], normal["recall"], normal["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert (moderate["precision"], moderate["recall"], moderate["f1"]) == (0.0, 0.0, 0.0)
    assert (severe["precision"], severe["recall"], severe["f1"]) == (0.0, 0.0, 0.0)
    assert normal["auc"] == 0.5 and moderate["auc"] == 0.5  # all scores tied
    assert math.isnan(severe["auc"])  # no positives

    sa = report[ConditionGroup.SUBARTICULAR.value]
    assert sa["n"] == 0 and math.isnan(sa["accuracy"]) and sa["confusion"] == [[0] * 3] * 3


def test_auc_averages_ties() -> None:
    probs, targets = uniform(1), unlabelled(1)
    sub = group_rows(ConditionGroup.SUBARTICULAR)[:4]
    probs[0, sub] = [[0.25, 0.25, 0.5], [0.05, 0.05, 0.9], [0.4, 0.1, 0.5], [0.8, 0.1, 0.1]]
    targets[0, sub] = [S, S, N, N]
    # Severe: positives 0.5, 0.9 vs negatives 0.5, 0.1: 0.5 (tie) + 1 + 1 + 1 = 3.5 / 4
    report = classification_report(probs, targets)
    severe = report[ConditionGroup.SUBARTICULAR.value]["classes"][Severity.SEVERE.display]
    assert severe["auc"] == pytest.approx(0.875)


def test_score_dict_and_validation() -> None:
    probs, targets = one_study_spinal()
    assert list(competition_score(probs, targets).as_dict()) == [
        "total", "spinal", "foraminal", "subarticular", "any_severe_spinal"]
    assert isinstance(competition_score(probs, targets), Score)
    assert EPS == 1e-15
    with pytest.raises(ValueError):
        competition_score(probs[:, :24], targets[:, :24])
    with pytest.raises(ValueError):
        competition_score(probs, np.full_like(targets, 3))
    with pytest.raises(ValueError):
        competition_score(np.zeros_like(probs), targets)
