"""dicom_node.results.kos: the Key Object Selection lists exactly the source images of the findings
graded Moderate or Severe (each once, by series and instance), none when there is no such finding,
in a series and with an instance number that follow the SR's, as highdicom reads it back."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage, MRImageStorage, generate_uid

from dicom_node.results.identity import DISCLAIMER
from dicom_node.results.kos import (
    KOS_SERIES_DESCRIPTION,
    KOS_SERIES_NUMBER,
    build_kos,
    key_images_json,
    key_images_of,
    kos_series_uid,
    note,
)
from dicom_node.results.sources import ImageKey, image_key
from inference.analyze import AssessedLabel, LabelResult, Location, NotAssessedLabel, NotAssessedReason, StudyResult
from inference.labels import LABELS, Label, Severity
from inference.model import ModelInfo, ModelMetadata

STUDY = generate_uid()
SAGITTAL, AXIAL = generate_uid(), generate_uid()
SHARED_SOP = generate_uid()  # the Kaggle files repeat SOP Instance UIDs across a study's series
PROBABILITIES = {Severity.NORMAL_MILD: (0.8, 0.15, 0.05), Severity.MODERATE: (0.2, 0.7, 0.1),
                 Severity.SEVERE: (0.05, 0.15, 0.8)}


def _source(series_uid: str, sop_uid: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = STUDY, series_uid, number
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^KOS", "KOS-1", "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "7", "ACC7"
    ds.ReferringPhysicianName = ""
    ds.Rows = ds.Columns = 64
    return ds


def _graded(label: Label, grade: Severity, source: Dataset) -> AssessedLabel:
    location = Location(str(source.SeriesInstanceUID), str(source.SOPInstanceUID), MRImageStorage,
                        int(source.InstanceNumber), (10.0, 12.0), (0.0, 0.0, 0.0),
                        None)  # type: ignore[arg-type]  # no crop frame: the KOS draws no heatmap
    return AssessedLabel(label, PROBABILITIES[grade], location, np.zeros((4, 4), np.float32))


def _result(graded: dict[int, tuple[Severity, Dataset]]) -> StudyResult:
    """LABELS[i] graded as given, the others not assessed."""
    labels: list[LabelResult] = [
        _graded(lb, *graded[i]) if i in graded else NotAssessedLabel(lb, NotAssessedReason.MISSING_SERIES, "no series")
        for i, lb in enumerate(LABELS)]
    meta = ModelMetadata(name="test-model", version="0.0", training_data="synthetic phantoms", offsets_mm={})
    return StudyResult(STUDY, tuple(labels), ModelInfo(meta, "0" * 64), {}, {}, {})


def _report(number: int = 1, series_uid: str | None = None) -> Dataset:
    """The SR's UIDs and instance number, all the KOS takes from it."""
    sr = Dataset()
    sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.InstanceNumber = series_uid or generate_uid(), generate_uid(), number
    return sr


@pytest.fixture(scope="module")
def sources() -> dict[ImageKey, Dataset]:
    images = [_source(SAGITTAL, generate_uid(), 7), _source(SAGITTAL, generate_uid(), 8),
              _source(SAGITTAL, SHARED_SOP, 9), _source(AXIAL, SHARED_SOP, 3), _source(AXIAL, generate_uid(), 4)]
    return {image_key(ds): ds for ds in images}


def _referenced(kos: Dataset) -> list[ImageKey]:
    """(series, instance) of every image the document's evidence lists."""
    return [(str(series.SeriesInstanceUID), str(item.ReferencedSOPInstanceUID))
            for study in kos.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence]


def test_the_kos_lists_exactly_the_images_of_the_moderate_and_severe_findings(
        sources: dict[ImageKey, Dataset]) -> None:
    """Normal/Mild findings and labels not assessed are left out; two findings on one image list it
    once; images of two series that share a SOP Instance UID are both listed, each in its series."""
    s7, s8, s9, a3, a4 = sources.values()
    result = _result({0: (Severity.MODERATE, s7), 1: (Severity.SEVERE, s7), 2: (Severity.NORMAL_MILD, s8),
                      5: (Severity.SEVERE, s9), 15: (Severity.MODERATE, a3), 16: (Severity.NORMAL_MILD, a4)})
    selected = key_images_of(result)
    assert [r.label for r in selected.findings] == [LABELS[0], LABELS[1], LABELS[5], LABELS[15]]
    assert selected.images == (image_key(s7), image_key(s9), image_key(a3))
    sr = _report()
    kos = build_kos(result, sources, sr)
    assert kos is not None
    assert _referenced(kos) == [image_key(s7), image_key(s9), image_key(a3)]
    images = [item for item in kos.ContentSequence if item.ValueType == "IMAGE"]
    assert [(i.ReferencedSOPSequence[0].ReferencedSOPClassUID, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in images] == [(MRImageStorage, s7.SOPInstanceUID), (MRImageStorage, SHARED_SOP),
                                 (MRImageStorage, SHARED_SOP)]
    described = key_images_json(selected, kos)
    assert described["key_object_selection"] == kos.SOPInstanceUID
    assert described["key_images"] == [
        {"series_uid": SAGITTAL, "sop_instance_uid": s7.SOPInstanceUID, "labels": [LABELS[0].column, LABELS[1].column]},
        {"series_uid": SAGITTAL, "sop_instance_uid": SHARED_SOP, "labels": [LABELS[5].column]},
        {"series_uid": AXIAL, "sop_instance_uid": SHARED_SOP, "labels": [LABELS[15].column]}]
    assert note(selected) == ('Key images: 3 source images of the 4 findings graded Moderate or Severe, '
                              'listed in the Key Object Selection ("Of Interest").')


def test_no_kos_when_no_finding_is_moderate_or_severe(sources: dict[ImageKey, Dataset]) -> None:
    s7, s8, *_ = sources.values()
    for graded in ({0: (Severity.NORMAL_MILD, s7), 3: (Severity.NORMAL_MILD, s8)}, {}):
        result = _result(graded)
        selected = key_images_of(result)
        assert not selected and selected.images == ()
        assert build_kos(result, sources, _report()) is None
        assert key_images_json(selected, None) == {"key_object_selection": None, "key_images": []}
        assert note(selected) == ("Key images: none - no finding graded Moderate or Severe, so no Key Object "
                                  "Selection written.")
    assert note(selected, enabled=False) == "Key images: no Key Object Selection written (outputs.key_images is false)."


def test_the_kos_is_titled_of_interest_says_it_is_no_diagnosis_and_takes_the_study_of_its_sources(
        sources: dict[ImageKey, Dataset]) -> None:
    s7, *_ = sources.values()
    kos = build_kos(_result({4: (Severity.SEVERE, s7)}), sources, _report())
    assert kos is not None
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and kos.Modality == "KO"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert kos.SeriesNumber == KOS_SERIES_NUMBER and kos.SeriesDescription == KOS_SERIES_DESCRIPTION
    assert "not for diagnosis" in kos.SeriesDescription
    [text] = [item for item in kos.ContentSequence if item.ValueType == "TEXT"
              and item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert f"{LABELS[4].level.value} {LABELS[4].condition.display}: Severe" in text.TextValue
    assert text.TextValue.endswith(DISCLAIMER) and "not a clinical model" in text.TextValue
    [equipment] = [e for e in kos.ContributingEquipmentSequence
                   if e.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"]
    assert equipment.ManufacturerModelName == "test-model" and DISCLAIMER in equipment.ContributionDescription
    assert kos.StudyInstanceUID == STUDY
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber"):
        assert kos[keyword].value == s7[keyword].value, keyword


def test_a_rerun_kos_follows_its_report_into_the_same_series() -> None:
    """As the PDF does: the series from the SR series, the instance from the SR instance, the
    instance number the SR's (a superseding report has the next one)."""
    s7 = _source(SAGITTAL, generate_uid(), 7)
    result = _result({0: (Severity.MODERATE, s7)})
    first_sr = _report(1)
    second_sr = _report(2, series_uid=str(first_sr.SeriesInstanceUID))
    first = build_kos(result, {image_key(s7): s7}, first_sr)
    second = build_kos(result, {image_key(s7): s7}, second_sr)
    assert first is not None and second is not None
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == kos_series_uid(str(first_sr.SeriesInstanceUID))
    assert first.SeriesInstanceUID != first_sr.SeriesInstanceUID
    assert (int(first.InstanceNumber), int(second.InstanceNumber)) == (1, 2)
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_highdicom_reads_the_kos_back(sources: dict[ImageKey, Dataset]) -> None:
    s7, _, s9, a3, _ = sources.values()
    kos = build_kos(_result({0: (Severity.MODERATE, s7), 5: (Severity.SEVERE, s9), 15: (Severity.SEVERE, a3)}),
                    sources, _report())
    assert kos is not None
    read = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in read.content.get_references()]
    assert referenced == [s7.SOPInstanceUID, SHARED_SOP, SHARED_SOP]
    [device] = read.content.get_observer_contexts()
    assert device.observer_type == hd.sr.CodedConcept("121007", "DCM", "Device")
