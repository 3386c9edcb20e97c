"""Which studies the node grades, and which callers it accepts (unit tests on phantom headers)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.config import load_settings
from dicom_node.dicom.scp import StorageSCP
from dicom_node.ingest.checks import reopens_study
from dicom_node.pipeline.eligibility import Skip, has_all_roles, nothing_assessed, skip_reason
from dicom_node.states import SkipReason
from dicom_node.store.ledger import Ledger
from inference.analyze import AssessedLabel, LabelResult, Location, NotAssessedLabel, NotAssessedReason, StudyResult
from inference.labels import LABELS
from inference.model import ModelInfo


@pytest.fixture(scope="module")
def headers(phantom_dir: Path) -> list[tuple[pydicom.Dataset, Path]]:
    folder = sorted((phantom_dir / "train_images").iterdir())[0]
    return [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in sorted(folder.rglob("*.dcm"))]


def _with(headers: list[tuple[pydicom.Dataset, Path]], **values: str) -> list[tuple[pydicom.Dataset, Path]]:
    changed = []
    for ds, path in headers:
        ds = copy.deepcopy(ds)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        changed.append((ds, path))
    return changed


def test_a_lumbar_mri_is_graded_and_other_studies_are_skipped_with_the_reason(headers: list) -> None:
    assert skip_reason(headers) is None
    assert skip_reason(_with(headers, Modality="CT")) == Skip(SkipReason.NOT_MR, "modality CT")
    assert str(skip_reason(_with(headers, Modality="CT"))) == "not an MR study (modality CT)"
    assert str(skip_reason(_with(headers, BodyPartExamined="HEAD"))) == \
        "not a lumbar spine study (BodyPartExamined HEAD)"
    coronal = skip_reason(_with(headers, ImageOrientationPatient=[1, 0, 0, 0, 0, -1], SeriesDescription="Coronal T2"))
    assert str(coronal) == "no Sagittal T1, Sagittal T2/STIR or Axial T2 series found"
    assert skip_reason([]) == Skip(SkipReason.NO_INSTANCES)
    assert str(skip_reason([])) == "no readable DICOM instances"


def test_kaggle_files_without_modality_are_mr_by_their_sop_class(headers: list) -> None:
    bare = []
    for ds, path in headers:
        ds = copy.deepcopy(ds)
        del ds.Modality, ds.BodyPartExamined
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # what read_headers takes from the Kaggle file meta
        bare.append((ds, path))
    assert skip_reason(bare) is None
    for ds, _ in bare:  # and with no SOP class anywhere, nothing says it is MR
        del ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID
    assert skip_reason(bare) == Skip(SkipReason.NOT_MR, "modality none")


def _result(labels: tuple[LabelResult, ...]) -> StudyResult:
    return StudyResult("1.2.3", labels, ModelInfo(None, ""), {}, {}, {})  # type: ignore[arg-type]  # no model needed


def test_a_study_of_which_nothing_was_assessed_gets_no_report() -> None:
    missing = [NotAssessedLabel(lb, NotAssessedReason.MISSING_SERIES, f"no {lb.condition.series_role.value} series")
               for lb in LABELS[:10]]
    uncovered = [NotAssessedLabel(lb, NotAssessedReason.NOT_COVERED, f"{lb.level.value} is not covered")
                 for lb in LABELS[10:]]
    skip = nothing_assessed(_result((*missing, *uncovered)))
    assert skip is not None and skip.why is SkipReason.NOTHING_ASSESSED
    assert str(skip) == ("nothing could be assessed (no Sagittal T2/STIR series: 5 labels; no Sagittal T1 series: "
                         "5 labels; level not covered: 15 labels)")
    location = Location("1.2", "1.2.1", "1.2.840.10008.5.1.4.1.1.4", 1, (0.0, 0.0), (0.0, 0.0, 0.0),
                        None)  # type: ignore[arg-type]  # no crop frame: nothing here draws the heatmap
    one_graded = AssessedLabel(LABELS[0], (0.8, 0.1, 0.1), location, np.zeros((6, 6), np.float32))
    assert nothing_assessed(_result((one_graded, *missing[1:], *uncovered))) is None


def test_complete_needs_all_three_series_roles(headers: list) -> None:
    one_per_series = list({str(ds.SeriesInstanceUID): ds for ds, _ in headers}.values())
    assert has_all_roles(one_per_series) is (len({ds.SeriesDescription for ds in one_per_series}) >= 3)
    sagittal_only = [ds for ds in one_per_series if "Sagittal" in ds.SeriesDescription]
    assert not has_all_roles(sagittal_only)


def test_results_coming_back_do_not_reopen_a_study() -> None:
    assert reopens_study("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    assert not reopens_study("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
    assert not reopens_study("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    assert not reopens_study("1.2.840.10008.5.1.4.1.1.104.1")  # Encapsulated PDF (our summary)


def test_peers_are_checked_by_ae_title_and_address(tmp_path: Path) -> None:
    settings = load_settings(environ={
        "LUMBAR_NODE__NODE__ALLOWED_PEERS": "[{ae_title: ORTHANC, host: 10.0.0.5}, {ae_title: MODALITY}]",
        "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool")})
    scp = StorageSCP(settings, Ledger(tmp_path / "ledger.sqlite"))
    assert scp.allowed("ORTHANC", "10.0.0.5") and not scp.allowed("ORTHANC", "10.0.0.6")
    assert scp.allowed("MODALITY", "192.168.1.1") and not scp.allowed("INTRUDER", "10.0.0.5")
