"""The one writer of a grading run's outputs: the SR, the Grad-CAM Secondary Captures, the PDF
summary and the result as text and JSON, into one folder, returned as a typed record.

    <folder>/SR_<SOPInstanceUID>.dcm
    <folder>/SC/<nn>_<SOPInstanceUID>.dcm
    <folder>/PDF_<SOPInstanceUID>.dcm      (Encapsulated PDF; unless outputs.pdf is false)
    <folder>/results.txt, results.json

The node writes a run per folder (results/<study>/run-<n>/); ``predict --out`` writes a folder
per study and supersedes what it finds there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.results.pdf import build_pdf, key_findings
from dicom_node.results.sc import build_sc_images
from dicom_node.results.sources import image_key, location_key, patient_study
from dicom_node.results.sr import build_sr
from dicom_node.results.text import result_json, result_table
from inference.analyze import AssessedLabel, StudyResult
from inference.instances import Instance

SR_GLOB = "SR_*.dcm"
SC_FOLDER = "SC"
PDF_GLOB = "PDF_*.dcm"
TABLE_FILE = "results.txt"
JSON_FILE = "results.json"


class OutputKind(StrEnum):
    """The kinds of DICOM object a run sends to the PACS."""

    SR = "SR"
    SC = "SC"
    PDF = "PDF"


@dataclass(frozen=True)
class OutputFile:
    """One DICOM object a run wrote."""

    kind: OutputKind
    path: Path
    series_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class RunOutputs:
    """What a run wrote: its DICOM objects in delivery order (the SR, the SCs, the PDF) and its
    text files."""

    folder: Path
    files: tuple[OutputFile, ...]
    table: Path
    json: Path

    @property
    def sr(self) -> OutputFile:
        return next(f for f in self.files if f.kind is OutputKind.SR)

    def series_uid(self, kind: OutputKind) -> str | None:
        """The series of this kind's objects (None when the run wrote none)."""
        return next((f.series_uid for f in self.files if f.kind is kind), None)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]


@dataclass(frozen=True)
class Supersedes:
    """What a new run replaces: the report it supersedes and the heatmaps' series it keeps (the
    PDF's series follows from the report's, see results.pdf)."""

    sr: Dataset
    sc_series_uid: str | None


def _save(ds: Dataset, kind: OutputKind, path: Path) -> OutputFile:
    ds.save_as(path, enforce_file_format=True)  # preamble and complete file meta (PS3.10)
    return OutputFile(kind, path, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def write_run(result: StudyResult, instances: Sequence[Instance], folder: Path,
              supersedes: Supersedes | None = None, pdf: bool = True) -> RunOutputs:
    """Write a study's SR, Grad-CAM SCs, PDF summary (with ``pdf``), table and JSON into ``folder``.

    ``instances`` are the study's headers with their paths, keyed by (series, SOP instance); the
    images a finding is located on are read in full for the heatmaps. The patient/study
    attributes are read once, defensively (results.sources). With ``supersedes`` the new report lists the old one as its
    predecessor (same series, next instance number), the heatmaps keep their series and so does
    the PDF (its series follows from the report's).
    """
    headers = {image_key(ds): ds for ds, _ in instances}  # (series, SOP instance): the Kaggle files
    paths = {image_key(ds): path for ds, path in instances}  # repeat SOP Instance UIDs across series
    located = {location_key(r.location) for r in result.labels if isinstance(r, AssessedLabel)}
    full = {key: pydicom.dcmread(paths[key]) for key in located}
    patient = patient_study([*full.values(), *headers.values()], result.study_uid)  # logged once per run
    (folder / SC_FOLDER).mkdir(parents=True, exist_ok=True)
    previous = supersedes.sr if supersedes else None
    sr = build_sr(result, headers, series_uid=None if previous is None else str(previous.SeriesInstanceUID),
                  instance_number=1 if previous is None else int(previous.InstanceNumber) + 1,
                  predecessors=[] if previous is None else [previous], patient=patient)
    files = [_save(sr, OutputKind.SR, folder / f"SR_{sr.SOPInstanceUID}.dcm")]
    scs = build_sc_images(result, full, series_uid=supersedes.sc_series_uid if supersedes else None, patient=patient)
    for sc in scs:
        files.append(_save(sc, OutputKind.SC, folder / SC_FOLDER / f"{int(sc.InstanceNumber):02d}_{sc.SOPInstanceUID}.dcm"))
    if pdf:
        heatmap = dict(zip((r.label for r in result.assessed()), scs, strict=True))
        source = next(iter(full.values()), None) or next(iter(headers.values()))
        document = build_pdf(result, sr, source, [(r, heatmap[r.label]) for r in key_findings(result)], patient=patient)
        files.append(_save(document, OutputKind.PDF, folder / f"PDF_{document.SOPInstanceUID}.dcm"))
    table, data = folder / TABLE_FILE, folder / JSON_FILE
    table.write_text(result_table(result) + "\n")
    data.write_text(json.dumps(result_json(result), indent=1))
    return RunOutputs(folder, tuple(files), table, data)


def previous_outputs(folder: Path) -> Supersedes | None:
    """What a folder written by ``write_run`` holds to supersede: its newest SR and the SC series."""
    reports = sorted((pydicom.dcmread(p) for p in folder.glob(SR_GLOB)), key=lambda d: int(d.InstanceNumber))
    if not reports:
        return None
    old_sc = sorted((folder / SC_FOLDER).glob("*.dcm"))
    sc_series = str(pydicom.dcmread(old_sc[0], stop_before_pixels=True).SeriesInstanceUID) if old_sc else None
    return Supersedes(reports[-1], sc_series)
