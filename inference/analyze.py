"""Grade one study: series roles, volumes, level localisation, all crops in one batch, results.

``analyze_study`` works with any ``Runner`` (ONNX Runtime when serving, PyTorch when evaluating a
training run), so that what is evaluated is what is served.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.labels import CONDITIONS, LABELS, LEVELS, Label, SeriesRole, Severity
from inference.levels import (
    GRADER_SPEC,
    crop_axes,
    decode_heatmaps,
    local_offset,
    localiser_inputs,
    midline_shift,
)
from inference.preprocess import CropFrame, crop_25d, crop_frame, intensity_of
from inference.series import assign_roles, group_series
from inference.volume import Volume, load_volume

MAX_SLICE_DISTANCE_MM = 8.0  # a level farther than this from every slice of its series is not assessed


@dataclass(frozen=True)
class ModelInfo:
    """What the grading model is, for the outputs' algorithm identification."""

    name: str
    version: str
    sha256: str
    training_data: str
    offsets_mm: dict[str, tuple[float, float, float]]  # group -> (lateral, posterior, head)


class Runner(Protocol):
    """The two networks, on whatever runtime."""

    info: ModelInfo

    def localise(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        """(B, 3, 128, 128) -> heatmaps (B, 5, 128, 128)."""
        ...

    def grade(self, crops: NDArray[np.float32], conditions: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
        """(B, 3, 48, 48) crops and their condition indices -> (probabilities (B, 3), Grad-CAM (B, h, w))."""
        ...


@dataclass
class Location:
    """Where a label was graded: the source image and the point on it."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int
    pixel: tuple[float, float]  # (column x, row y) on that image
    patient: tuple[float, float, float]  # LPS millimetres
    crop: CropFrame  # the crop's frame: maps the Grad-CAM back onto the image


@dataclass
class LabelResult:
    """One of the 25 labels: probabilities and grade, or why it was not assessed."""

    label: Label
    probabilities: tuple[float, float, float] | None = None
    location: Location | None = None
    cam: NDArray[np.float32] | None = None  # Grad-CAM of the predicted class on the crop grid, 0..1
    reason: str | None = None  # set when not assessed

    @property
    def assessed(self) -> bool:
        return self.probabilities is not None

    @property
    def grade(self) -> Severity | None:
        return None if self.probabilities is None else Severity(int(np.argmax(self.probabilities)))


@dataclass
class StudyResult:
    """Everything the node reports for a study."""

    study_uid: str
    labels: list[LabelResult]
    levels: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # level -> canal point
    series_roles: dict[str, list[str]] = field(default_factory=dict)  # role -> series UIDs
    model: ModelInfo | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def result(self, label: Label) -> LabelResult:
        return next(r for r in self.labels if r.label == label)

    def probabilities(self) -> NDArray[np.float64]:
        """(25, 3) in LABELS order; NaN rows where not assessed."""
        return np.array([r.probabilities if r.assessed else (np.nan,) * 3 for r in self.labels])


def _not_assessed(reason: str) -> list[LabelResult]:
    return [LabelResult(label, reason=reason) for label in LABELS]


def analyze_study(instances: Iterable[tuple[Dataset, Path | None]], runner: Runner) -> StudyResult:
    """Grade a study from its image headers (pixels are read from ``path`` when not loaded)."""
    t0 = time.perf_counter()
    instances = list(instances)
    study_uid = str(instances[0][0].StudyInstanceUID) if instances else ""
    roles = assign_roles(group_series(instances))
    volumes: dict[SeriesRole, Volume] = {}
    problems: dict[SeriesRole, str] = {}
    for role in SeriesRole:
        if role not in roles:
            problems[role] = f"no {role.value} series in the study"
            continue
        try:
            volumes[role] = load_volume(role, roles[role])
        except Exception as exc:  # noqa: BLE001 - an unreadable series is reported, not fatal
            problems[role] = f"{role.value} series unusable: {type(exc).__name__}: {exc}"
    intensity = {role: intensity_of(vol) for role, vol in volumes.items()}
    result = StudyResult(study_uid, [], model=runner.info,
                         series_roles={r.value: [s.series_uid for s in ss] for r, ss in roles.items()})
    t1 = time.perf_counter()

    sagittal = SeriesRole.SAG_T2 if SeriesRole.SAG_T2 in volumes else SeriesRole.SAG_T1
    if sagittal not in volumes:
        result.labels = _not_assessed("no usable sagittal series to localise the disc levels")
        result.seconds = {"load": t1 - t0}
        return result
    sag = volumes[sagittal]
    mid = len(sag.slices) // 2
    inputs = localiser_inputs(sag, intensity[sagittal])
    heatmaps = runner.localise(np.stack([li.image for li in inputs]))
    points, _ = decode_heatmaps(heatmaps[mid], inputs[mid].frame)
    normal = sag.slices[mid].plane.normal
    offsets = np.array([float((sl.plane.position - sag.slices[mid].plane.position) @ normal) for sl in sag.slices])
    points = points + midline_shift(heatmaps, inputs[mid].frame, points, offsets)[:, None] * normal
    result.levels = {lv.value: tuple(float(v) for v in points[lv.index]) for lv in LEVELS}
    t2 = time.perf_counter()

    crops, conditions, pending = [], [], []
    for label in LABELS:
        role = label.condition.series_role
        if role not in volumes:
            result.labels.append(LabelResult(label, reason=problems[role]))
            continue
        group = label.condition.group
        center = points[label.level.index] + local_offset(label.condition, runner.info.offsets_mm[group.value])
        vol = volumes[role]
        try:
            index, distance = vol.nearest(center)
        except ValueError:
            index, distance = -1, np.inf
        if distance > MAX_SLICE_DISTANCE_MM:
            result.labels.append(LabelResult(label, reason=f"{label.level.value} is not covered by the {role.value} images"))
            continue
        u, v, across = crop_axes(label.condition)
        crops.append(crop_25d(vol, center, u, v, across, GRADER_SPEC, intensity[role], index=index))
        conditions.append(CONDITIONS.index(label.condition))
        sl = vol.slices[index]
        x, y, _ = sl.plane.to_pixel(center)
        frame = crop_frame(sl, center, u, v, GRADER_SPEC)
        location = Location(sl.series_uid, sl.sop_instance_uid, sl.sop_class_uid, sl.instance_number,
                            (float(x), float(y)), tuple(float(c) for c in frame.center), frame)
        pending.append(LabelResult(label, location=location))
        result.labels.append(pending[-1])
    if crops:
        probs, cams = runner.grade(np.stack(crops).astype(np.float32), np.array(conditions, np.int64))
        for r, p, cam in zip(pending, probs, cams, strict=True):
            r.probabilities = tuple(float(v) for v in p)
            peak = float(cam.max())
            r.cam = (cam / peak if peak > 0 else cam).astype(np.float32)
    result.labels.sort(key=lambda r: LABELS.index(r.label))
    result.seconds = {"load": t1 - t0, "localise": t2 - t1, "grade": time.perf_counter() - t2}
    return result

