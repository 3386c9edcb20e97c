"""Whether the disc levels the localiser decoded are plausible: localisation that knows when it failed.

The localiser always answers: on a brain, on noise or on a spine outside its field it still
returns five heatmaps, and their peaks decode to five points. Grading crops placed there would be
grades of nothing. ``level_features`` measures what tells a spine from such an answer, and
``implausible`` says why the levels cannot be used (None when they can):

- **peak strength**: the weakest of the five heatmap peaks (the localiser's confidence);
- **five distinct levels, head to feet**: each adjacent pair at least ``min_gap_mm`` and at most
  ``max_gap_mm`` apart, each step from one level to the next within ``max_step_angle_deg`` of
  the patient's feet direction (the levels run head to feet, none folded back or beside another);
- **inside the field of view**: every level projects inside the central sagittal image (a peak
  in the localiser grid's padding, outside the image, is no disc);
- **geometry**: every decoded point finite, and every level and every corner of every sagittal
  image within ``max_coordinate_mm`` of the patient coordinate origin (scanners place it near the
  isocentre; a header that puts the images metres away is broken, whatever it decodes to).

Peak strength, spacing and step angle depend on the model and are fitted on the validation split
of its training run (``fit_level_check``, with the margins below); they are stored in model.json
(``ModelMetadata.level_check``). The field of view and geometry bounds are fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference.preprocess import HEAD
from inference.volume import Volume

# Fixed bounds (not fitted).
MAX_COORDINATE_MM = 2000.0  # patient coordinates of real images lie within about a metre of the origin
MAX_OUTSIDE_IMAGE_MM = 0.0  # a level must project inside the central sagittal image

# Margins of the fit (``fit_level_check``): how much weaker, closer, farther or more tilted than
# anything seen on the correctly localised validation studies a study may be and still be graded.
PEAK_MARGIN = 0.5  # min_peak = half the weakest peak seen
GAP_MARGIN = 0.35  # min_gap = 65 % of the smallest gap seen, max_gap = 135 % of the largest
ANGLE_MARGIN_DEG = 15.0  # max_step_angle = the largest step angle seen + 15 degrees
MAX_STEP_ANGLE_DEG = 80.0  # and never more: a step must run towards the feet
MIN_FITTED_PEAK = 0.02  # a fitted min_peak is never below this (a model that never fires cannot pass anything)
MIN_FIT_STUDIES = 5  # fewer correctly localised validation studies than this: no fit, the defaults

FEET = -HEAD


@dataclass(frozen=True)
class LevelFeatures:
    """What the check looks at, measured on one study's decoded levels (levels head to feet)."""

    peaks: tuple[float, ...]  # heatmap peak value per level (0..1)
    gaps_mm: tuple[float, ...]  # distance between adjacent levels (4)
    step_angles_deg: tuple[float, ...]  # angle between each adjacent step and the feet direction (4)
    outside_image_mm: float  # how far the farthest level lies outside the central sagittal image (0: inside)
    max_coordinate_mm: float  # largest |coordinate| of the levels and of the sagittal images' corners
    finite: bool  # every decoded point is a finite number

    @property
    def min_peak(self) -> float:
        return min(self.peaks)


@dataclass(frozen=True)
class LevelCheck:
    """Thresholds of the check (model.json ``level_check``); ``fitted_on`` counts the validation
    studies they were fitted on (0: built-in defaults)."""

    min_peak: float
    min_gap_mm: float
    max_gap_mm: float
    max_step_angle_deg: float
    max_coordinate_mm: float = MAX_COORDINATE_MM
    max_outside_image_mm: float = MAX_OUTSIDE_IMAGE_MM
    fitted_on: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for a model card."""
        source = (f"fitted on {self.fitted_on} correctly localised validation studies" if self.fitted_on
                  else "built-in defaults")
        return (f"weakest heatmap peak >= {self.min_peak:g}, adjacent levels {self.min_gap_mm:g} to "
                f"{self.max_gap_mm:g} mm apart and within {self.max_step_angle_deg:g} degrees of head to feet, "
                f"inside the sagittal image, within {self.max_coordinate_mm:g} mm of the patient origin ({source})")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LevelCheck:
        """Parse model.json's ``level_check``; ValueError names an unknown, missing or bad key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"level_check has unknown keys {unknown}")
        try:
            values: dict[str, Any] = {k: (int(v) if k == "fitted_on" else float(v)) for k, v in data.items()}
            check = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"level_check is malformed: {exc}") from None
        if not all(math.isfinite(getattr(check, f.name)) for f in fields(cls)):
            raise ValueError("level_check holds a value that is not a finite number")
        return check


# Built-in defaults for a model.json without ``level_check`` (one exported before the check):
# lenient, so that they do not reject what such a model grades well, yet they still refuse what
# cannot be a lumbar spine: peaks the localiser barely raises, levels on top of each other or a
# vertebra's height apart three times over, levels out of order, outside the image or metres away.
DEFAULT_LEVEL_CHECK = LevelCheck(min_peak=0.1, min_gap_mm=10.0, max_gap_mm=70.0, max_step_angle_deg=70.0)


def _corners(volume: Volume) -> NDArray[np.float64]:
    corners = []
    for sl in volume.slices:
        p = sl.plane
        corners.append(p.to_patient(np.array([-0.5, p.columns - 0.5, -0.5, p.columns - 0.5]),
                                    np.array([-0.5, -0.5, p.rows - 0.5, p.rows - 0.5])))
    return np.concatenate(corners)


def level_features(points: ArrayLike, peaks: ArrayLike, volume: Volume) -> LevelFeatures:
    """The features of five decoded canal points (5, 3) and their heatmap peaks (5,) on a
    sagittal volume (the localiser ran on its central slice)."""
    points = np.asarray(points, np.float64)
    peaks = np.asarray(peaks, np.float64)
    finite = bool(np.isfinite(points).all())
    steps = np.diff(points, axis=0) if finite else np.full((len(points) - 1, 3), np.nan)
    gaps = np.linalg.norm(steps, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.clip((steps @ FEET) / gaps, -1.0, 1.0)
    angles = np.degrees(np.arccos(np.where(gaps > 0, cos, -1.0)))
    plane = volume.slices[len(volume.slices) // 2].plane
    outside = 0.0
    if finite:
        x, y, _ = plane.to_pixel(points)
        dx = np.maximum(np.maximum(-0.5 - x, x - (plane.columns - 0.5)), 0) * plane.col_spacing
        dy = np.maximum(np.maximum(-0.5 - y, y - (plane.rows - 0.5)), 0) * plane.row_spacing
        outside = float(np.hypot(dx, dy).max())
    extent = np.abs(_corners(volume)).max()
    if finite:
        extent = max(extent, float(np.abs(points).max()))
    return LevelFeatures(tuple(float(p) for p in peaks), tuple(float(g) for g in gaps),
                         tuple(float(a) for a in angles), outside if finite else math.inf, float(extent), finite)


def implausible(features: LevelFeatures, check: LevelCheck) -> str | None:
    """Why the decoded levels are not a lumbar spine the model can grade, or None when they may be."""
    if not features.finite:
        return "a decoded level is not a finite point"
    if features.max_coordinate_mm > check.max_coordinate_mm:
        return (f"the sagittal images lie {features.max_coordinate_mm:.0f} mm from the patient origin "
                f"(at most {check.max_coordinate_mm:.0f} mm expected)")
    if features.outside_image_mm > check.max_outside_image_mm:
        return f"a level lies {features.outside_image_mm:.0f} mm outside the sagittal image"
    if features.min_peak < check.min_peak:
        return f"weakest level heatmap peak {features.min_peak:.2f} (at least {check.min_peak:.2f} expected)"
    if min(features.gaps_mm) < check.min_gap_mm:
        return f"two levels {min(features.gaps_mm):.0f} mm apart (at least {check.min_gap_mm:.0f} mm expected)"
    if max(features.gaps_mm) > check.max_gap_mm:
        return f"two adjacent levels {max(features.gaps_mm):.0f} mm apart (at most {check.max_gap_mm:.0f} mm expected)"
    if max(features.step_angles_deg) > check.max_step_angle_deg:
        return (f"the levels do not run head to feet (a step {max(features.step_angles_deg):.0f} degrees "
                f"from the feet direction, at most {check.max_step_angle_deg:.0f} expected)")
    return None


def fit_level_check(features: Sequence[LevelFeatures]) -> LevelCheck:
    """Thresholds from the features of correctly localised validation studies, with the margins
    above: half the weakest peak, 65 % of the smallest and 135 % of the largest gap, the largest
    step angle plus 15 degrees (at most 80). Fewer than MIN_FIT_STUDIES studies: the defaults."""
    usable = [f for f in features if f.finite]
    if len(usable) < MIN_FIT_STUDIES:
        return DEFAULT_LEVEL_CHECK
    gaps = [g for f in usable for g in f.gaps_mm]
    return LevelCheck(
        min_peak=round(max(PEAK_MARGIN * min(f.min_peak for f in usable), MIN_FITTED_PEAK), 4),
        min_gap_mm=round((1 - GAP_MARGIN) * min(gaps), 2),
        max_gap_mm=round((1 + GAP_MARGIN) * max(gaps), 2),
        max_step_angle_deg=round(min(max(a for f in usable for a in f.step_angles_deg) + ANGLE_MARGIN_DEG,
                                     MAX_STEP_ANGLE_DEG), 2),
        fitted_on=len(usable),
    )
