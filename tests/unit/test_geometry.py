"""Pixel <-> patient geometry follows PS3.3 C.7.6.2."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from inference.geometry import (
    ImagePlane,
    classify_orientation,
    direction_letters,
    nearest_plane,
    sort_along_normal,
)

SAGITTAL = [0, 1, 0, 0, 0, -1]
AXIAL = [1, 0, 0, 0, 1, 0]


def _plane(position: list[float], orientation: list[float], spacing: tuple[float, float] = (0.5, 0.8),
           size: tuple[int, int] = (100, 200)) -> ImagePlane:
    return ImagePlane.from_attributes(position, orientation, spacing, *size)


def test_first_pixel_is_the_position_and_spacing_follows_rows_then_columns() -> None:
    plane = _plane([10, 20, 30], AXIAL, spacing=(0.5, 0.8))
    assert np.allclose(plane.to_patient(0, 0), [10, 20, 30])
    # one column to the right moves along the row direction by the column spacing (PixelSpacing[1])
    assert np.allclose(plane.to_patient(1, 0), [10.8, 20, 30])
    # one row down moves along the column direction by the row spacing (PixelSpacing[0])
    assert np.allclose(plane.to_patient(0, 1), [10, 20.5, 30])


def test_round_trip_on_an_oblique_plane() -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    plane = _plane([-50, 12, 7], [c, 0, s, 0, 1, 0])
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 200, 50), rng.uniform(0, 100, 50)
    px, py, dist = plane.to_pixel(plane.to_patient(x, y))
    assert np.allclose(px, x) and np.allclose(py, y) and np.allclose(dist, 0)
    assert np.allclose(plane.normal, [-s, 0, c])


def test_from_dataset_and_validation() -> None:
    ds = Dataset()
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = SAGITTAL
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = 4, 5
    plane = ImagePlane.from_dataset(ds)
    assert np.allclose(plane.normal, [-1, 0, 0])
    with pytest.raises(ValueError):
        _plane([0, 0, 0], [1, 0, 0, 1, 0, 0])  # not orthogonal
    with pytest.raises(ValueError):
        _plane([0, 0, 0], AXIAL, spacing=(0, 1))


def test_sort_along_normal_ignores_listing_order() -> None:
    planes = [_plane([0, 0, z], AXIAL) for z in (30, -10, 50, 0)]
    assert [planes[i].position[2] for i in sort_along_normal(planes)] == [-10, 0, 30, 50]


def test_nearest_plane_among_differently_angled_stacks() -> None:
    c, s = np.cos(0.35), np.sin(0.35)
    upper = [_plane([-50, -25, z], AXIAL) for z in (40, 44, 48)]
    lower = [_plane([-50, -25, z], [1, 0, 0, 0, c, s]) for z in (-20, -16, -12)]
    planes = upper + lower
    idx, dist = nearest_plane(planes, [0.0, 0.0, 45.0])
    assert idx == 1 and dist == pytest.approx(1.0)
    idx, _ = nearest_plane(planes, [0.0, 5.0, -15.0])
    assert idx in (3, 4, 5) and planes[idx] in lower
    with pytest.raises(ValueError):
        nearest_plane(planes, [500.0, 0.0, 0.0])  # outside every image


def test_orientation_names() -> None:
    assert classify_orientation(SAGITTAL) == "sagittal"
    assert classify_orientation(AXIAL) == "axial"
    assert classify_orientation([1, 0, 0, 0, 0, -1]) == "coronal"
    assert classify_orientation([1, 0, 0, 0, 0.7071, 0.7071]) == "oblique"
    assert direction_letters([0, 1, 0]) == "P" and direction_letters([0, 0, -1]) == "F"
    assert direction_letters([0.9, 0, 0.3]) == "LH"
