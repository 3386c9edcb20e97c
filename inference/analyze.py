"""Grade one study in five steps: series roles -> volumes -> levels -> crops -> grades.

``analyze_study`` works with any ``Runner`` (ONNX Runtime when serving, PyTorch when evaluating a
training run), so that what is evaluated is what is served. Its result is complete when built:
each of the 25 labels is an ``AssessedLabel`` or a ``NotAssessedLabel``, never half of one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.labels import (
    CONDITIONS,
    LABELS,
    LEVELS,
    Label,
    Level,
    SeriesRole,
    Severity,
)
from inference.level_check import DEFAULT_LEVEL_CHECK, LevelCheck, LevelFeatures, implausible, level_features
from inference.levels import (
    crop_axes,
    decode_heatmaps,
    local_offset,
    localiser_inputs,
    midline_shift,
)
from inference.model import ModelInfo
from inference.preprocess import (
    CropFrame,
    Intensity,
    crop_25d,
    crop_frame,
    intensity_of,
)
from inference.series import (
    MAX_SERIES_IMAGES,
    SeriesHeader,
    assign_roles,
    geometry_refusals,
    group_series,
    log_untidy_uids,
)
from inference.volume import MAX_PIXELS, Volume, load_volume

log = structlog.stdlib.get_logger(__name__)

MAX_SLICE_DISTANCE_MM = 8.0  # a level farther than this from every slice of its series is not assessed


@dataclass(frozen=True)
class AnalysisLimits:
    """What one study may cost the analysis (the node sets them from ``limits.*``)."""

    max_series_images: int = MAX_SERIES_IMAGES  # a larger series is not used
    max_pixels: int = MAX_PIXELS  # per image, checked before decoding
    localiser_batch: int = 16  # sagittal slices per localiser run

Point = tuple[float, float, float]  # LPS millimetres


class Runner(Protocol):
    """The two networks, on whatever runtime."""

    info: ModelInfo

    def localise(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        """(B, slices, n, n) on the model's localiser grid (``info.metadata.spec.localiser``) ->
        heatmaps (B, 5, n, n); the small preset: (B, 3, 128, 128)."""
        ...

    def grade(self, crops: NDArray[np.float32],
              conditions: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(B, slices, n, n) crops of one shape (the model's grader crops: one shape per call) and
        their condition indices -> (probabilities (B, 3), Grad-CAM (B, h, w))."""
        ...


class NotAssessedReason(StrEnum):
    """Why a label was not graded (the SR codes each one)."""

    MISSING_SERIES = "missing series"
    UNUSABLE_SERIES = "unusable series"
    NO_SAGITTAL = "no sagittal series"
    NOT_COVERED = "level not covered"
    LEVELS_NOT_LOCALISED = "the disc levels could not be localised"


@dataclass(frozen=True)
class Location:
    """Where a label was graded: the source image and the point on it."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int
    pixel: tuple[float, float]  # (column x, row y) on that image
    patient: Point
    crop: CropFrame  # the crop's frame: maps the Grad-CAM back onto the image


@dataclass(frozen=True)
class AssessedLabel:
    """A graded label: class probabilities, the image and point it was graded on, its Grad-CAM."""

    label: Label
    probabilities: tuple[float, float, float]
    location: Location
    cam: NDArray[np.float32]  # Grad-CAM of the predicted class on the crop grid, 0..1
    assessed: ClassVar[bool] = True

    @property
    def grade(self) -> Severity:
        return Severity(int(np.argmax(self.probabilities)))


@dataclass(frozen=True)
class NotAssessedLabel:
    """A label the study does not allow to grade, with the kind of reason and its wording."""

    label: Label
    why: NotAssessedReason
    reason: str
    assessed: ClassVar[bool] = False


LabelResult = AssessedLabel | NotAssessedLabel


@dataclass(frozen=True)
class StudyResult:
    """Everything the node reports for a study; ``labels`` in LABELS order."""

    study_uid: str
    labels: tuple[LabelResult, ...]
    model: ModelInfo
    levels: dict[Level, Point]  # canal point per level (empty when not localised)
    series_roles: dict[SeriesRole, tuple[str, ...]]  # role -> series UIDs
    seconds: dict[str, float]
    localisation: LevelFeatures | None = None  # what the level check measured (None: no sagittal series)

    def result(self, label: Label) -> LabelResult:
        return self.labels[LABELS.index(label)]

    def assessed(self) -> list[AssessedLabel]:
        return [r for r in self.labels if isinstance(r, AssessedLabel)]

    def probabilities(self) -> NDArray[np.float64]:
        """(25, 3) in LABELS order; NaN rows where not assessed."""
        return np.array([r.probabilities if isinstance(r, AssessedLabel) else (np.nan,) * 3 for r in self.labels])


@dataclass(frozen=True)
class _Volumes:
    """Step 2's output: a volume per usable role, and why each other role is not usable."""

    volumes: dict[SeriesRole, Volume]
    intensity: dict[SeriesRole, Intensity]
    problems: dict[SeriesRole, tuple[NotAssessedReason, str]]


@dataclass(frozen=True)
class _Crop:
    """Step 4's output for one label: its 2.5D crop, condition index and where it lies."""

    label: Label
    pixels: NDArray[np.float32]
    condition: int
    location: Location


def _load_volumes(roles: dict[SeriesRole, list[SeriesHeader]], found: list[SeriesHeader],
                  limits: AnalysisLimits) -> _Volumes:
    """Step 2: each role's series as a volume sorted along its normal; an unusable one is noted
    (a role whose every series has impossible geometry says why, not that it is missing)."""
    volumes: dict[SeriesRole, Volume] = {}
    problems: dict[SeriesRole, tuple[NotAssessedReason, str]] = {}
    for role in SeriesRole:
        if role not in roles:
            refused = geometry_refusals(found, role)
            if refused:
                problems[role] = (NotAssessedReason.UNUSABLE_SERIES,
                                  f"{role.value} series unusable: implausible geometry: {refused[0]}")
            else:
                problems[role] = (NotAssessedReason.MISSING_SERIES, f"no {role.value} series in the study")
            continue
        try:
            volumes[role] = load_volume(role, roles[role], limits.max_pixels)
        except Exception as exc:  # noqa: BLE001 - an unreadable series is reported, not fatal
            problems[role] = (NotAssessedReason.UNUSABLE_SERIES,
                              f"{role.value} series unusable: {type(exc).__name__}: {exc}")
    return _Volumes(volumes, {role: intensity_of(vol) for role, vol in volumes.items()}, problems)


@dataclass(frozen=True)
class _Levels:
    """Step 3's output: the canal point of each disc level and the features the level check reads."""

    points: dict[Level, NDArray[np.float64]]
    features: LevelFeatures


def _localise_levels(vols: _Volumes, runner: Runner, batch: int) -> _Levels | None:
    """Step 3: the canal point of each disc level (None without a usable sagittal series).

    The localiser runs on every sagittal slice; the five heatmaps of the central one are decoded
    jointly, and each level's midline is where its heatmap answers most strongly across slices."""
    sagittal = SeriesRole.SAG_T2 if SeriesRole.SAG_T2 in vols.volumes else SeriesRole.SAG_T1
    if sagittal not in vols.volumes:
        return None
    sag = vols.volumes[sagittal]
    mid = len(sag.slices) // 2
    inputs = localiser_inputs(sag, vols.intensity[sagittal], runner.info.metadata.spec.localiser)
    images = [li.image for li in inputs]
    heatmaps = np.concatenate([runner.localise(np.stack(images[i:i + batch])) for i in range(0, len(images), batch)])
    points, peaks = decode_heatmaps(heatmaps[mid], inputs[mid].frame)
    normal = sag.slices[mid].plane.normal
    offsets = np.array([float((sl.plane.position - sag.slices[mid].plane.position) @ normal) for sl in sag.slices])
    points = points + midline_shift(heatmaps, inputs[mid].frame, points, offsets)[:, None] * normal
    return _Levels({lv: points[lv.position] for lv in LEVELS}, level_features(points, peaks, sag))


def _level_check(info: ModelInfo) -> LevelCheck:
    """The model's level-check thresholds; the built-in defaults for a model.json written before
    the check existed (``ModelMetadata.read`` says so when it loads one)."""
    return info.metadata.level_check or DEFAULT_LEVEL_CHECK


def _place_crop(label: Label, vols: _Volumes, canal: NDArray[np.float64], info: ModelInfo) -> _Crop | NotAssessedLabel:
    """Step 4 for one label: the crop on the slice of its series nearest its centre, or why not."""
    role = label.condition.series_role
    if role not in vols.volumes:
        return NotAssessedLabel(label, *vols.problems[role])
    center = canal + local_offset(label.condition, info.offsets_mm[label.condition.group])
    vol = vols.volumes[role]
    try:
        index, distance = vol.nearest(center)
    except ValueError:
        index, distance = -1, np.inf
    if distance > MAX_SLICE_DISTANCE_MM:
        return NotAssessedLabel(label, NotAssessedReason.NOT_COVERED,
                                f"{label.level.value} is not covered by the {role.value} images")
    u, v, across = crop_axes(label.condition)
    spec = info.metadata.spec.grader(label.condition.group)
    pixels = crop_25d(vol, center, u, v, across, spec, vols.intensity[role], index=index)
    sl = vol.slices[index]
    x, y, _ = sl.plane.to_pixel(center)
    frame = crop_frame(sl, center, u, v, spec)
    cx, cy, cz = (float(c) for c in frame.center)
    location = Location(sl.series_uid, sl.sop_instance_uid, sl.sop_class_uid, sl.instance_number,
                        (float(x), float(y)), (cx, cy, cz), frame)
    return _Crop(label, pixels.astype(np.float32), CONDITIONS.index(label.condition), location)


def _grade_crops(crops: list[_Crop], runner: Runner) -> list[AssessedLabel]:
    """Step 5: the study's crops through the grader, one batch per crop shape (the groups of a
    model may have crops of different sizes and slice counts); in the order of ``crops``."""
    by_shape: dict[tuple[int, ...], list[_Crop]] = {}
    for c in crops:
        by_shape.setdefault(c.pixels.shape, []).append(c)
    graded = {}
    for batch in by_shape.values():
        conditions = np.array([c.condition for c in batch], np.int64)
        probs, cams = runner.grade(np.stack([c.pixels for c in batch]), conditions)
        for crop, p, cam in zip(batch, probs, cams, strict=True):
            peak = float(cam.max())
            graded[crop.label] = AssessedLabel(crop.label, (float(p[0]), float(p[1]), float(p[2])), crop.location,
                                               (cam / peak if peak > 0 else cam).astype(np.float32))
    return [graded[c.label] for c in crops]


def analyze_study(instances: Iterable[tuple[Dataset, Path | None]], runner: Runner,
                  limits: AnalysisLimits = AnalysisLimits(), check_levels: bool = True) -> StudyResult:
    """Grade a study from its image headers (pixels are read from ``path`` when not loaded).

    The decoded levels are checked against the model's ``level_check`` (``inference.level_check``):
    levels that fail it leave every label not assessed. ``check_levels=False`` grades whatever the
    localiser decoded (training, before the thresholds are fitted)."""
    t0 = time.perf_counter()
    instances = list(instances)
    study_uid = str(instances[0][0].StudyInstanceUID) if instances else ""
    found = group_series(instances)
    log_untidy_uids(found)
    roles = assign_roles(found, max_images=limits.max_series_images)  # step 1
    series_roles = {role: tuple(s.series_uid for s in series) for role, series in roles.items()}
    vols = _load_volumes(roles, found, limits)
    t1 = time.perf_counter()
    located = _localise_levels(vols, runner, limits.localiser_batch)
    t2 = time.perf_counter()
    if located is None:
        why = "no usable sagittal series to localise the disc levels"
        unusable = [vols.problems[r][1] for r in (SeriesRole.SAG_T2, SeriesRole.SAG_T1)
                    if vols.problems.get(r, (None, ""))[0] is NotAssessedReason.UNUSABLE_SERIES]
        if unusable:
            why += f" ({'; '.join(unusable)})"
        labels: tuple[LabelResult, ...] = tuple(NotAssessedLabel(label, NotAssessedReason.NO_SAGITTAL, why)
                                                for label in LABELS)
        return StudyResult(study_uid, labels, runner.info, {}, series_roles, {"load": t1 - t0})
    problem = implausible(located.features, _level_check(runner.info)) if check_levels else None
    if problem is not None:
        log.warning("disc levels not localised: every label not assessed", study_uid=study_uid, why=problem)
        why = f"{NotAssessedReason.LEVELS_NOT_LOCALISED.value} ({problem})"
        labels = tuple(NotAssessedLabel(label, NotAssessedReason.LEVELS_NOT_LOCALISED, why) for label in LABELS)
        return StudyResult(study_uid, labels, runner.info, {}, series_roles,
                           {"load": t1 - t0, "localise": t2 - t1}, located.features)
    canal = located.points
    placed = [_place_crop(label, vols, canal[label.level], runner.info) for label in LABELS]
    graded = {r.label: r for r in _grade_crops([p for p in placed if isinstance(p, _Crop)], runner)}
    labels = tuple(graded[p.label] if isinstance(p, _Crop) else p for p in placed)
    levels = {lv: (float(p[0]), float(p[1]), float(p[2])) for lv, p in canal.items()}
    seconds = {"load": t1 - t0, "localise": t2 - t1, "grade": time.perf_counter() - t2}
    return StudyResult(study_uid, labels, runner.info, levels, series_roles, seconds, located.features)
