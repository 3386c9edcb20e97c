"""``predict --out``: the SR, the Grad-CAM Secondary Captures, the PDF summary and the key images (KOS)
of a phantom study, as files a PACS accepts, checked with dciodvfy and dcentvfy against their source
images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.results import RunFolder
from dicom_node.results.identity import DISCLAIMER, MANUFACTURER
from tests.support.dicom_tools import dcentvfy_errors, dciodvfy_errors
from tests.support.tools import lumbar_node


@pytest.fixture(scope="module")
def outputs(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    study = sorted((phantom_dir / "train_images").iterdir())[1]
    out = tmp_path_factory.mktemp("outputs")
    lumbar_node("predict", str(study), "--out", str(out))
    [folder] = list(out.iterdir())
    return study, folder


def test_one_sr_and_one_sc_per_graded_label_in_the_source_study(outputs: tuple[Path, Path]) -> None:
    study, folder = outputs
    source = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    [sr_path] = list(folder.glob("SR_*.dcm"))
    scs = [pydicom.dcmread(p) for p in sorted((folder / "SC").glob("*.dcm"))]
    sr = pydicom.dcmread(sr_path)
    assert folder.name == source.StudyInstanceUID == sr.StudyInstanceUID
    assert len(scs) >= 15
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1 and scs[0].SeriesInstanceUID != sr.SeriesInstanceUID
    for sc in scs:
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
        assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
        assert "not for diagnosis" in sc.ImageComments
        ref = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert any(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == ref for p in study.rglob("*.dcm"))
        rgb = sc.pixel_array
        assert rgb.shape[2] == 3 and np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).max() > 50  # colour heatmap


def test_sc_images_are_readable_without_help(outputs: tuple[Path, Path]) -> None:
    """Large enough for legible text; the finding, grade and probabilities on a dark band at the top
    and the disclaimer at the bottom; the source's body part instead of an empty laterality."""
    study, folder = outputs
    source = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    for path in sorted((folder / "SC").glob("*.dcm")):
        sc = pydicom.dcmread(path)
        assert max(sc.Rows, sc.Columns) >= 512
        assert re.fullmatch(r"L\d/[LS]\d [A-Za-z ]+\. AI grade: (Normal/Mild|Moderate|Severe)\. "
                            r"Normal/Mild \d+%  Moderate \d+%  Severe \d+%\. " + re.escape(DISCLAIMER),
                            sc.ImageComments), sc.ImageComments
        assert sc.BodyPartExamined == source.BodyPartExamined and "Laterality" not in sc
        rgb = sc.pixel_array.astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        top, bottom = slice(0, sc.Rows // 8), slice(sc.Rows - sc.Rows // 14, sc.Rows)
        yellow = (r > 200) & (g > 180) & (b < 100)  # the grade line
        red = (r > 200) & (g < 160) & (b < 160)  # the disclaimer
        assert yellow[top].sum() > 50 and red[bottom].sum() > 50, path.name
        assert np.median(rgb[top].max(axis=2)) < 60  # the text's band is dark


def test_the_model_is_contributing_equipment_of_every_heatmap(outputs: tuple[Path, Path]) -> None:
    """As in the SR (IHE AI Results): Purpose of Reference "Processing Algorithm", with the model's
    name, version and device UID; the source's acquisition equipment stays listed."""
    _, folder = outputs
    sr = pydicom.dcmread(next(folder.glob("SR_*.dcm")), stop_before_pixels=True)
    [algorithm] = [e for e in sr.ContributingEquipmentSequence
                   if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    for path in sorted((folder / "SC").glob("*.dcm")):
        sc = pydicom.dcmread(path, stop_before_pixels=True)
        purposes = [e.PurposeOfReferenceCodeSequence[0].CodeMeaning for e in sc.ContributingEquipmentSequence]
        assert "Processing Algorithm" in purposes and "Acquisition Equipment" in purposes
        [item] = [e for e in sc.ContributingEquipmentSequence
                  if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
        assert item.Manufacturer == MANUFACTURER
        assert (item.ManufacturerModelName, item.SoftwareVersions, item.DeviceUID) == (
            algorithm.ManufacturerModelName, algorithm.SoftwareVersions, algorithm.DeviceUID)


def test_sr_sc_pdf_and_kos_pass_dciodvfy(outputs: tuple[Path, Path]) -> None:
    _, folder = outputs
    assert list(folder.glob("KOS_*.dcm"))  # the phantom study has findings graded Moderate or Severe
    for path in [*folder.glob("SR_*.dcm"), *sorted((folder / "SC").glob("*.dcm"))[:5], *folder.glob("PDF_*.dcm"),
                 *folder.glob("KOS_*.dcm")]:
        assert dciodvfy_errors(path) == [], path


def test_dcentvfy_finds_sr_sc_pdf_kos_and_sources_consistent(outputs: tuple[Path, Path]) -> None:
    study, folder = outputs
    files = [*folder.glob("SR_*.dcm"), *sorted((folder / "SC").glob("*.dcm")), *folder.glob("PDF_*.dcm"),
             *folder.glob("KOS_*.dcm"), *sorted(study.rglob("*.dcm"))]
    assert dcentvfy_errors(files) == []


def test_the_run_folder_finds_what_the_writer_wrote(outputs: tuple[Path, Path]) -> None:
    """RunFolder is the layout the writer wrote by and readers go by: each file where its UID puts
    it, the result as written, the files a delivery sends in the order sent."""
    _, folder = outputs
    run = RunFolder(folder)
    [sr_path] = list(folder.glob("SR_*.dcm"))
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    assert run.sr_files() == [sr_path] == [run.sr_path(sr.SOPInstanceUID)] and run.newest_sr() == sr_path
    assert RunFolder.of_sr(str(sr_path)) == run
    scs = run.sc_files()
    assert scs == sorted((folder / "SC").glob("*.dcm")) and len(scs) >= 15
    numbers = []
    for path in scs:
        sc = pydicom.dcmread(path, stop_before_pixels=True)
        assert path == run.sc_path(int(sc.InstanceNumber), sc.SOPInstanceUID)
        numbers.append(int(sc.InstanceNumber))
    assert numbers == list(range(1, len(scs) + 1))  # in Instance Number order
    [pdf_path] = run.pdf_files()
    assert pdf_path == run.pdf_path(pydicom.dcmread(pdf_path, stop_before_pixels=True).SOPInstanceUID)
    [kos_path] = run.kos_files()
    assert kos_path == run.kos_path(pydicom.dcmread(kos_path).SOPInstanceUID)
    assert run.files_to_send() == [sr_path, *scs, pdf_path, kos_path]
    assert run.table_path.read_text().strip() and run.result() == json.loads(run.json_path.read_text())
    assert run.series_roles() == run.result()["series_roles"] and all(run.series_roles().values())
    assert not run.running_marker.exists()  # the worker's marker (the writer alone never leaves one)
    assert run.files_to_send(sr_path) == run.files_to_send()  # the ledger's SR is the folder's newest


def test_a_rerun_supersedes_the_previous_report_in_the_same_series(outputs: tuple[Path, Path]) -> None:
    study, folder = outputs
    [first] = [pydicom.dcmread(p) for p in folder.glob("SR_*.dcm")]
    sc_series = pydicom.dcmread(next((folder / "SC").glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    [first_pdf] = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("PDF_*.dcm")]
    lumbar_node("predict", str(study), "--out", str(folder.parent))
    reports = sorted((pydicom.dcmread(p) for p in folder.glob("SR_*.dcm")), key=lambda d: int(d.InstanceNumber))
    assert len(reports) == 2
    newest = reports[-1]
    assert newest.SeriesInstanceUID == first.SeriesInstanceUID and int(newest.InstanceNumber) == 2
    predecessor = newest.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    scs = [pydicom.dcmread(p, stop_before_pixels=True) for p in (folder / "SC").glob("*.dcm")]
    assert {sc.SeriesInstanceUID for sc in scs} == {sc_series}
    assert len(scs) == len({(sc.SourceImageSequence[0].ReferencedSOPInstanceUID, sc.ImageComments) for sc in scs})
    [pdf] = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("PDF_*.dcm")]  # the new one replaced it
    assert pdf.SeriesInstanceUID == first_pdf.SeriesInstanceUID and int(pdf.InstanceNumber) == 2
    assert pdf.SOPInstanceUID != first_pdf.SOPInstanceUID
    assert pdf.SourceInstanceSequence[0].ReferencedSOPInstanceUID == newest.SOPInstanceUID
    run = RunFolder(folder)
    assert run.newest_sr() == run.sr_path(newest.SOPInstanceUID) and len(run.sr_files()) == 2
    [kos] = [pydicom.dcmread(p) for p in folder.glob("KOS_*.dcm")]  # the new one replaced it too
    assert int(kos.InstanceNumber) == 2
    assert run.files_to_send()[0] == run.newest_sr()
    assert run.files_to_send()[-2:] == [run.pdf_path(pdf.SOPInstanceUID), run.kos_path(kos.SOPInstanceUID)]
