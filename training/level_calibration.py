"""Fitting the level check (``inference.level_check``) on a validation split.

Training fits it in its calibration stage; ``lumbar-node calibrate-levels`` fits it for an exported
model folder whose training run is not kept (the bundled default), from the same split of the same
data, and writes it into the folder's model.json. Both measure the decoded levels of every
validation study with the check off, keep the studies whose five levels all lie within
``CORRECT_WITHIN_MM`` of the marked canal points (the check must accept those), and fit on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from inference.analyze import Runner, StudyResult, analyze_study
from inference.labels import LEVELS, ConditionGroup, Level
from inference.level_check import LevelCheck, LevelFeatures, fit_level_check, implausible
from inference.model import ModelMetadata
from training.data import ground_truth_points, level_error_mm
from training.rsna import load_rsna, read_instances, split_studies

log = structlog.stdlib.get_logger(__name__)

CORRECT_WITHIN_MM = 10.0  # a study's levels are correctly localised when all lie this close to the marks
SAGITTAL_NORMAL = np.array([1.0, 0.0, 0.0])  # level errors are measured in the sagittal plane


@dataclass(frozen=True)
class LevelFit:
    """A fitted check and what it was fitted on."""

    check: LevelCheck
    studies: int  # validation studies with a sagittal series
    correct: int  # of those, correctly localised (the fit's input)
    rejected_correct: int  # correctly localised studies the fitted check rejects (0 by construction)
    rejected_wrong: int  # wrongly localised studies it rejects
    wrong: int

    def as_dict(self) -> dict[str, Any]:
        return {"studies": self.studies, "correctly_localised": self.correct, "wrongly_localised": self.wrong,
                "rejected_correct": self.rejected_correct, "rejected_wrong": self.rejected_wrong}


def correctly_localised(result: StudyResult, truth: dict[Level, NDArray]) -> bool:
    """Whether every marked level's canal point was found within CORRECT_WITHIN_MM (in-plane)."""
    predicted = {lv: np.array(result.levels[lv]) for lv in LEVELS if lv in result.levels}
    errors = level_error_mm(predicted, truth, SAGITTAL_NORMAL)
    return bool(errors) and len(errors) == len(truth) and max(errors) <= CORRECT_WITHIN_MM


def fit_on_results(results: Sequence[StudyResult], truths: Sequence[dict[Level, NDArray]]) -> LevelFit:
    """Fit the check on results analysed with ``check_levels=False`` and their marked canal points."""
    correct: list[LevelFeatures] = []
    wrong: list[LevelFeatures] = []
    for result, truth in zip(results, truths, strict=True):
        if result.localisation is None or not truth:
            continue
        (correct if correctly_localised(result, truth) else wrong).append(result.localisation)
    check = fit_level_check(correct)
    fit = LevelFit(check, len(correct) + len(wrong), len(correct),
                   sum(implausible(f, check) is not None for f in correct),
                   sum(implausible(f, check) is not None for f in wrong), len(wrong))
    log.info("level check fitted on validation", **check.to_json(), **fit.as_dict())
    return fit


def calibrate_levels(runner: Runner, data: Path, val_fraction: float = 0.2, seed: int = 0) -> LevelFit:
    """Fit the check for ``runner`` on the validation split (``split_studies(.., val_fraction, seed)``,
    what training used) of the RSNA layout at ``data``."""
    _, val = split_studies(load_rsna(data), val_fraction, seed)
    results, truths = [], []
    for record in val:
        results.append(analyze_study(read_instances(record), runner, check_levels=False))
        truths.append({lb.level: p for lb, p in ground_truth_points(record).items()
                       if lb.condition.group is ConditionGroup.SPINAL})
    return fit_on_results(results, truths)


def with_level_check(meta: ModelMetadata, fit: LevelFit) -> ModelMetadata:
    """``meta`` with the fitted check and what it was fitted on (in ``validation``)."""
    return replace(meta, level_check=fit.check, validation={**meta.validation, "level_check": fit.as_dict()})


CARD_LINE = "- Level check: "


def card_line(check: LevelCheck) -> str:
    """The model card's line on the level check."""
    return f"{CARD_LINE}{check.describe()}; a study that fails it is not assessed."


def update_model_card(path: Path, meta: ModelMetadata) -> None:
    """Write the level check's line into a model card (after its calibration line); no card, nothing."""
    if meta.level_check is None or not path.is_file():
        return
    line = card_line(meta.level_check)
    lines = [x for x in path.read_text().splitlines() if not x.startswith(CARD_LINE)]
    at = next((i + 1 for i, x in enumerate(lines) if x.startswith("- Calibration:")), len(lines))
    lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
