"""Series roles from headers and geometry, volumes sorted by position, crops at physical scale."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.labels import LEVELS, SeriesRole, Side
from inference.preprocess import (
    HEAD,
    LEFT,
    POSTERIOR,
    CropSpec,
    crop_25d,
    intensity_of,
    sample_slice,
)
from inference.series import assign_roles, contrast_of, group_series
from inference.volume import load_volume
from phantom import PhantomStudy, make_study, write_study


def _study_with(predicate: Callable[[PhantomStudy], bool], render: bool = True) -> PhantomStudy:
    for i in range(200):
        st = make_study(77, i, render=False)
        if predicate(st):
            return make_study(77, i) if render else st
    raise AssertionError("no such phantom study in 200")


def _headers(folder: Path, strip_descriptions: bool = False) -> list[tuple[pydicom.Dataset, Path]]:
    out = []
    for f in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if strip_descriptions:
            for kw in ("SeriesDescription", "ProtocolName", "BodyPartExamined"):
                if kw in ds:
                    delattr(ds, kw)
        out.append((ds, f))
    return out


@pytest.fixture(scope="module")
def two_axial(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomStudy, Path]:
    st = _study_with(lambda s: [x.role for x in s.series].count(SeriesRole.AX_T2) == 2 and len(s.series) == 4)
    root = tmp_path_factory.mktemp("two_axial")
    write_study(st, root)
    return st, root / "train_images" / str(st.study_id)


def test_roles_come_from_geometry_and_sequence_not_descriptions(two_axial: tuple[PhantomStudy, Path]) -> None:
    _, folder = two_axial
    roles = assign_roles(group_series(_headers(folder, strip_descriptions=True)))
    assert set(roles) == set(SeriesRole)
    assert len(roles[SeriesRole.AX_T2]) == 2  # both axial series are kept, to be merged
    by_uid = {s.series_uid: s for ss in roles.values() for s in ss}
    assert len(by_uid) == 4


def test_contrast_from_sequence_parameters() -> None:
    ds = pydicom.Dataset()
    ds.ScanningSequence, ds.RepetitionTime, ds.EchoTime = "SE", 550, 10
    assert contrast_of(ds) == "T1"
    ds.RepetitionTime, ds.EchoTime = 4000, 100
    assert contrast_of(ds) == "T2"
    ds.ScanningSequence, ds.InversionTime, ds.EchoTime = ["IR", "SE"], 150, 50
    assert contrast_of(ds) == "STIR"
    bare = pydicom.Dataset()
    bare.SeriesDescription = "SAG T1 TSE"
    assert contrast_of(bare) == "T1"
    assert contrast_of(pydicom.Dataset()) is None


def test_merged_axial_volume_is_sorted_by_position_not_instance_number(two_axial: tuple[PhantomStudy, Path]) -> None:
    st, folder = two_axial
    roles = assign_roles(group_series(_headers(folder)))
    vol = load_volume(SeriesRole.AX_T2, roles[SeriesRole.AX_T2])
    assert len(vol.slices) == sum(len(s.planes) for s in st.series if s.role is SeriesRole.AX_T2)
    assert len({s.series_uid for s in vol.slices}) == 2
    # head to feet along the spine: each level's disc is reached in order
    found = [vol.nearest(st.anatomy.canal_point(level))[0] for level in LEVELS]
    head_first = vol.slices[0].plane.position[2] > vol.slices[-1].plane.position[2]
    assert found == sorted(found, reverse=not head_first)


def test_reversed_instance_numbers_do_not_change_the_order(tmp_path: Path) -> None:
    st = _study_with(lambda s: any(x.instance_numbers[0] > x.instance_numbers[-1] for x in s.series))
    write_study(st, tmp_path)
    roles = assign_roles(group_series(_headers(tmp_path)))
    for role, series in roles.items():
        vol = load_volume(role, series)
        normal = vol.slices[0].plane.normal
        positions = [float(s.plane.position @ normal) for s in vol.slices]
        if role is not SeriesRole.AX_T2:
            assert np.all(np.diff(positions) > 0)


def test_crop_equals_the_image_window_when_axes_and_scale_match(two_axial: tuple[PhantomStudy, Path]) -> None:
    _, folder = two_axial
    roles = assign_roles(group_series(_headers(folder)))
    vol = load_volume(SeriesRole.SAG_T2, roles[SeriesRole.SAG_T2])
    intensity = intensity_of(vol)
    sl = vol.slices[len(vol.slices) // 2]
    plane = sl.plane
    cx, cy = plane.columns // 2, plane.rows // 2
    center = plane.to_patient(cx, cy)
    spec = CropSpec(size_mm=33 * plane.col_spacing, pixels=33, n_slices=1)  # odd: centres on pixels
    crop = sample_slice(sl, center, plane.row_dir, plane.col_dir, spec, intensity)
    expected = intensity.apply(sl.pixels[cy - 16: cy + 17, cx - 16: cx + 17])
    assert np.allclose(crop, expected, atol=1e-4)
    mirrored = sample_slice(sl, center, -plane.row_dir, plane.col_dir, spec, intensity)
    assert np.allclose(mirrored, crop[:, ::-1], atol=1e-4)


def test_25d_crop_channels_follow_the_across_direction(two_axial: tuple[PhantomStudy, Path]) -> None:
    st, folder = two_axial
    roles = assign_roles(group_series(_headers(folder)))
    vol = load_volume(SeriesRole.SAG_T1, roles[SeriesRole.SAG_T1])
    intensity = intensity_of(vol)
    center = st.anatomy.foramen_point(LEVELS[3], Side.LEFT)
    spec = CropSpec(size_mm=40, pixels=48, n_slices=3)
    to_left = crop_25d(vol, center, POSTERIOR, -HEAD, LEFT, spec, intensity)
    to_right = crop_25d(vol, center, POSTERIOR, -HEAD, -LEFT, spec, intensity)
    assert to_left.shape == (3, 48, 48)
    assert np.allclose(to_left[1], to_right[1]) and np.allclose(to_left[0], to_right[2])
    assert not np.allclose(to_left[0], to_left[2])


def test_localiser_inputs_for_all_slices_equal_the_per_slice_inputs(two_axial: tuple[PhantomStudy, Path]) -> None:
    from inference.levels import localiser_input, localiser_inputs

    _, folder = two_axial
    roles = assign_roles(group_series(_headers(folder)))
    vol = load_volume(SeriesRole.SAG_T2, roles[SeriesRole.SAG_T2])
    intensity = intensity_of(vol)
    for i, batch in enumerate(localiser_inputs(vol, intensity)):
        single = localiser_input(vol, intensity, index=i)
        assert np.array_equal(batch.image, single.image)
        assert np.allclose(batch.frame.center, single.frame.center)
