"""The level check: features of decoded levels, why they are implausible, the fit, model.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inference.geometry import ImagePlane
from inference.labels import SeriesRole
from inference.level_check import (
    DEFAULT_LEVEL_CHECK,
    LevelCheck,
    LevelFeatures,
    fit_level_check,
    implausible,
    level_features,
)
from inference.model import ModelError, ModelMetadata
from inference.runtime import DEFAULT_MODEL_DIR
from inference.volume import Slice, Volume

SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows run posterior, columns to the feet


def _volume(center: tuple[float, float, float] = (0.0, 0.0, 0.0), fov_mm: float = 300.0, n: int = 5) -> Volume:
    """A sagittal stack of ``n`` slices 4 mm apart, ``fov_mm`` square, centred on ``center``."""
    pixels, spacing = 100, fov_mm / 100
    slices = []
    for k in range(n):
        x = center[0] + 4.0 * (k - n // 2)
        position = [x, center[1] - fov_mm / 2, center[2] + fov_mm / 2]
        plane = ImagePlane.from_attributes(position, SAGITTAL, [spacing, spacing], pixels, pixels)
        slices.append(Slice(plane, np.zeros((pixels, pixels), np.float32), "1.2", f"1.2.{k}",
                            "1.2.840.10008.5.1.4.1.1.4", k))
    return Volume(SeriesRole.SAG_T2, slices)


def _spine(gap_mm: float = 35.0, lordosis_mm: float = 8.0) -> np.ndarray:
    """Five canal points head to feet, ``gap_mm`` apart along the feet direction, bowed forwards."""
    z = gap_mm * (2 - np.arange(5))
    y = lordosis_mm * np.sin(np.linspace(0, np.pi, 5))
    return np.stack([np.zeros(5), y, z], axis=1)


PEAKS = np.array([0.8, 0.75, 0.82, 0.85, 0.7])
FITTED = LevelCheck(min_peak=0.3, min_gap_mm=18.0, max_gap_mm=55.0, max_step_angle_deg=45.0, fitted_on=60)


def test_a_spine_passes_and_its_features_are_measured() -> None:
    points = _spine()
    f = level_features(points, PEAKS, _volume())
    assert f.finite and f.min_peak == pytest.approx(0.7)
    assert all(35.0 <= g < 37.0 for g in f.gaps_mm)
    assert all(a < 15 for a in f.step_angles_deg)
    assert f.outside_image_mm == 0.0 and f.max_coordinate_mm == pytest.approx(151.5)  # a corner of the 300 mm images
    assert implausible(f, FITTED) is None
    assert implausible(f, DEFAULT_LEVEL_CHECK) is None


def test_weak_peaks_are_not_a_spine() -> None:
    why = implausible(level_features(_spine(), PEAKS * 0.3, _volume()), FITTED)
    assert why is not None and "peak 0.21" in why


def test_levels_on_top_of_each_other_are_not_five_levels() -> None:
    points = _spine()
    points[2] = points[1] + [0.0, 0.5, -1.0]
    why = implausible(level_features(points, PEAKS, _volume()), FITTED)
    assert why is not None and "apart (at least 18" in why


def test_levels_too_far_apart() -> None:
    why = implausible(level_features(_spine(gap_mm=70.0), PEAKS, _volume(fov_mm=400.0)), FITTED)
    assert why is not None and "at most 55" in why


def test_levels_out_of_order_or_side_by_side_do_not_run_head_to_feet() -> None:
    reversed_ = _spine()[::-1]
    why = implausible(level_features(reversed_, PEAKS, _volume()), FITTED)
    assert why is not None and "head to feet" in why
    sideways = _spine()
    sideways[3:] = sideways[2] + np.array([[0.0, 35.0, 0.0], [0.0, 70.0, 0.0]])  # the last two run posterior
    why = implausible(level_features(sideways, PEAKS, _volume()), FITTED)
    assert why is not None and "90 degrees" in why


def test_a_level_outside_the_sagittal_image() -> None:
    why = implausible(level_features(_spine(), PEAKS, _volume(fov_mm=120.0)), FITTED)
    assert why is not None and "outside the sagittal image" in why


def test_images_metres_from_the_patient_origin() -> None:
    center = (0.0, 0.0, 50_000.0)
    points = _spine() + np.array(center)
    why = implausible(level_features(points, PEAKS, _volume(center)), FITTED)
    assert why is not None and "from the patient origin" in why


def test_a_point_that_is_not_finite() -> None:
    points = _spine()
    points[4] = np.nan
    f = level_features(points, PEAKS, _volume())
    assert not f.finite and implausible(f, FITTED) == "a decoded level is not a finite point"


def _features(peak: float, gaps: tuple[float, ...], angle: float) -> LevelFeatures:
    return LevelFeatures((peak, 0.9, 0.9, 0.9, 0.9), gaps, (angle, 5.0, 5.0, 5.0), 0.0, 250.0, True)


def test_the_fit_takes_the_documented_margins() -> None:
    seen = [_features(0.62, (30.0, 31.0, 32.0, 33.0), 20.0), _features(0.7, (28.0, 36.0, 40.0, 35.0), 10.0)]
    seen += [_features(0.8, (32.0, 32.0, 32.0, 32.0), 5.0)] * 3
    check = fit_level_check(seen)
    assert check.min_peak == pytest.approx(0.31)
    assert check.min_gap_mm == pytest.approx(0.65 * 28.0, abs=0.01)
    assert check.max_gap_mm == pytest.approx(1.35 * 40.0, abs=0.01)
    assert check.max_step_angle_deg == pytest.approx(35.0)
    assert check.fitted_on == 5
    assert all(implausible(f, check) is None for f in seen)  # nothing it was fitted on is rejected


def test_too_few_studies_to_fit_give_the_defaults() -> None:
    assert fit_level_check([_features(0.8, (32.0,) * 4, 5.0)] * 4) == DEFAULT_LEVEL_CHECK


def _metadata_json() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())


def test_model_json_round_trips_the_check_and_an_older_one_loads_without_it() -> None:
    data = _metadata_json()
    data.pop("level_check", None)
    old = ModelMetadata.from_json(data)
    assert old.level_check is None and "level_check" not in old.to_json()
    data["level_check"] = FITTED.to_json()
    new = ModelMetadata.from_json(json.loads(json.dumps(data)))
    assert new.level_check == FITTED
    assert new.to_json()["level_check"] == FITTED.to_json()


@pytest.mark.parametrize("bad", [{"min_peak": "x"}, {"min_peak": 0.3, "colour": 1}, [1, 2], {"min_gap_mm": math.inf}])
def test_a_malformed_check_is_a_model_error(bad: object) -> None:
    data = _metadata_json()
    data["level_check"] = bad if not isinstance(bad, dict) else {**FITTED.to_json(), **bad}
    with pytest.raises(ModelError, match=r"level_check|malformed"):
        ModelMetadata.from_json(json.loads(json.dumps(data, allow_nan=True)))
