"""Validation through the serving pipeline (``inference.analyze_study``), one study at a time.

A validation study's DICOM files (listed in its cache entry) are read as headers; the pipeline
decodes each image's pixels when it needs them and drops them with the study. Only small results
stay: probabilities (25 x 3), decoded levels and the level-check measurements per study.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray

from inference.analyze import AssessedLabel, Runner, StudyResult, analyze_study
from inference.labels import CONDITIONS, LEVELS, Label, Level
from training.cache import read_entry, study_points
from training.data import canal_points, crop_center, level_error_mm
from training.models import CONDITION_GROUP
from training.rsna import read_image

Instances = list[tuple[pydicom.Dataset, Path]]
SAGITTAL_NORMAL = np.array([1.0, 0.0, 0.0])


@dataclass(frozen=True)
class ValidationSet:
    """The validation studies: their cache entries (points, file list) and their DICOM folder."""

    cache: Path
    data: Path
    study_ids: tuple[int, ...]
    targets: NDArray[np.int64]  # (n, 25), -1 unlabelled

    def __len__(self) -> int:
        return len(self.study_ids)

    def points(self, study_id: int) -> dict[Label, NDArray]:
        return study_points(self.cache, study_id)

    def canal(self, study_id: int) -> dict[Level, NDArray]:
        return canal_points(self.points(study_id))

    def instances(self, study_id: int) -> Instances:
        """The study's image headers and paths (pixels are read by the pipeline, per image)."""
        entry = read_entry(self.cache, study_id)
        if entry is None:
            raise FileNotFoundError(f"{self.cache}: the entry of study {study_id} is missing (run prepare again)")
        out = []
        for rel, _, _ in entry.sources:
            path = self.data / rel
            ds = read_image(path, pixels=False)
            if ds is not None:
                out.append((ds, path))
        return out

    def analysed(self, runner: Runner, check_levels: bool = True) -> Iterator[tuple[int, StudyResult]]:
        """Each study through the pipeline, read and dropped one at a time."""
        for sid in self.study_ids:
            yield sid, analyze_study(self.instances(sid), runner, check_levels=check_levels)


def evaluate_pipeline(runner: Runner, val: ValidationSet,
                      check_levels: bool = True) -> tuple[NDArray[np.float64], list[StudyResult]]:
    """(probabilities (n, 25, 3), NaN where not assessed; each study's result without its labels:
    levels and level-check measurements). Before the level check is fitted, ``check_levels=False``."""
    probs, results = [], []
    for _, result in val.analysed(runner, check_levels):
        probs.append(result.probabilities())
        results.append(replace(result, labels=()))  # no Grad-CAM maps kept
    return np.stack(probs), results


def crop_errors(runner: Runner, val: ValidationSet) -> dict[int, float]:
    """Median in-plane distance (mm) between the pipeline's crop centres and where training centres
    the same crops (``training.data.crop_center``), per group (0 spinal, 1 foraminal, 2 subarticular)."""
    errors: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for sid, result in val.analysed(runner, check_levels=False):
        points = val.points(sid)
        canal = canal_points(points)
        for r in result.labels:
            target = crop_center(r.label, points, canal)
            if not isinstance(r, AssessedLabel) or target is None:
                continue
            frame = r.location.crop
            d = target - frame.center
            normal = np.cross(frame.u, frame.v)
            d = d - (d @ normal) * normal
            errors[CONDITION_GROUP[CONDITIONS.index(r.label.condition)]].append(float(np.linalg.norm(d)))
    return {g: float(np.median(v)) if v else 2.0 for g, v in errors.items()}


def result_errors(result: StudyResult, truth: dict[Level, NDArray]) -> list[float]:
    """Distance (mm) between the pipeline's canal point of each level and the marked one."""
    predicted = {lv: np.array(result.levels[lv]) for lv in LEVELS if lv in result.levels}
    return level_error_mm(predicted, truth, SAGITTAL_NORMAL)
