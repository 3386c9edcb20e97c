"""The phantom writes the RSNA 2024 layout as valid DICOM, deterministically, with the real quirks."""

from __future__ import annotations

import csv
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from inference.geometry import ImagePlane, classify_orientation
from inference.labels import (
    LABEL_COLUMNS,
    LEVELS,
    ConditionGroup,
    SeriesRole,
    Side,
    parse_condition,
    parse_level,
)
from phantom import make_study
from tests.support.tools import PHANTOM_SEED, PHANTOM_STUDIES, require_tool


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_csv_files_have_the_rsna_columns_and_spellings(phantom_dir: Path) -> None:
    assert _header(phantom_dir / "train.csv") == ["study_id", *LABEL_COLUMNS]
    assert _header(phantom_dir / "train_label_coordinates.csv") == [
        "study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    assert _header(phantom_dir / "train_series_descriptions.csv") == ["study_id", "series_id", "series_description"]

    train = _rows(phantom_dir / "train.csv")
    assert len(train) == PHANTOM_STUDIES
    values = {row[c] for row in train for c in LABEL_COLUMNS}
    assert values <= {"Normal/Mild", "Moderate", "Severe", ""}
    assert "Normal/Mild" in values

    for row in _rows(phantom_dir / "train_series_descriptions.csv"):
        assert row["series_description"] in {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    for row in _rows(phantom_dir / "train_label_coordinates.csv"):
        parse_condition(row["condition"])  # raises on a misspelling
        parse_level(row["level"])
        float(row["x"]), float(row["y"])


def test_every_coordinate_points_into_an_existing_image_of_the_right_series(phantom_dir: Path) -> None:
    descriptions = {(r["study_id"], r["series_id"]): r["series_description"]
                    for r in _rows(phantom_dir / "train_series_descriptions.csv")}
    coords = _rows(phantom_dir / "train_label_coordinates.csv")
    assert coords
    for row in coords:
        path = phantom_dir / "train_images" / row["study_id"] / row["series_id"] / f"{row['instance_number']}.dcm"
        assert path.is_file(), path
        condition = parse_condition(row["condition"])
        assert descriptions[(row["study_id"], row["series_id"])] == condition.series_role.value
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert 0 <= float(row["x"]) < ds.Columns and 0 <= float(row["y"]) < ds.Rows


def test_files_are_mr_images_with_consistent_study_geometry(phantom_dir: Path) -> None:
    studies = sorted((phantom_dir / "train_images").iterdir())
    assert len(studies) == PHANTOM_STUDIES
    for study in studies:
        frames, study_uids, patients = set(), set(), set()
        for series in study.iterdir():
            datasets = [pydicom.dcmread(f) for f in series.glob("*.dcm")]
            assert datasets
            numbers = sorted(int(ds.InstanceNumber) for ds in datasets)
            assert numbers == list(range(1, len(datasets) + 1))
            assert {f.stem for f in series.glob("*.dcm")} == {str(n) for n in numbers}
            assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
            assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
            for ds in datasets:
                assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert ds.Modality == "MR" and ds.PatientName.family_name == "PHANTOM"
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
                assert ds.pixel_array.max() > 200  # not blank
                frames.add(ds.FrameOfReferenceUID)
                study_uids.add(ds.StudyInstanceUID)
                patients.add(ds.PatientID)
            orientation = classify_orientation(datasets[0].ImageOrientationPatient)
            expected = "axial" if datasets[0].SeriesDescription == "Axial T2" else "sagittal"
            assert orientation == expected
        assert len(frames) == len(study_uids) == len(patients) == 1


def test_every_file_passes_dciodvfy(phantom_dir: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    files = sorted((phantom_dir / "train_images").rglob("*.dcm"))
    failures = []
    for f in files:
        out = subprocess.run([dciodvfy, "-new", str(f)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        if errors:
            failures.append(f"{f}: {errors[:3]}")
    assert not failures, "\n".join(failures[:10])
    assert len(files) > 40 * PHANTOM_STUDIES


def test_the_preview_is_a_picture(phantom_dir: Path) -> None:
    import cv2

    img = cv2.imread(str(phantom_dir / "preview.png"))
    assert img is not None and img.shape[0] > 600 and img.shape[1] > 600
    assert img.std() > 20  # images, not an empty canvas


def test_same_seed_same_study_other_seed_other_study() -> None:
    a, b, c = make_study(3, 1), make_study(3, 1), make_study(4, 1)
    assert a.study_id == b.study_id != c.study_id
    for spec_a, spec_b in zip(a.series, b.series, strict=True):
        for img_a, img_b in zip(a.pixels[spec_a.series_id], b.pixels[spec_b.series_id], strict=True):
            assert np.array_equal(img_a, img_b)
    assert [(r.series_id, r.instance_number, r.x, r.y) for r in a.coordinates] == [
        (r.series_id, r.instance_number, r.x, r.y) for r in b.coordinates]
    ds_a = next(iter(a.datasets()))[1]
    ds_b = next(iter(b.datasets()))[1]
    assert ds_a.SOPInstanceUID == ds_b.SOPInstanceUID and ds_a.PixelData == ds_b.PixelData


def test_study_set_has_rsna_like_grades_and_the_real_quirks() -> None:
    """300 studies without pixels: the label distribution and the quirks of the real data."""
    grades: dict[ConditionGroup, Counter[int]] = {g: Counter() for g in ConditionGroup}
    missing_series = two_axial = out_of_order = missing_labels = 0
    for i in range(300):
        st = make_study(PHANTOM_SEED, i, render=False)
        roles = [s.role for s in st.series]
        missing_series += len(set(roles)) < 3
        two_axial += roles.count(SeriesRole.AX_T2) == 2
        for spec in st.series:
            positions = [float(p.position @ spec.planes[0].normal) for p in spec.planes]
            by_number = [positions[spec.instance_numbers.index(n)] for n in sorted(spec.instance_numbers)]
            out_of_order += not (np.all(np.diff(by_number) > 0) or np.all(np.diff(by_number) < 0))
        for label, grade in st.labels.items():
            if grade is None:
                missing_labels += 1
            else:
                grades[label.condition.group][grade.value] += 1
        # a missing series removes exactly the coordinates of the conditions read on it
        present = set(roles)
        assert {c.label.condition.series_role for c in st.coordinates} <= present
    for group, counts in grades.items():
        assert counts[0] > 0.55 * sum(counts.values()), group
        assert counts[0] > counts[1] > counts[2] > 0, (group, counts)
    assert 1 <= missing_series <= 30
    assert 5 <= two_axial <= 50
    assert out_of_order >= 5
    assert 10 <= missing_labels <= 200


def test_levels_run_head_to_feet_and_left_is_patient_left() -> None:
    st = make_study(PHANTOM_SEED, 2, render=False)
    z = [st.anatomy.canal_point(level)[2] for level in LEVELS]
    assert all(np.diff(z) < 0)  # LPS: +z is head, so L1/L2 is above L5/S1
    left = st.anatomy.foramen_point(LEVELS[2], Side.LEFT)
    right = st.anatomy.foramen_point(LEVELS[2], Side.RIGHT)
    assert left[0] - right[0] > 20  # LPS: +x is the patient's left


@pytest.mark.parametrize("index", range(4))
def test_sagittal_slices_sorted_by_position_cover_both_foramina(index: int) -> None:
    st = make_study(PHANTOM_SEED, index, render=False)
    for spec in st.series:
        if spec.role is SeriesRole.AX_T2:
            continue
        planes: list[ImagePlane] = spec.planes
        lr = [float(p.center[0]) for p in planes]
        assert min(lr) < st.anatomy.foramen_point(LEVELS[0], Side.RIGHT)[0]
        assert max(lr) > st.anatomy.foramen_point(LEVELS[0], Side.LEFT)[0]
