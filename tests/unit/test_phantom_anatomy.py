"""The phantom's pixels show its grades, and its labels and geometry agree with its anatomy.

Measurements are made on the written DICOM files (pixels and geometry read back with pydicom),
with the phantom's own anatomy regenerated from the seed only to know where the structures are.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.geometry import ImagePlane, nearest_plane
from inference.labels import (
    LEVELS,
    SPINAL,
    ConditionGroup,
    Label,
    SeriesRole,
    Severity,
    Side,
    parse_condition,
    parse_level,
)
from inference.rsna_layout import Coordinate
from phantom import PhantomStudy, make_study
from phantom.anatomy import disc_index, region_of
from tests.support.tools import PHANTOM_SEED, PHANTOM_STUDIES

# Extra studies (pixels in memory only) so that every grade is measured often enough.
MEASURED_STUDIES = 24


@cache
def _study(index: int) -> PhantomStudy:
    return make_study(PHANTOM_SEED, index)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x0 = np.clip(np.floor(x).astype(int), 0, img.shape[1] - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, img.shape[0] - 2)
    fx, fy = x - x0, y - y0
    img = img.astype(np.float64)
    return ((img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx) * (1 - fy)
            + (img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx) * fy)


def _image(study: PhantomStudy, series_id: int, instance: int) -> tuple[np.ndarray, ImagePlane]:
    spec = next(s for s in study.series if s.series_id == series_id)
    i = spec.instance_numbers.index(instance)
    return study.pixels[series_id][i], spec.planes[i]


def _disc_values(img: np.ndarray, plane: ImagePlane, centre: np.ndarray, radius_mm: float) -> np.ndarray:
    """Pixel values within a disc of ``radius_mm`` around a patient point (projected on the plane)."""
    cx, cy, _ = plane.to_pixel(centre)
    r = radius_mm / plane.row_spacing
    ys, xs = np.mgrid[int(cy - r): int(cy + r) + 2, int(cx - r): int(cx + r) + 2]
    inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    return img[ys[inside].clip(0, img.shape[0] - 1), xs[inside].clip(0, img.shape[1] - 1)].astype(float)


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _by_grade(pairs: list[tuple[Severity, float]]) -> dict[Severity, float]:
    return {g: float(np.mean([v for s, v in pairs if s is g])) for g in Severity if any(s is g for s, _ in pairs)}


def _measure(group: ConditionGroup,
             measure: Callable[[PhantomStudy, Coordinate], float]) -> list[tuple[Severity, float]]:
    pairs = []
    for index in range(MEASURED_STUDIES):
        st = _study(index)
        for c in st.coordinates:
            grade = st.labels[c.label]
            if c.label.condition.group is group and grade is not None:
                pairs.append((grade, measure(st, c)))
    return pairs


def _csf_width(st: PhantomStudy, c: Coordinate) -> float:
    """AP width (mm) of bright CSF through the labelled point on the Sagittal T2/STIR image."""
    img, plane = _image(st, c.series_id, c.instance_number)
    anat = st.anatomy
    s = float(anat.disc_center[disc_index(c.label.level)])
    centre = plane.to_patient(c.x, c.y)
    normal = anat.to_patient(0, s, 1.0) - anat.to_patient(0, s, 0.0)  # posterior, 1 mm
    # Reference CSF signal: the canal at the middle of the vertebral bodies above and below.
    refs = []
    for ds in (-0.5, 0.5):
        k = disc_index(c.label.level)
        body_mid = anat.body_top[k + (ds > 0)] + anat.body_h[k + (ds > 0)] / 2
        x, y, _ = plane.to_pixel(anat.to_patient(0, float(body_mid), 0.5 * float(anat.canal_ap.mean())))
        refs.append(np.percentile(_disc_values(img, plane, plane.to_patient(x, y), 3.0), 90))
    steps = np.arange(-12.0, 12.0, 0.25)
    pts = centre + steps[:, None] * normal
    x, y, _ = plane.to_pixel(pts)
    profile = _bilinear(img, x, y)
    return float((profile > 0.5 * max(refs)).sum() * 0.25)


def test_canal_csf_width_shrinks_with_the_spinal_grade() -> None:
    pairs = _measure(ConditionGroup.SPINAL, _csf_width)
    means = _by_grade(pairs)
    assert set(means) == set(Severity), means
    assert means[Severity.NORMAL_MILD] > means[Severity.MODERATE] > means[Severity.SEVERE], means
    assert means[Severity.NORMAL_MILD] - means[Severity.SEVERE] > 4.0, means  # millimetres
    assert _spearman([g.value for g, _ in pairs], [v for _, v in pairs]) < -0.5


def _bright_fraction(st: PhantomStudy, c: Coordinate, radius: float) -> float:
    """Share of bright pixels (fat on T1 / CSF and fat on T2) around a labelled point."""
    img, plane = _image(st, c.series_id, c.instance_number)
    centre = plane.to_patient(c.x, c.y)
    ref = np.percentile(_disc_values(img, plane, centre, 30.0), 99)
    return float((_disc_values(img, plane, centre, radius) > 0.55 * ref).mean())


def test_foraminal_fat_is_effaced_with_the_foraminal_grade() -> None:
    pairs = _measure(ConditionGroup.FORAMINAL, lambda st, c: _bright_fraction(st, c, 4.0))
    means = _by_grade(pairs)
    assert means[Severity.NORMAL_MILD] > means[Severity.MODERATE] > means[Severity.SEVERE], means
    assert _spearman([g.value for g, _ in pairs], [v for _, v in pairs]) < -0.4


def test_lateral_recess_narrows_with_the_subarticular_grade() -> None:
    pairs = _measure(ConditionGroup.SUBARTICULAR, lambda st, c: _bright_fraction(st, c, 3.5))
    means = _by_grade(pairs)
    assert means[Severity.NORMAL_MILD] > means[Severity.MODERATE] > means[Severity.SEVERE], means
    assert _spearman([g.value for g, _ in pairs], [v for _, v in pairs]) < -0.4


# ---- labels and geometry, read back from the written files ----------------------------------------


def _coordinate_rows(phantom_dir: Path) -> list[dict[str, str]]:
    with open(phantom_dir / "train_label_coordinates.csv", newline="") as f:
        return list(csv.DictReader(f))


def _patient_point(phantom_dir: Path, row: dict[str, str]) -> tuple[np.ndarray, ImagePlane]:
    path = phantom_dir / "train_images" / row["study_id"] / row["series_id"] / f"{row['instance_number']}.dcm"
    plane = ImagePlane.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
    return plane.to_patient(float(row["x"]), float(row["y"])), plane


@cache
def _anatomy_by_study_id() -> dict[str, PhantomStudy]:
    studies = [make_study(PHANTOM_SEED, i, render=False) for i in range(PHANTOM_STUDIES)]
    return {str(st.study_id): st for st in studies}


def test_labelled_points_project_into_the_labelled_structure(phantom_dir: Path) -> None:
    rows = _coordinate_rows(phantom_dir)
    by_id = _anatomy_by_study_id()
    wrong = []
    for row in rows:
        condition, level = parse_condition(row["condition"]), parse_level(row["level"])
        point, _ = _patient_point(phantom_dir, row)
        region = region_of(by_id[row["study_id"]].anatomy, point[None])[0]
        side = condition.side.value if condition.side else None
        expected = {
            ConditionGroup.SPINAL: "canal",
            ConditionGroup.FORAMINAL: f"foramen-{side}",
            ConditionGroup.SUBARTICULAR: f"recess-{side}",
        }[condition.group]
        if region != f"{expected}@{level.value}":
            wrong.append((row["study_id"], row["condition"], row["level"], region))
    assert len(rows) > 20 * PHANTOM_STUDIES
    assert not wrong, wrong[:10]


def test_axial_slice_found_through_patient_geometry_crosses_the_disc(phantom_dir: Path) -> None:
    """From the canal point on Sagittal T2 to the Axial T2 slice of that level, using only the files."""
    rows = _coordinate_rows(phantom_dir)
    by_id = _anatomy_by_study_id()
    checked = 0
    for study_id, st in by_id.items():
        axial_ids = [str(s.series_id) for s in st.series if s.role is SeriesRole.AX_T2]
        if not axial_ids:
            continue
        planes, names = [], []
        for series_id in axial_ids:
            for f in (phantom_dir / "train_images" / study_id / series_id).glob("*.dcm"):
                planes.append(ImagePlane.from_dataset(pydicom.dcmread(f, stop_before_pixels=True)))
                names.append((series_id, f.stem))
        for row in rows:
            if row["study_id"] != study_id or parse_condition(row["condition"]) != SPINAL:
                continue
            level = parse_level(row["level"])
            canal, _ = _patient_point(phantom_dir, row)
            best, distance = nearest_plane(planes, canal)
            # the projection of the canal point onto the chosen slice lies within that disc
            x, y, _ = planes[best].to_pixel(canal)
            _, s, _ = st.anatomy.to_spine(planes[best].to_patient(x, y)[None])
            k = disc_index(level)
            assert abs(float(s[0]) - st.anatomy.disc_center[k]) < st.anatomy.disc_h[k] / 2, (study_id, level)
            assert distance < 4.0
            # and it is the slice the subarticular labels of that level were marked on (or one as
            # near: the sagittal point lies up to half a sagittal slice gap off the midline)
            marked = {(r["series_id"], r["instance_number"]) for r in rows if r["study_id"] == study_id
                      and parse_level(r["level"]) is level
                      and parse_condition(r["condition"]).group is ConditionGroup.SUBARTICULAR}
            for name in marked:
                plane = planes[names.index(name)]
                assert abs(float((canal - plane.position) @ plane.normal)) < distance + 0.5, (study_id, level)
            checked += 1
    assert checked >= 3 * len(LEVELS)


@pytest.mark.parametrize("side", list(Side))
def test_foramen_labels_are_on_the_parasagittal_slice_of_their_side(phantom_dir: Path, side: Side) -> None:
    rows = [r for r in _coordinate_rows(phantom_dir)
            if parse_condition(r["condition"]).group is ConditionGroup.FORAMINAL
            and parse_condition(r["condition"]).side is side]
    assert rows
    for row in rows:
        point, plane = _patient_point(phantom_dir, row)
        st = _anatomy_by_study_id()[row["study_id"]]
        x, _, _ = st.anatomy.to_spine(point[None])
        assert (x[0] > 0) == (side is Side.LEFT)  # +x is the patient's left (LPS)
        label = Label(parse_condition(row["condition"]), parse_level(row["level"]))
        truth = st.anatomy.label_point(label)
        assert abs(float((truth - plane.position) @ plane.normal)) < 3.0  # the nearest slice
