"""The key images that ``predict --out`` writes (and the node delivers) for a graded phantom study: a
Key Object Selection ("Of Interest") in its own series of the source study that lists exactly the
images of the SR's findings graded Moderate or Severe, dciodvfy-clean, read back by highdicom, said
in results.txt and results.json, replaced on a re-run in its series; ``outputs.key_images: false``
leaves it out. (In Orthanc with the SR: tests/integration/test_outputs_orthanc.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_node.results import RunFolder
from dicom_node.results import codes as C
from dicom_node.results.identity import DISCLAIMER
from dicom_node.results.kos import KOS_SERIES_DESCRIPTION, KOS_SERIES_NUMBER, kos_series_uid
from inference.labels import Severity
from tests.support.dicom_tools import dciodvfy_errors
from tests.support.tools import lumbar_node

#: The SR's codes of the grades whose images are key images.
KEY_CODES = {C.GRADE[Severity.MODERATE].value, C.GRADE[Severity.SEVERE].value}


@pytest.fixture(scope="module")
def written(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A phantom study and its folder of results."""
    study = sorted((phantom_dir / "train_images").iterdir())[5]
    out = tmp_path_factory.mktemp("kos-out")
    lumbar_node("predict", str(study), "--out", str(out))
    [folder] = list(out.iterdir())
    return study, folder


def _key_images_of_the_sr(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    """(series, instance) of the images on which the SR's measurement groups grade Moderate or Severe."""
    series_of = {ref.ReferencedSOPInstanceUID: series.SeriesInstanceUID
                 for study in sr.CurrentRequestedProcedureEvidenceSequence
                 for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    found = set()
    for group in measurements.ContentSequence:
        [grade] = [i for i in group.ContentSequence if i.ValueType == "CODE"
                   and i.ConceptNameCodeSequence[0].CodeValue == C.SEVERITY.value]
        if grade.ConceptCodeSequence[0].CodeValue in KEY_CODES:
            [region] = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
            sop = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            found.add((series_of[sop], sop))
    return found


def _listed(kos: pydicom.Dataset) -> list[tuple[str, str]]:
    """(series, instance) of each image the KOS lists, resolved through its evidence."""
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)
    listed = []
    for item in document.content.get_references():
        _, series, sop = document.resolve_reference(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        listed.append((series, sop))
    return listed


def test_the_kos_lists_exactly_the_images_of_the_srs_moderate_and_severe_findings(
        written: tuple[Path, Path]) -> None:
    study, folder = written
    sr = pydicom.dcmread(next(folder.glob("SR_*.dcm")))
    [path] = list(folder.glob("KOS_*.dcm"))
    kos = pydicom.dcmread(path)
    expected = _key_images_of_the_sr(sr)
    assert expected, "the phantom study has findings graded Moderate or Severe"
    listed = _listed(kos)
    assert len(listed) == len(set(listed)) and set(listed) == expected  # each image once
    sources = {(ds.SeriesInstanceUID, ds.SOPInstanceUID): ds
               for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in study.rglob("*.dcm"))}
    for key in listed:
        item = next(i for i in kos.ContentSequence if i.ValueType == "IMAGE"
                    and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key[1])
        assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == sources[key].SOPClassUID
    data = json.loads((folder / "results.json").read_text())
    assert data["key_object_selection"] == kos.SOPInstanceUID
    assert {(i["series_uid"], i["sop_instance_uid"]) for i in data["key_images"]} == expected
    graded = {i["label"] for i in data["labels"] if i["assessed"] and i["grade"] in ("Moderate", "Severe")}
    assert {label for i in data["key_images"] for label in i["labels"]} == graded
    last = (folder / "results.txt").read_text().splitlines()[-1]
    assert last.startswith(f"Key images: {len(expected)} source image") and f"of the {len(graded)} finding" in last


def test_the_kos_is_a_valid_of_interest_document_in_its_own_series_of_the_study(written: tuple[Path, Path]) -> None:
    study, folder = written
    [path] = list(folder.glob("KOS_*.dcm"))
    assert dciodvfy_errors(path) == []
    kos = pydicom.dcmread(path)
    sr = pydicom.dcmread(next(folder.glob("SR_*.dcm")), stop_before_pixels=True)
    source = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and kos.Modality == "KO"
    assert kos.file_meta.MediaStorageSOPClassUID == KeyObjectSelectionDocumentStorage
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    assert kos.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert kos[keyword].value == source[keyword].value, keyword
    scs = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in RunFolder(folder).sc_files()}
    pdf = pydicom.dcmread(next(folder.glob("PDF_*.dcm")), stop_before_pixels=True)
    assert kos.SeriesInstanceUID == kos_series_uid(sr.SeriesInstanceUID)
    assert kos.SeriesInstanceUID not in {sr.SeriesInstanceUID, pdf.SeriesInstanceUID, *scs}
    assert int(kos.SeriesNumber) == KOS_SERIES_NUMBER and kos.SeriesDescription == KOS_SERIES_DESCRIPTION
    assert int(kos.InstanceNumber) == int(sr.InstanceNumber)
    [description] = [i for i in kos.ContentSequence if i.ValueType == "TEXT"
                     and i.ConceptNameCodeSequence[0].CodeMeaning == "Key Object Description"]
    assert description.TextValue.endswith(DISCLAIMER)


def test_a_rerun_replaces_the_kos_in_its_series(written: tuple[Path, Path], tmp_path: Path) -> None:
    study, folder = written
    copy = tmp_path / folder.name
    copy.mkdir()
    for path in folder.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(folder)).write_bytes(path.read_bytes())
    [first] = [pydicom.dcmread(p) for p in copy.glob("KOS_*.dcm")]
    lumbar_node("predict", str(study), "--out", str(tmp_path))
    [second] = [pydicom.dcmread(p) for p in copy.glob("KOS_*.dcm")]  # the superseded one left the folder
    newest = pydicom.dcmread(RunFolder(copy).newest_sr(), stop_before_pixels=True)
    assert second.SeriesInstanceUID == first.SeriesInstanceUID and second.SOPInstanceUID != first.SOPInstanceUID
    assert int(second.InstanceNumber) == int(newest.InstanceNumber) == 2
    assert set(_listed(second)) == _key_images_of_the_sr(pydicom.dcmread(RunFolder(copy).newest_sr()))
    assert RunFolder(copy).files_to_send()[-1] == RunFolder(copy).kos_path(second.SOPInstanceUID)


def test_outputs_key_images_false_writes_none(written: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    study, _ = written
    monkeypatch.setenv("LUMBAR_NODE__OUTPUTS__KEY_IMAGES", "false")
    lumbar_node("predict", str(study), "--out", str(tmp_path))
    [folder] = list(tmp_path.iterdir())
    assert list(folder.glob("SR_*.dcm")) and list(folder.glob("PDF_*.dcm")) and not list(folder.glob("KOS_*.dcm"))
    assert (folder / "results.txt").read_text().splitlines()[-1] == (
        "Key images: no Key Object Selection written (outputs.key_images is false).")
    assert json.loads((folder / "results.json").read_text())["key_object_selection"] is None
