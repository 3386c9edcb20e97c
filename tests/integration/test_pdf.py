"""The one-page PDF summary that ``predict --out`` writes (and the node delivers): an Encapsulated PDF
instance in its own series of the source study, dciodvfy-clean, rendered by poppler (pdftoppm,
pdftotext) as a person sees it. ``outputs.pdf: false`` leaves it out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

from dicom_node.results.identity import DISCLAIMER_LINES
from dicom_node.results.pdf import GRADE_COLOUR, PDF_SERIES_NUMBER, pdf_document, read_pdf
from inference.labels import Severity
from tests.support.dicom_tools import dciodvfy_errors
from tests.support.tools import lumbar_node, require_tool


@pytest.fixture(scope="module")
def written(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A study graded without its Axial T2 series (so that labels are not assessed): its folder of results."""
    study = sorted((phantom_dir / "train_images").iterdir())[3]
    copy = tmp_path_factory.mktemp("pdf-study")
    for path in study.rglob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription != "Axial T2":
            (copy / path.relative_to(study)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(study)).write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("pdf-out")
    lumbar_node("predict", str(copy), "--out", str(out))
    [folder] = list(out.iterdir())
    return copy, folder


@pytest.fixture(scope="module")
def pdf(written: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, folder = written
    [path] = list(folder.glob("PDF_*.dcm"))
    document = tmp_path_factory.mktemp("pdf") / "summary.pdf"
    document.write_bytes(read_pdf(str(path)))
    return document


def test_an_encapsulated_pdf_in_its_own_series_of_the_study(written: tuple[Path, Path]) -> None:
    study, folder = written
    source = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    [path] = list(folder.glob("PDF_*.dcm"))
    ds = pydicom.dcmread(path)
    sr = pydicom.dcmread(next(folder.glob("SR_*.dcm")), stop_before_pixels=True)
    sc = pydicom.dcmread(next((folder / "SC").glob("*.dcm")), stop_before_pixels=True)
    assert ds.SOPClassUID == EncapsulatedPDFStorage and ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and bytes(ds.EncapsulatedDocument).startswith(b"%PDF")
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID not in (sr.SeriesInstanceUID, sc.SeriesInstanceUID)
    assert int(ds.SeriesNumber) == PDF_SERIES_NUMBER
    assert "not for diagnosis" in ds.SeriesDescription and "not for diagnosis" in ds.DocumentTitle
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert any(e.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
               for e in ds.ContributingEquipmentSequence)
    assert dciodvfy_errors(path) == []


def test_a_dicom_file_with_the_file_meta_pydicom_completes(written: tuple[Path, Path]) -> None:
    _, folder = written
    [path] = list(folder.glob("PDF_*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.preamble == b"\0" * 128 and path.read_bytes()[128:132] == b"DICM"
    meta = ds.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == PYDICOM_IMPLEMENTATION_UID
    assert meta.FileMetaInformationVersion == b"\0\1"


def test_the_pdf_is_extracted_whole_with_or_without_a_usable_length(written: tuple[Path, Path]) -> None:
    """The node's PDF as stored (an odd length padded with a NUL), and as other writers store one:
    without EncapsulatedDocumentLength, with one too long, too short or zero, with a space as pad
    byte, with bytes after the last %%EOF: the same document comes out."""
    _, folder = written
    [path] = list(folder.glob("PDF_*.dcm"))
    ds = pydicom.dcmread(path)
    document = read_pdf(path)
    stored = bytes(ds.EncapsulatedDocument)
    assert len(document) == ds.EncapsulatedDocumentLength and stored[: len(document)] == document
    assert document.startswith(b"%PDF-") and document.rstrip(b"\r\n").endswith(b"%%EOF")
    for length in (None, len(stored) + 2, len(document) - 100, 0):
        if length is None:
            del ds.EncapsulatedDocumentLength
        else:
            ds.EncapsulatedDocumentLength = length
        assert pdf_document(ds) == document, length
    odd = document if len(document) % 2 else document + b"\n"  # an odd-length document, padded with a space
    ds.EncapsulatedDocument, ds.EncapsulatedDocumentLength = odd + b" ", len(odd)
    assert pdf_document(ds) == odd
    del ds.EncapsulatedDocumentLength
    ds.EncapsulatedDocument = document + b"junk after the end\0"
    assert pdf_document(ds) == document


def test_one_page_with_every_grade_reason_model_and_disclaimer(written: tuple[Path, Path], pdf: Path) -> None:
    _, folder = written
    results = json.loads((folder / "results.json").read_text())
    info = subprocess.run([require_tool("pdfinfo"), str(pdf)], capture_output=True, text=True, check=True).stdout
    assert "Pages:           1" in info
    text = subprocess.run([require_tool("pdftotext"), "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    flat = " ".join(text.split())
    for line in DISCLAIMER_LINES:
        assert line in flat
    assert results["model"]["sha256"] in flat and results["model"]["name"] in flat
    labels = results["labels"]
    assert sum(flat.count(g) for g in ("Normal/Mild", "Moderate", "Severe")) >= sum(r["assessed"] for r in labels)
    missing = [r for r in labels if not r["assessed"]]
    assert missing and f"Not assessed ({len(missing)} of 25)" in flat
    for r in missing:
        assert r["reason"] in flat and f"{r['level']} {r['condition']}" in flat
    assert flat.count("not assessed") >= len(missing)  # the table's cells


def test_rendered_the_table_is_coloured_by_grade_with_the_key_heatmaps(written: tuple[Path, Path], pdf: Path) -> None:
    """pdftoppm's picture (left in the test's folder for a person to look at)."""
    _, folder = written
    prefix = pdf.with_suffix("")
    subprocess.run([require_tool("pdftoppm"), "-r", "60", "-png", "-singlefile", str(pdf), str(prefix)], check=True)
    rgb = np.asarray(Image.open(f"{prefix}.png").convert("RGB")).astype(int)
    grades = {r["grade"] for r in json.loads((folder / "results.json").read_text())["labels"] if r["assessed"]}
    for severity in Severity:
        colour = np.array([round(255 * c) for c in GRADE_COLOUR[severity].rgb()])
        present = (np.abs(rgb - colour).max(axis=2) <= 3).sum() > 200
        assert present == (severity.display in grades), severity
    colourful = np.abs(rgb[..., 0] - rgb[..., 2]) > 60  # the JET heatmaps (and the red banner)
    assert colourful[rgb.shape[0] // 2:].sum() > 1000, f"no heatmaps in the lower half of {prefix}.png"


def test_outputs_pdf_false_writes_none(written: tuple[Path, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    study, _ = written
    monkeypatch.setenv("LUMBAR_NODE__OUTPUTS__PDF", "false")
    lumbar_node("predict", str(study), "--out", str(tmp_path))
    [folder] = list(tmp_path.iterdir())
    assert list(folder.glob("SR_*.dcm")) and not list(folder.glob("PDF_*.dcm"))
