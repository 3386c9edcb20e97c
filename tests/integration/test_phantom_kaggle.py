"""``lumbar-node phantom --style kaggle``: the same studies as the default style (same seed: same
anatomy, pixels and CSV files), encoded as the RSNA 2024 Kaggle files are, every point of it; with
``--matrix real``, at the real set's image sizes too."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedMRImageStorage, RLELossless

from inference.labels import SeriesRole
from inference.rsna_layout import COORDINATES_CSV, IMAGES_DIR, SERIES_CSV, TRAIN_CSV
from phantom import MatrixSize, make_study
from tests.support.kaggle import KAGGLE_STUDIES, make_kaggle_phantom
from tests.support.tools import PHANTOM_SEED

ABSENT = ("SOPClassUID", "Modality", "BodyPartExamined", "PatientName", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "AccessionNumber", "ScanningSequence", "RepetitionTime", "EchoTime",
          "InversionTime", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "NumberOfFrames")


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kaggle_phantom(tmp_path_factory.mktemp("kaggle"))


def _rows(path: Path, study_ids: set[str]) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row["study_id"] in study_ids]


def test_every_file_is_encoded_as_the_kaggle_files_are(kaggle_dir: Path) -> None:
    _assert_kaggle_encoding(kaggle_dir)


def _assert_kaggle_encoding(kaggle_dir: Path) -> dict[str, dict[str, list[pydicom.Dataset]]]:
    """Every file of the set is encoded as the Kaggle files are; returns the data sets (with pixels)
    by study and series."""
    by_study: dict[str, dict[str, list[pydicom.Dataset]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((kaggle_dir / IMAGES_DIR).rglob("*.dcm")):
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM" and b"\x02\x00\x00\x00UL" not in raw[132:140]  # no group length first
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        assert "FileMetaInformationGroupLength" not in meta
        assert meta.MediaStorageSOPClassUID == EnhancedMRImageStorage and meta.TransferSyntaxUID == RLELossless
        assert not [k for k in ABSENT if k in ds], path
        study_id, series_id = path.parent.parent.name, path.parent.name
        assert ds.PatientID == ds.StudyInstanceUID == study_id
        assert ds.SeriesInstanceUID == f"{study_id}.{series_id}"
        assert ds.SOPInstanceUID == meta.MediaStorageSOPInstanceUID == f"{study_id}.1.{ds.InstanceNumber}"
        assert ds.SeriesDescription in ("T1", "T2")
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11) and ds.pixel_array.max() < 4096
        by_study[study_id][series_id].append(ds)
    assert len(by_study) == KAGGLE_STUDIES
    for series in by_study.values():
        first_images = {s[0].SOPInstanceUID for s in series.values()}
        assert len(first_images) < len(series)  # the same SOP Instance UIDs in every series
        frames = {s[0].FrameOfReferenceUID for s in series.values()}
        assert len(frames) == len(series)  # a frame of reference per series
        assert all(len({ds.FrameOfReferenceUID for ds in s}) == 1 for s in series.values())
    return by_study


def test_the_kaggle_style_differs_from_the_default_in_the_encoding_only(kaggle_dir: Path, phantom_dir: Path) -> None:
    """Same seed, same studies: the same files and CSV rows, the same pixels and geometry; the
    roles stay in train_series_descriptions.csv."""
    kaggle = sorted(p.relative_to(kaggle_dir) for p in (kaggle_dir / IMAGES_DIR).rglob("*.dcm"))
    study_ids = {p.parts[1] for p in kaggle}
    default = sorted(p.relative_to(phantom_dir) for p in (phantom_dir / IMAGES_DIR).rglob("*.dcm")
                     if p.parent.parent.name in study_ids)
    assert kaggle == default
    for name in (TRAIN_CSV, COORDINATES_CSV, SERIES_CSV):
        assert _rows(kaggle_dir / name, study_ids) == _rows(phantom_dir / name, study_ids)
    assert {r["series_description"] for r in _rows(kaggle_dir / SERIES_CSV, study_ids)} <= {
        "Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    for relative in kaggle[::7]:
        ours, theirs = pydicom.dcmread(kaggle_dir / relative), pydicom.dcmread(phantom_dir / relative)
        assert np.array_equal(ours.pixel_array, theirs.pixel_array)
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber"):
            assert ours.get(keyword) == theirs.get(keyword), keyword
        assert theirs.SOPClassUID == theirs.file_meta.MediaStorageSOPClassUID  # the default style is tidy
        assert ours.SeriesDescription == ("T1" if theirs.SeriesDescription == "Sagittal T1" else "T2")


def _roles(data: Path) -> dict[tuple[str, str], str]:
    with open(data / SERIES_CSV, newline="") as f:
        return {(r["study_id"], r["series_id"]): r["series_description"] for r in csv.DictReader(f)}


def test_real_size_files_have_the_real_sets_sizes_and_encoding(kaggle_real_dir: Path) -> None:
    """``--matrix real``: sagittal 384-768 px and 15-20 slices, axial 256-320 px and 40-60 slices
    (both axial series of a study together), square pixels of 0.4-0.7 mm, RLE Lossless, the Kaggle
    quirks; the anatomy shows (not a blank or flat image)."""
    by_study = _assert_kaggle_encoding(kaggle_real_dir)
    roles = _roles(kaggle_real_dir)
    for study_id, series in by_study.items():
        axial_slices = 0
        for series_id, datasets in series.items():
            role = SeriesRole(roles[(study_id, series_id)])
            sizes = {(ds.Rows, ds.Columns) for ds in datasets}
            assert len(sizes) == 1
            rows, columns = sizes.pop()
            assert rows == columns
            if role is SeriesRole.AX_T2:
                assert 256 <= rows <= 320
                axial_slices += len(datasets)
            else:
                assert 384 <= rows <= 768 and 15 <= len(datasets) <= 20, (role, rows, len(datasets))
            for ds in datasets:
                row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
                assert row_mm == col_mm and 0.4 - 1e-6 <= row_mm <= 0.7 + 1e-6
                assert float(ds.SliceThickness) <= float(ds.SpacingBetweenSlices) + 1e-6
            middle = datasets[len(datasets) // 2].pixel_array
            assert middle.std() > 50 and np.percentile(middle, 99) > 400
        assert 40 <= axial_slices <= 62  # two axial series may share a slice or two


def test_real_size_coordinates_point_into_their_images(kaggle_real_dir: Path) -> None:
    """train_label_coordinates.csv x/y are pixels of the instance they name, at the real size, on
    the series of the condition's role."""
    roles = _roles(kaggle_real_dir)
    with open(kaggle_real_dir / COORDINATES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 40
    for row in rows:
        path = kaggle_real_dir / IMAGES_DIR / row["study_id"] / row["series_id"] / f"{row['instance_number']}.dcm"
        ds = pydicom.dcmread(path)
        x, y = float(row["x"]), float(row["y"])
        assert 0 <= x < ds.Columns and 0 <= y < ds.Rows, row
        role = roles[(row["study_id"], row["series_id"])]
        expected = {"Spinal": "Sagittal T2/STIR", "Left Neural": "Sagittal T1", "Right Neural": "Sagittal T1"}
        assert role == next((r for k, r in expected.items() if row["condition"].startswith(k)), "Axial T2"), row


def test_real_size_studies_keep_the_small_studies_labels(kaggle_real_dir: Path, phantom_dir: Path) -> None:
    """The same seed gives the same studies at either size: the same study ids, series and grades
    (the real sizes are drawn from a stream of their own)."""
    study_ids = {p.name for p in (kaggle_real_dir / IMAGES_DIR).iterdir()}
    assert len(study_ids) == 2
    for name in (TRAIN_CSV, SERIES_CSV):
        assert _rows(kaggle_real_dir / name, study_ids) == _rows(phantom_dir / name, study_ids)
    def labelled(data: Path) -> list[tuple[str, str, str]]:
        return [(r["study_id"], r["condition"], r["level"]) for r in _rows(data / COORDINATES_CSV, study_ids)]

    assert labelled(kaggle_real_dir) == labelled(phantom_dir)


def test_the_real_size_preview_is_a_picture(kaggle_real_dir: Path) -> None:
    import cv2

    img = cv2.imread(str(kaggle_real_dir / "preview.png"))
    assert img is not None and img.shape[0] > 600 and img.shape[1] > 600 and img.std() > 20


def test_real_sizes_over_many_studies() -> None:
    """60 studies without pixels: every size in its range, and both axial kinds (angled stacks, one block)."""
    sagittal, axial, spacing = set(), set(), []
    for index in range(60):
        study = make_study(PHANTOM_SEED, index, render=False, matrix=MatrixSize.REAL)
        small = make_study(PHANTOM_SEED, index, render=False)
        assert [s.series_id for s in study.series] == [s.series_id for s in small.series]
        assert study.labels == small.labels
        n_axial = 0
        for spec in study.series:
            plane = spec.planes[0]
            spacing.append(plane.row_spacing)
            if spec.role is SeriesRole.AX_T2:
                axial.add(plane.rows)
                n_axial += len(spec.planes)
            else:
                sagittal.add(plane.rows)
                assert 15 <= len(spec.planes) <= 20
            assert spec.thickness <= spec.spacing + 1e-9
        if any(s.role is SeriesRole.AX_T2 for s in study.series):
            assert 40 <= n_axial <= 62
    assert sagittal <= {384, 448, 512, 640, 768} and {384, 512} <= sagittal
    assert axial <= {256, 288, 320} and len(axial) >= 2
    assert min(spacing) >= 0.4 and max(spacing) <= 0.7
