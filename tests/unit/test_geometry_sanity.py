"""A series' geometry is checked before grading (inference/sanity.py): a pixel of a metre, every slice
at one position, a field of view of a few millimetres or a stack longer than a body leave the series
out with the reason; the node skips a study made only of such series, and says why; a Secondary
Capture holding an MR image is never taken for an MR series."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage

from dicom_node.pipeline.eligibility import skip_reason
from dicom_node.states import SkipReason
from inference.geometry import ImagePlane
from inference.labels import SeriesRole
from inference.sanity import screen_series, spacing_problem, stack_problem
from inference.series import assign_roles, geometry_refusals, group_series
from tests.support.defects import Defect, apply

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _plane(z: float = 0.0, spacing: float = 0.7, size: int = 256) -> ImagePlane:
    return ImagePlane.from_attributes([-90.0, -90.0, z], AXIAL, [spacing, spacing], size, size)


@pytest.mark.parametrize(("spacing", "size", "why"), [
    (1e6, 256, "PixelSpacing 1e\\+06 x 1e\\+06 mm is outside 0.1 to 5 mm"),
    (0.01, 256, "PixelSpacing 0.01 x 0.01 mm is outside"),
    (6.0, 64, "PixelSpacing 6 x 6 mm"),
    (0.2, 64, "field of view 12.8 x 12.8 mm .* is outside 40 to 600 mm"),
    (4.0, 256, "field of view 1024 x 1024 mm"),
])
def test_impossible_spacing_or_field_of_view_is_named(spacing: float, size: int, why: str) -> None:
    problem = spacing_problem(_plane(spacing=spacing, size=size))
    assert problem is not None
    assert re.search(why, problem), problem


@pytest.mark.parametrize(("spacing", "size"), [(0.7, 256), (0.1, 512), (5.0, 64), (0.3125, 640), (2.5, 128)])
def test_real_scanner_spacings_pass(spacing: float, size: int) -> None:
    assert spacing_problem(_plane(spacing=spacing, size=size)) is None


def test_slices_must_lie_at_distinct_positions_along_the_normal() -> None:
    assert stack_problem([_plane(0.0)] * 12) == ("12 slices lie at 1 distinct position along the slice normal "
                                                 "(ImagePositionPatient)")
    assert stack_problem([_plane(float(z)) for z in np.arange(0, 48, 4)]) is None
    # one repeated slice (a re-acquisition) is no reason to refuse a series; fewer than half distinct is
    assert stack_problem([_plane(float(z)) for z in [0, 4, 4, 8, 12, 16]]) is None
    assert stack_problem([_plane(float(z)) for z in [0, 0, 0, 0, 0, 8]]) is not None
    # slices shifted within their plane are still at one position along the normal
    shifted = [ImagePlane.from_attributes([float(x), -90.0, 0.0], AXIAL, [0.7, 0.7], 256, 256) for x in range(6)]
    assert stack_problem(shifted) is not None


def test_a_stack_longer_than_a_spine_is_refused() -> None:
    assert stack_problem([_plane(0.0), _plane(300.0), _plane(700.0)]) == (
        "the slices span 700 mm along the slice normal (at most 600 mm)")


def test_a_few_impossible_images_are_left_out_and_half_of_them_refuse_the_series() -> None:
    good = [_plane(float(z)) for z in range(0, 40, 4)]
    assert screen_series(good) == (list(range(10)), {}, None)
    assert screen_series([]) == ([], {}, None)
    kept, left_out, problem = screen_series([*good[:-1], _plane(36.0, spacing=1e6)])  # one corrupt header
    assert kept == list(range(9)) and list(left_out) == [9] and problem is None
    assert "PixelSpacing 1e+06" in left_out[9]
    kept, left_out, problem = screen_series([_plane(float(z), spacing=1e6) for z in range(0, 20, 4)] + good[5:])
    assert kept == [] and len(left_out) == 5 and problem is not None and problem.startswith("PixelSpacing 1e+06")
    kept, left_out, problem = screen_series([_plane(0.0)] * 9 + [_plane(4.0, spacing=1e6)])
    assert left_out and problem is not None and "9 slices lie at 1 distinct position" in problem


@pytest.fixture(scope="module")
def headers(phantom_dir: Path) -> list[tuple[Dataset, Path]]:
    folder = sorted((phantom_dir / "train_images").iterdir())[0]
    return [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in sorted(folder.rglob("*.dcm"))]


def _defective(headers: list[tuple[Dataset, Path]], defect: Defect,
               description: str = "Axial") -> list[tuple[Dataset, Path]]:
    out, first = [], None
    for ds, path in headers:
        ds = copy.deepcopy(ds)
        if description in str(ds.SeriesDescription):
            first = first or list(ds.ImagePositionPatient)
            apply(defect, ds, first)
        out.append((ds, path))
    return out


@pytest.mark.parametrize(("defect", "why"), [(Defect.HUGE_SPACING, "PixelSpacing 1e+06 x 1e+06 mm"),
                                            (Defect.SAME_POSITION, "at 1 distinct position")])
def test_an_axial_series_with_impossible_geometry_serves_no_role(headers: list, defect: Defect, why: str) -> None:
    assert SeriesRole.AX_T2 in assign_roles(group_series(headers))
    found = group_series(_defective(headers, defect))
    roles = assign_roles(found)
    assert SeriesRole.AX_T2 not in roles and {SeriesRole.SAG_T1, SeriesRole.SAG_T2} <= set(roles)
    [refused] = geometry_refusals(found, SeriesRole.AX_T2)
    assert why in refused
    assert skip_reason(_defective(headers, defect)) is None  # the sagittal series are still graded


def test_a_study_whose_every_series_is_impossible_is_skipped_with_the_reason(headers: list) -> None:
    skip = skip_reason(_defective(headers, Defect.HUGE_SPACING, description=""))
    assert skip is not None and skip.why is SkipReason.NO_SERIES
    assert "implausible geometry: PixelSpacing 1e+06 x 1e+06 mm is outside 0.1 to 5 mm" in str(skip)


def test_secondary_captures_holding_mr_are_never_an_mr_series(headers: list) -> None:
    captured = _defective(headers, Defect.SECONDARY_CAPTURE, description="")
    assert all(ds.Modality == "MR" and ds.SOPClassUID == SecondaryCaptureImageStorage for ds, _ in captured)
    skip = skip_reason(captured)
    assert skip is not None and skip.why is SkipReason.NOT_MR
    assert str(skip) == ("not an MR study (modality MR, SOP class Secondary Capture Image Storage: "
                         "no MR image storage class)")
    assert group_series(captured) == []  # predict's path (no eligibility) takes none of them either
    # mixed in with MR images, the captures are left out and the MR series graded
    mixed = [(ds, p) for ds, p in headers] + [(ds, p) for ds, p in captured if "Axial" in str(ds.SeriesDescription)]
    assert skip_reason(mixed) is None
    assert sum(s.n_images for s in group_series(mixed)) == len(headers)
    assert all(ds.SOPClassUID == MRImageStorage for s in group_series(mixed) for ds, _ in s.instances)
