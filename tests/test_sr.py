"""The TID 1500 report, built from a phantom study graded by the bundled model, checked by the real
validators: dciodvfy, PixelMed's DicomSRValidator, and DCMTK's dsr2html for what a person reads."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.sr import build_sr
from inference.analyze import StudyResult, analyze_study
from inference.runtime import OnnxRunner
from tests.conftest import require_tool
from tests.dicom_tools import dciodvfy_errors, pixelmed_sr_report


@pytest.fixture(scope="module")
def graded(phantom_dir: Path) -> tuple[StudyResult, dict[str, pydicom.Dataset]]:
    study = sorted((phantom_dir / "train_images").iterdir())[0]
    instances = [(pydicom.dcmread(f, stop_before_pixels=True), f) for f in sorted(study.rglob("*.dcm"))]
    result = analyze_study(instances, OnnxRunner())
    return result, {str(ds.SOPInstanceUID): ds for ds, _ in instances}


@pytest.fixture(scope="module")
def sr_file(graded, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    result, sources = graded
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr(result, sources).save_as(path)
    return path


def test_sr_is_in_the_study_of_its_sources_with_one_group_per_label(graded, sr_file: Path) -> None:  # noqa: ANN001
    result, sources = graded
    sr = pydicom.dcmread(sr_file)
    source = next(iter(sources.values()))
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    report = sr.ContentSequence
    groups = [item for item in report if item.ValueType == "CONTAINER"][0].ContentSequence
    assert len(groups) == 25 + 1  # one per level and side, plus the study summary
    evidence = {sop.ReferencedSOPInstanceUID for ev in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in ev.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    located = {r.location.sop_instance_uid for r in result.labels if r.location is not None}
    assert located and located <= evidence


def test_dciodvfy_reports_no_errors(sr_file: Path) -> None:
    assert dciodvfy_errors(sr_file) == []


def test_pixelmed_finds_tid_1500_without_errors(sr_file: Path) -> None:
    report = pixelmed_sr_report(sr_file)
    assert "Found Root Template TID_1500 (MeasurementReport)" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report[:2000]


def test_dsr2html_renders_findings_grades_and_probabilities(graded, sr_file: Path) -> None:  # noqa: ANN001
    result, _ = graded
    html = subprocess.run([require_tool("dsr2html"), "+Cm", str(sr_file)], capture_output=True, text=True,
                          check=True).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    for r in result.labels:
        assert f"{r.label.level.value} {r.label.condition.display}" in text
    assessed = next(r for r in result.labels if r.assessed)
    assert f"{assessed.probabilities[0]:.6f}"[:6] in text
    assert "Normal or mild" in text or "Moderate" in text or "Severe" in text
    assert "not for clinical use" in text
