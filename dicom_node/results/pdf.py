"""A one-page PDF summary of a graded study (reportlab) as an Encapsulated PDF instance in its own
series of the source study: every PACS viewer shows one, most do not render a Comprehensive SR.

The page: the 25 grades as a table (level x condition, coloured by grade, with the three class
probabilities), the labels not assessed with their reasons, the key Grad-CAM heatmaps (the most
severe findings), the model's name, version and sha256, and the disclaimer.

Its UIDs follow from its report's: the series from the SR series (a re-run's PDF lands in the same
series, as its SR does), the instance from the SR instance; its instance number is the SR's.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen.canvas import Canvas

from dicom_node.results.identity import DISCLAIMER, DISCLAIMER_LINES, MANUFACTURER, MODEL_NAME
from dicom_node.results.sources import PatientStudy, algorithm_equipment, patient_study, sop_reference
from inference import __version__
from inference.analyze import AssessedLabel, NotAssessedLabel, StudyResult
from inference.labels import CONDITIONS, LABELS, Label, Level, Severity

PDF_SERIES_NUMBER = 9903
PDF_SERIES_DESCRIPTION = "AI lumbar stenosis summary (PDF) - not for diagnosis"
DOCUMENT_TITLE = "AI lumbar spine stenosis grading - summary - not for diagnosis"
KEY_IMAGES = 4
GRADE_COLOUR = {
    Severity.NORMAL_MILD: colors.HexColor("#cfeccf"),
    Severity.MODERATE: colors.HexColor("#ffd966"),
    Severity.SEVERE: colors.HexColor("#f08080"),
}
NOT_ASSESSED_COLOUR = colors.HexColor("#d9d9d9")
WARNING_RED = colors.HexColor("#b00020")


def pdf_series_uid(sr_series_uid: str) -> str:
    """The PDF series of the study's reports: one per SR series, so that it is kept across re-runs."""
    return generate_uid(entropy_srcs=[sr_series_uid, "pdf"])


def key_findings(result: StudyResult, limit: int = KEY_IMAGES) -> list[AssessedLabel]:
    """The findings whose heatmaps the page shows: highest grade first, then the least likely normal."""
    ranked = sorted(result.assessed(), key=lambda r: (-int(r.grade), r.probabilities[Severity.NORMAL_MILD]))
    return ranked[:limit]


def _pct(probability: float) -> str:
    """A probability in % for the table: one decimal, "<0.1" below that."""
    value = 100.0 * float(probability)
    return f"{value:.1f}" if value >= 0.05 else "<0.1"


def _short(label: Label) -> str:
    return f"{label.level.value} {label.condition.display}"


def _grade_table(c: Canvas, result: StudyResult, x: float, top: float, width: float) -> float:
    """The 5 x 5 grid, levels down, conditions across; each cell the grade and the probabilities.
    Returns the y under it."""
    head_h, row_h, level_w = 30.0, 34.0, 46.0
    col_w = (width - level_w) / len(CONDITIONS)
    c.setFont("Helvetica-Bold", 8)
    for j, condition in enumerate(CONDITIONS):
        words = condition.display.replace("Neural Foraminal", "Foraminal").split()
        cx = x + level_w + (j + 0.5) * col_w
        c.drawCentredString(cx, top - 12, " ".join(words[:-1]))
        c.drawCentredString(cx, top - 22, words[-1])
    for i, level in enumerate(Level):
        y = top - head_h - (i + 1) * row_h
        c.setFont("Helvetica-Bold", 10)
        c.setFillColor(colors.black)
        c.drawString(x + 4, y + row_h / 2 - 3, level.value)
        for j, condition in enumerate(CONDITIONS):
            r = result.result(Label(condition, level))
            cx = x + level_w + j * col_w
            c.setFillColor(GRADE_COLOUR[r.grade] if isinstance(r, AssessedLabel) else NOT_ASSESSED_COLOUR)
            c.rect(cx, y, col_w, row_h, stroke=1, fill=1)
            c.setFillColor(colors.black)
            if isinstance(r, AssessedLabel):
                c.setFont("Helvetica-Bold", 9)
                c.drawCentredString(cx + col_w / 2, y + row_h - 13, r.grade.display)
                c.setFont("Helvetica", 6.5)
                p = r.probabilities
                c.drawCentredString(cx + col_w / 2, y + 7, f"N/M {_pct(p[0])}  Mod {_pct(p[1])}  Sev {_pct(p[2])}")
            else:
                c.setFont("Helvetica-Oblique", 8)
                c.drawCentredString(cx + col_w / 2, y + row_h / 2 - 3, "not assessed")
    c.setStrokeColor(colors.black)
    return top - head_h - len(Level) * row_h


def _not_assessed(c: Canvas, result: StudyResult, x: float, top: float, width: float) -> float:
    """The labels not assessed, grouped by their reason. Returns the y under the list."""
    missing = [r for r in result.labels if isinstance(r, NotAssessedLabel)]
    if not missing:
        return top
    by_reason: dict[str, list[str]] = {}
    for r in missing:
        by_reason.setdefault(r.reason, []).append(_short(r.label))
    c.setFont("Helvetica-Bold", 9)
    c.drawString(x, top - 10, f"Not assessed ({len(missing)} of {len(LABELS)})")
    y = top - 10
    c.setFont("Helvetica", 7.5)
    for reason, labels in by_reason.items():
        for line in _wrap(f"{reason}: {', '.join(labels)}", c, "Helvetica", 7.5, width):
            y -= 10
            c.drawString(x + 6, y, line)
    return y - 4


def _wrap(text: str, c: Canvas, font: str, size: float, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and c.stringWidth(candidate, font, size) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _jpeg(rgb: NDArray[np.uint8], side: int = 420) -> ImageReader:
    """The picture shrunk to fit ``side`` x ``side`` (never enlarged) and JPEG-encoded, both in
    OpenCV (bilinear: a shrink to four fifths; libjpeg-turbo): a few ms, where Pillow took ten."""
    h, w = rgb.shape[:2]
    scale = min(1.0, side / w, side / h)
    if scale < 1.0:
        rgb = np.asarray(cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                    interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise ValueError("a heatmap could not be JPEG-encoded for the PDF")
    return ImageReader(io.BytesIO(encoded.tobytes()))


def _heatmaps(c: Canvas, shown: Sequence[tuple[AssessedLabel, NDArray[np.uint8]]], x: float, top: float,
              width: float, bottom: float) -> None:
    """The key heatmaps, two per row, each with its label and grade."""
    if not shown:
        return
    c.setFont("Helvetica-Bold", 9)
    c.drawString(x, top - 10, "Key findings (Grad-CAM of the predicted grade; circle: where the finding was graded)")
    gap, columns = 10.0, 2
    rows = (len(shown) + columns - 1) // columns
    cell_w = (width - gap) / columns
    cell_h = min(cell_w, (top - 22 - bottom - gap * (rows - 1)) / rows)
    for k, (r, rgb) in enumerate(shown):
        i, j = divmod(k, columns)
        cx, cy = x + j * (cell_w + gap), top - 22 - (i + 1) * cell_h - i * gap
        h, w = rgb.shape[:2]
        scale = min(cell_w / w, (cell_h - 12) / h)
        iw, ih = w * scale, h * scale
        c.drawImage(_jpeg(rgb), cx + (cell_w - iw) / 2, cy + 12, iw, ih)
        c.setFont("Helvetica", 7.5)
        c.drawCentredString(cx + cell_w / 2, cy + 2, f"{_short(r.label)}: {r.grade.display}")


def summary_pdf(result: StudyResult, source: Dataset, heatmaps: Sequence[tuple[AssessedLabel, NDArray[np.uint8]]],
                created: datetime) -> bytes:
    """The one-page summary as PDF bytes. ``heatmaps`` are the key findings with their Grad-CAM
    pictures (the Secondary Captures' pixels)."""
    buffer = io.BytesIO()
    page_w, page_h = A4
    margin = 36.0
    width = page_w - 2 * margin
    c = Canvas(buffer, pagesize=A4, pageCompression=1)
    c.setTitle(DOCUMENT_TITLE)
    c.setAuthor(f"{MANUFACTURER} ({MODEL_NAME})")
    c.setSubject(DISCLAIMER)
    c.setCreator(MODEL_NAME)

    c.setFillColor(WARNING_RED)
    c.rect(margin, page_h - margin - 34, width, 34, stroke=0, fill=1)
    c.setFillColor(colors.white)
    c.setFont("Helvetica-Bold", 11)
    for k, line in enumerate(DISCLAIMER_LINES):
        c.drawCentredString(page_w / 2, page_h - margin - 14 - 13 * k, line)
    c.setFillColor(colors.black)
    c.setFont("Helvetica-Bold", 14)
    y = page_h - margin - 54
    c.drawString(margin, y, "AI lumbar spine MRI: stenosis grading summary")
    c.setFont("Helvetica", 8)
    patient = f"Patient {source.get('PatientName', '')}  ID {source.get('PatientID', '')}"
    study = f"Study date {source.get('StudyDate', '')}  Accession {source.get('AccessionNumber', '')}"
    c.drawString(margin, y - 13, f"{patient}   {study}")
    c.drawString(margin, y - 23, f"Study Instance UID {result.study_uid}")

    y = _grade_table(c, result, margin, y - 30, width)
    c.setFont("Helvetica", 7)
    legend = [(Severity.NORMAL_MILD, "Normal/Mild"), (Severity.MODERATE, "Moderate"), (Severity.SEVERE, "Severe")]
    lx = margin
    for s, text in legend:
        c.setFillColor(GRADE_COLOUR[s])
        c.rect(lx, y - 12, 10, 8, stroke=1, fill=1)
        c.setFillColor(colors.black)
        c.drawString(lx + 13, y - 11, text)
        lx += 70
    c.setFillColor(NOT_ASSESSED_COLOUR)
    c.rect(lx, y - 12, 10, 8, stroke=1, fill=1)
    c.setFillColor(colors.black)
    c.drawString(lx + 13, y - 11, "not assessed")
    c.drawString(lx + 80, y - 11, "probabilities in %: N/M normal or mild, Mod moderate, Sev severe")
    y = _not_assessed(c, result, margin, y - 18, width)

    footer_top = margin + 30
    _heatmaps(c, heatmaps, margin, y - 4, width, footer_top + 6)

    info = result.model
    c.setStrokeColor(colors.grey)
    c.line(margin, footer_top, page_w - margin, footer_top)
    c.setFont("Helvetica", 7)
    c.drawString(margin, footer_top - 10, f"Model {info.name} {info.version}, sha256 {info.sha256}")
    c.drawString(margin, footer_top - 19, f"Trained on {info.training_data}. Written by {MODEL_NAME} "
                                          f"({MANUFACTURER}) on {created:%Y-%m-%d %H:%M}.")
    c.setFillColor(WARNING_RED)
    c.setFont("Helvetica-Bold", 7.5)
    c.drawString(margin, footer_top - 29, DISCLAIMER)
    c.showPage()
    c.save()
    return buffer.getvalue()


def build_pdf(result: StudyResult, sr: Dataset, source: Dataset,
              heatmaps: Sequence[tuple[AssessedLabel, Dataset]], patient: PatientStudy | None = None) -> Dataset:
    """The Encapsulated PDF instance for a study's report ``sr``: the summary of ``result`` with the
    key heatmaps (label, Secondary Capture) on it, in the PDF series of the SR's series. ``patient``
    holds the patient/study attributes (results.sources); when not given they are made from
    ``source``, one of the study's images. Its file meta names only the transfer syntax: pydicom
    completes it when the file is written with ``save_as(path, enforce_file_format=True)``."""
    patient = patient or patient_study([source], result.study_uid)
    created = datetime.now()
    shown = [(r, np.asarray(sc.pixel_array, dtype=np.uint8)) for r, sc in heatmaps]
    ds = Dataset()
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(sr.SOPInstanceUID), "pdf"])
    patient.apply(ds)  # Type 2 attributes present, empty when unknown or invalid
    document = summary_pdf(result, ds, shown, created)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = pdf_series_uid(str(sr.SeriesInstanceUID))
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.SeriesDescription = PDF_SERIES_DESCRIPTION
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = created.strftime("%H%M%S")
    ds.AcquisitionDateTime = created.strftime("%Y%m%d%H%M%S")
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # workstation: the node renders the document
    ds.ContributingEquipmentSequence = [algorithm_equipment(result)]
    ds.InstanceNumber = int(sr.InstanceNumber)
    ds.BurnedInAnnotation = "YES"  # the page names the patient
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = DOCUMENT_TITLE
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        codes.LN.MRISpineReport.value, codes.LN.MRISpineReport.scheme_designator, codes.LN.MRISpineReport.meaning)
    ds.ConceptNameCodeSequence = [concept]
    ds.SourceInstanceSequence = [sop_reference(sr), *(sop_reference(sc) for _, sc in heatmaps)]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


#: What may follow a document inside EncapsulatedDocument: the pad byte to an even length (NUL;
#: some writers pad with a space).
_PADDING = b"\0 "
_EOF = b"%%EOF"


def pdf_document(ds: Dataset) -> bytes:
    """The PDF inside an Encapsulated PDF data set, without the padding around it.

    The document is EncapsulatedDocumentLength bytes long when that value is sane: a number no
    larger than what is stored, leaving only padding after it (writers that omit it, or give it
    wrong, exist). Else it ends after the last %%EOF marker (and its end of line), or, without one,
    where the trailing pad byte begins. ValueError when the data set holds no document (or an empty one)."""
    if "EncapsulatedDocument" not in ds or ds.EncapsulatedDocument is None:
        raise ValueError("not an encapsulated document: no EncapsulatedDocument")
    data = bytes(ds.EncapsulatedDocument)
    if not data:
        raise ValueError("not an encapsulated document: EncapsulatedDocument is empty")
    try:
        length = int(ds.get("EncapsulatedDocumentLength"))
    except (TypeError, ValueError, OverflowError):  # absent, empty or not a number
        length = -1
    if 0 < length <= len(data) and not data[length:].strip(_PADDING):
        return data[:length]
    end = data.rfind(_EOF)
    if end < 0:
        return data[:-1] if len(data) % 2 == 0 and data[-1:] in (b"\0", b" ") else data
    end += len(_EOF)
    for newline in (b"\r\n", b"\n", b"\r"):
        if data.startswith(newline, end):
            return data[: end + len(newline)]
    return data[:end]


def read_pdf(path: str | Path) -> bytes:
    """The PDF inside an Encapsulated PDF file (see ``pdf_document``)."""
    return pdf_document(pydicom.dcmread(path))
