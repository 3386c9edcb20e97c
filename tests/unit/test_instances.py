"""What the analysis asks of any header, on headers as untidy as real exports: the SOP class only in
the file meta (the RSNA Kaggle files), no Modality, malformed InstanceNumber, SOPInstanceUIDs that
repeat across series, one image of a series that cannot be decoded."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from inference.instances import (
    is_mr,
    is_single_frame_image,
    read_headers,
    sop_class_uid,
)
from inference.labels import SeriesRole
from inference.series import assign_roles, group_series, log_untidy_uids
from inference.volume import instance_number, load_volume


def _kaggle_like(path: Path) -> Dataset:
    """A phantom image re-encoded as the Kaggle files are: SOP class in the file meta only, no Modality."""
    ds = pydicom.dcmread(path)
    del ds.SOPClassUID
    del ds.Modality
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    return ds


def test_sop_class_comes_from_the_file_meta_when_the_data_set_has_none(phantom_dir: Path) -> None:
    path = next((phantom_dir / "train_images").rglob("*.dcm"))
    ds = _kaggle_like(path)
    assert "SOPClassUID" not in ds
    assert sop_class_uid(ds) == EnhancedMRImageStorage
    assert is_mr(ds)  # no Modality, but an MR SOP class
    assert is_single_frame_image(ds)  # labelled Enhanced MR, shaped as a classic image
    bare = Dataset()
    assert sop_class_uid(bare) == "" and not is_mr(bare)
    ct = Dataset()
    ct.Modality = "CT"
    ct.file_meta = FileMetaDataset()
    ct.file_meta.MediaStorageSOPClassUID = MRImageStorage
    assert not is_mr(ct)  # Modality wins where it is present
    enhanced = copy.deepcopy(ds)
    enhanced.PerFrameFunctionalGroupsSequence = []
    assert not is_single_frame_image(enhanced)


def test_read_headers_fills_the_sop_class_from_the_meta_and_says_so(phantom_dir: Path, tmp_path: Path) -> None:
    sources = sorted((phantom_dir / "train_images").rglob("*.dcm"))[:3]
    paths = []
    for i, path in enumerate(sources):
        out = tmp_path / f"{i}.dcm"
        _kaggle_like(path).save_as(out, enforce_file_format=False)
        paths.append(out)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with structlog.testing.capture_logs() as logs:
        headers = read_headers([*paths, tmp_path / ".DS_Store"])
    assert [p for _, p in headers] == paths  # the stray file left out
    assert all(str(ds.SOPClassUID) == EnhancedMRImageStorage for ds, _ in headers)
    assert any(e["event"].startswith("SOP class taken from the file meta") and e["instances"] == 3 for e in logs)


def test_instance_number_that_is_not_a_number_is_zero() -> None:
    ds = Dataset()
    assert instance_number(ds) == 0
    ds.InstanceNumber = 7
    assert instance_number(ds) == 7
    raw = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_with_raw_instance_number(b"1\\2 ")), force=True)
    assert instance_number(raw) == 0


def _with_raw_instance_number(value: bytes) -> bytes:
    """An implicit-VR data set holding only InstanceNumber (0020,0013) with these raw bytes."""
    return b"\x20\x00\x13\x00" + len(value).to_bytes(4, "little") + value


def _series_headers(phantom_dir: Path) -> list[tuple[Dataset, Path]]:
    study = min((phantom_dir / "train_images").iterdir())
    return [(pydicom.dcmread(p), p) for p in sorted(study.rglob("*.dcm"))]


def test_repeated_sop_instance_uids_across_series_are_kept_and_logged(phantom_dir: Path) -> None:
    headers = _series_headers(phantom_dir)
    by_series: dict[str, int] = {}
    for ds, _ in headers:  # Kaggle style: "<study>.<series_no>.<n>" in every series
        n = by_series[str(ds.SeriesInstanceUID)] = by_series.get(str(ds.SeriesInstanceUID), 0) + 1
        ds.SOPInstanceUID = f"1.2.3.{n}"
    series = group_series(headers)
    assert sum(s.n_images for s in series) == len(headers)  # nothing lost
    with structlog.testing.capture_logs() as logs:
        log_untidy_uids(series)
    assert any(e["event"].startswith("SOPInstanceUIDs repeat across series") for e in logs)
    frames = {str(ds.FrameOfReferenceUID) for ds, _ in headers}
    series_numbers = {uid: i for i, uid in enumerate(by_series)}
    for ds, _ in headers:  # and a frame of reference per series, as the Kaggle files have
        ds.FrameOfReferenceUID = f"1.2.4.{series_numbers[str(ds.SeriesInstanceUID)] + 1}"
    with structlog.testing.capture_logs() as logs:
        log_untidy_uids(group_series(headers))
    assert len(frames) == 1 and any("FrameOfReferenceUIDs" in e["event"] for e in logs)


def test_one_undecodable_image_is_left_out_not_its_series(phantom_dir: Path) -> None:
    headers = _series_headers(phantom_dir)
    roles = assign_roles(group_series(headers))
    sagittal = roles[SeriesRole.SAG_T2][0]
    whole = load_volume(SeriesRole.SAG_T2, [sagittal])
    broken = copy.deepcopy(sagittal)
    ds = pydicom.dcmread(broken.instances[2][1])
    ds.PixelData = ds.PixelData[:100]  # truncated pixels
    ds.InstanceNumber = None
    broken.instances[2] = (ds, None)
    with structlog.testing.capture_logs() as logs:
        volume = load_volume(SeriesRole.SAG_T2, [broken])
    assert len(volume.slices) == len(whole.slices) - 1
    assert any(e["event"] == "images left out: not decodable" and e["images"] == 1 for e in logs)
    with pytest.raises(ValueError, match="no usable images"):
        load_volume(SeriesRole.SAG_T2, [type(broken)(broken.series_uid, "", "sagittal", "T2",
                                                      [(_rows_missing(h, p), None) for h, p in broken.instances])])


def _rows_missing(header: Dataset, path: Path | None) -> Dataset:
    ds = pydicom.dcmread(path) if path is not None else copy.deepcopy(header)
    del ds.Rows
    return ds
