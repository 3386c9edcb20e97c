"""``lumbar-node phantom --style kaggle``: the same studies as the default style (same seed: same
anatomy, pixels and CSV files), encoded as the RSNA 2024 Kaggle files are, every point of it."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedMRImageStorage, RLELossless

from inference.rsna_layout import COORDINATES_CSV, IMAGES_DIR, SERIES_CSV, TRAIN_CSV
from tests.support.kaggle import KAGGLE_STUDIES, make_kaggle_phantom

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
