"""The TID 1500 report, built from a phantom study graded by the bundled model (with all its series,
and without its Axial T2 series so that labels are not assessed), checked by the real validators:
dciodvfy, PixelMed's DicomSRValidator, and DCMTK's dsr2html for what a person reads; and its
structure as OHIF v3 and IHE AI Results read it (Image Library, TID 1410 groups, the algorithm in
the Contributing Equipment Sequence)."""

from __future__ import annotations

import copy
import html
import io
import re
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.results import codes as C
from dicom_node.results.encoding import write_dataset_file
from dicom_node.results.identity import MANUFACTURER, model_device_uid
from dicom_node.results.sources import ImageKey, image_key
from dicom_node.results.sr import build_sr, percent
from dicom_node.results.writer import settle_encoding
from inference.analyze import (
    AssessedLabel,
    LabelResult,
    NotAssessedLabel,
    StudyResult,
    analyze_study,
)
from inference.labels import SEVERITIES
from inference.runtime import OnnxRunner
from tests.support.dicom_tools import (
    dciodvfy_errors,
    pixelmed_sr_report,
    pixelmed_unexpected,
)
from tests.support.tools import require_tool

#: A graded phantom study: the result and its source images by (series, SOP instance) key.
Graded = tuple[StudyResult, dict[ImageKey, pydicom.Dataset]]


def _graded(phantom_dir: Path, without_axial: bool) -> Graded:
    study = min((phantom_dir / "train_images").iterdir())
    instances = [(pydicom.dcmread(f, stop_before_pixels=True), f) for f in sorted(study.rglob("*.dcm"))]
    if without_axial:
        instances = [(ds, f) for ds, f in instances if ds.SeriesDescription != "Axial T2"]
    result = analyze_study(instances, OnnxRunner())
    assert any(not r.assessed for r in result.labels) == without_axial
    return result, {image_key(ds): ds for ds, _ in instances}


def _write(graded: Graded, folder: Path) -> Path:
    result, sources = graded
    build_sr(result, sources).save_as(folder / "sr.dcm", enforce_file_format=True)
    return folder / "sr.dcm"


@pytest.fixture(scope="module", params=["all series", "no Axial T2"])
def graded(request: pytest.FixtureRequest, phantom_dir: Path) -> Graded:
    return _graded(phantom_dir, without_axial=request.param == "no Axial T2")


@pytest.fixture(scope="module")
def sr_file(graded: Graded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(graded, tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def partial_sr_file(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report without the Axial T2 series: every kind of content item (graded groups, labels not
    assessed, the summary), for PixelMed's validator, which takes half a minute per report."""
    return _write(_graded(phantom_dir, without_axial=True), tmp_path_factory.mktemp("partial-sr"))


@pytest.fixture(scope="module")
def rendered(sr_file: Path) -> str:
    """dsr2html's rendering with its default options, as the text a person reads."""
    out = subprocess.run([require_tool("dsr2html"), str(sr_file)], capture_output=True, text=True, check=True)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", out.stdout)))


def _root(sr: pydicom.Dataset, code: str) -> pydicom.Dataset | None:
    return next((i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code), None)


def _section(text: str, identifier: str) -> str:
    """The rendered group (or "not assessed" evaluation) whose tracking identifier is ``identifier``."""
    [section] = [s for s in re.split(r"Measurement Group|Assessment status:", text)
                 if f'Tracking Identifier = "{identifier}"' in s]
    return section


def _label(r: LabelResult) -> str:
    return f"{r.label.level.value} {r.label.condition.display}"


def test_sr_is_in_the_study_of_its_sources_with_one_planar_roi_group_per_graded_label(graded: Graded,
                                                                                      sr_file: Path) -> None:
    """TID 1410 groups (tracking identifier and UID, the region on its source image, the grade as a
    NUM and a CODE, three probabilities, the algorithm), in label order."""
    result, sources = graded
    sr = pydicom.dcmread(sr_file)
    source = next(iter(sources.values()))
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    groups = _root(sr, "126010").ContentSequence
    assessed = result.assessed()
    assert [g.ContentSequence[0].TextValue for g in groups] == [_label(r) for r in assessed]
    assert {g.ContinuityOfContent for g in groups} == {"SEPARATE"}
    assert {g.ContentTemplateSequence[0].TemplateIdentifier for g in groups} == {"1410"}
    for g, r in zip(groups, assessed, strict=True):
        items = g.ContentSequence
        assert [i.ConceptNameCodeSequence[0].CodeValue for i in items[:2]] == ["112039", "112040"]
        [region] = [i for i in items if i.ValueType == "SCOORD"]
        image = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == r.location.sop_instance_uid
        nums = [i for i in items if i.ValueType == "NUM"]
        assert nums[0].ConceptNameCodeSequence[0].CodeMeaning == f"{r.label.condition.display} grade"
        assert float(nums[0].MeasuredValueSequence[0].NumericValue) == int(r.grade) + 1
        assert nums[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == f"{{{r.grade.display}}}"
        probabilities = [float(n.MeasuredValueSequence[0].NumericValue) for n in nums[1:]]
        assert probabilities == [percent(p) for p in r.probabilities]
        assert all(float(n.MeasuredValueSequence[0].NumericValue) > 0 for n in nums)  # OHIF shows a 0 as empty
        assert {i.ConceptNameCodeSequence[0].CodeValue for i in items} >= {"111001", "111003"}  # TID 4019 in the group
    evidence = {sop.ReferencedSOPInstanceUID for ev in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in ev.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    assert {r.location.sop_instance_uid for r in assessed} <= evidence


def test_the_image_library_lists_every_image_a_finding_references(graded: Graded, sr_file: Path) -> None:
    """TID 1600, as OHIF reads it: one Image Library Group of IMAGE items, each image once."""
    result, _ = graded
    sr = pydicom.dcmread(sr_file)
    library = _root(sr, "111028")
    [group] = library.ContentSequence
    assert group.ConceptNameCodeSequence[0].CodeValue == "126200"
    images = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert sorted(images) == sorted({r.location.sop_instance_uid for r in result.assessed()})


def test_not_assessed_labels_and_the_summary_are_document_level_evaluations(graded: Graded, sr_file: Path) -> None:
    """Located nowhere, they are no measurement group (OHIF 3.13 fails on a group without a region):
    "Not assessed" with tracking identifier, sites and coded reason; the spinal canal summary."""
    result, _ = graded
    sr = pydicom.dcmread(sr_file)
    evaluations = _root(sr, "C0034375").ContentSequence
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in evaluations]
    assert names[:2] == [C.ANY_SEVERE_SPINAL.value, C.MAX_SEVERE_SPINAL.value]
    missing = [r for r in result.labels if isinstance(r, NotAssessedLabel)]
    items = [i for i in evaluations if i.ConceptNameCodeSequence[0].CodeValue == C.ASSESSMENT.value]
    assert [i.ContentSequence[0].TextValue for i in items] == [_label(r) for r in missing]
    for item, r in zip(items, missing, strict=True):
        assert item.ConceptCodeSequence[0].CodeValue == C.NOT_ASSESSED.value
        assert item.ContentSequence[-1].ConceptCodeSequence[0].CodeValue == C.REASONS[r.why].value


def test_the_model_is_in_the_contributing_equipment_sequence(graded: Graded, sr_file: Path) -> None:
    """IHE AI Results: Purpose of Reference "Processing Algorithm", manufacturer, model, version, device UID."""
    result, _ = graded
    sr = pydicom.dcmread(sr_file)
    [item] = [e for e in sr.ContributingEquipmentSequence
              if e.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("Newcode1", "99IHE")
    assert item.Manufacturer == MANUFACTURER and item.ManufacturerModelName == result.model.name
    assert item.SoftwareVersions == result.model.version and item.DeviceUID == model_device_uid(result.model.sha256)


def test_dciodvfy_reports_no_errors(sr_file: Path) -> None:
    assert dciodvfy_errors(sr_file) == []


def test_pixelmed_finds_tid_1500_without_errors(partial_sr_file: Path) -> None:
    report = pixelmed_sr_report(partial_sr_file)
    assert "Found Root Template TID_1500 (MeasurementReport)" in report
    assert not [line for line in report.splitlines() if line.startswith(("Error", "Internal Error"))], report[:2000]
    unexpected = pixelmed_unexpected(report)
    assert unexpected == [], unexpected[:5]


def test_dsr2html_shows_each_label_with_its_finding_grade_and_named_probabilities(graded: Graded,
                                                                                  rendered: str) -> None:
    result, _ = graded
    assert "Image Library" in rendered
    for r in result.labels:
        section = _section(rendered, _label(r))
        assert f"Finding Site = {C.LEVEL[r.label.level].meaning}" in section
        if not isinstance(r, AssessedLabel):
            assert section.startswith(" Not assessed") and "Finding = Stenosis" in section
            assert f"Reason not assessed = {C.REASONS[r.why].meaning}" in section
            continue
        assert "Finding: Stenosis" in section
        assert f"Severity: {C.GRADE[r.grade].meaning}" in section
        grade = rf"{r.label.condition.display} grade: {int(r.grade) + 1}(\.0)? {{{re.escape(r.grade.display)}}}"
        assert re.search(grade, section)
        for s, p in zip(SEVERITIES, r.probabilities, strict=True):
            assert f"{C.PROBABILITY[s].meaning}: {percent(p)} %" in section, (s, section[:1500])
    assert any(r.assessed for r in result.labels)


def test_dsr2html_shows_the_summary_and_the_disclaimer(rendered: str) -> None:
    evaluations = rendered.split("Qualitative Evaluations")[-1]
    assert re.search(r"Any severe spinal canal stenosis: (Present|Absent)", evaluations)
    assert re.search(r"Highest probability of severe spinal canal stenosis: \d+(\.\d+)? % \(L\d/[LS]\d\)", evaluations)
    assert "not for diagnosis" in rendered  # series description, in the document header
    assert "not for clinical use" in rendered  # algorithm parameters


def test_settled_encoding_writes_the_same_bytes(graded: Graded) -> None:
    """``settle_encoding`` (the run writer's one pass before saving) changes nothing in the file."""
    result, sources = graded
    sr = build_sr(result, sources)
    twin = copy.deepcopy(sr)
    plain, settled = io.BytesIO(), io.BytesIO()
    sr.save_as(plain, enforce_file_format=True)
    settle_encoding(twin)
    twin.save_as(settled, enforce_file_format=True)
    assert settled.getvalue() == plain.getvalue()


def test_the_run_writers_encoder_writes_pydicoms_bytes(graded: Graded, tmp_path: Path) -> None:
    """``write_dataset_file`` (how the run writer saves the report) writes the file pydicom writes, for a
    first report and for one that supersedes it."""
    result, sources = graded
    first = build_sr(result, sources)
    plain = tmp_path / "plain.dcm"
    first.save_as(plain, enforce_file_format=True)
    superseding = build_sr(result, sources, series_uid=str(first.SeriesInstanceUID), instance_number=2,
                           predecessors=[pydicom.dcmread(plain)])
    for n, sr in enumerate((first, superseding)):
        expected = io.BytesIO()
        copy.deepcopy(sr).save_as(expected, enforce_file_format=True)
        settle_encoding(sr)
        write_dataset_file(sr, tmp_path / f"{n}.dcm")
        assert (tmp_path / f"{n}.dcm").read_bytes() == expected.getvalue()
