"""The one writer of a grading run's outputs: the SR, the Grad-CAM Secondary Captures, the PDF
summary, the key images (KOS) and the result as text and JSON, into one folder, returned as a typed record; and the
folder's layout (``RunFolder``), which the writer and every reader of a run go by:

    <folder>/SR_<SOPInstanceUID>.dcm
    <folder>/SC/<nn>_<SOPInstanceUID>.dcm
    <folder>/PDF_<SOPInstanceUID>.dcm      (Encapsulated PDF; unless outputs.pdf is false)
    <folder>/KOS_<SOPInstanceUID>.dcm      (Key Object Selection; unless outputs.key_images is false
                                            or no finding is graded Moderate or Severe)
    <folder>/results.txt, results.json
    <folder>/.grading                      (while a worker grades into it)

The node writes a run per folder (results/<study>/run-<n>/); ``predict --out`` writes a folder
per study and supersedes what it finds there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import VR

from dicom_node.results.encoding import write_dataset_file
from dicom_node.results.kos import build_kos, key_images_json, key_images_of, note
from dicom_node.results.pdf import build_pdf, key_findings
from dicom_node.results.sc import build_sc_images, render_pictures
from dicom_node.results.sources import image_key, location_key, patient_study
from dicom_node.results.sr import build_sr
from dicom_node.results.text import result_json, result_table
from inference.analyze import AssessedLabel, StudyResult
from inference.instances import Instance

_SR_PREFIX = "SR_"
_PDF_PREFIX = "PDF_"
_KOS_PREFIX = "KOS_"
_DICOM_SUFFIX = ".dcm"
_SC_FOLDER = "SC"
_TABLE_FILE = "results.txt"
_JSON_FILE = "results.json"
_RUNNING_MARKER = ".grading"


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and its layout: where the writer puts each output and where readers (the
    node, ``predict``, the demo, the web page) find them."""

    path: Path

    @classmethod
    def of_sr(cls, sr_path: str | Path) -> RunFolder:
        """The run folder that holds this SR (the ledger records a run by its SR's path)."""
        return cls(Path(sr_path).parent)

    def sr_path(self, sop_instance_uid: str) -> Path:
        return self.path / f"{_SR_PREFIX}{sop_instance_uid}{_DICOM_SUFFIX}"

    def sr_files(self) -> list[Path]:
        """The SRs in the folder (one per node run; ``predict --out`` keeps the superseded ones)."""
        return sorted(self.path.glob(f"{_SR_PREFIX}*{_DICOM_SUFFIX}"))

    def newest_sr(self) -> Path | None:
        """The SR with the highest Instance Number (a superseding report has the next one)."""
        files = self.sr_files()
        if len(files) <= 1:
            return next(iter(files), None)
        numbers = {p: int(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["InstanceNumber"]).InstanceNumber)
                   for p in files}
        return sorted(files, key=numbers.__getitem__)[-1]

    @property
    def sc_dir(self) -> Path:
        return self.path / _SC_FOLDER

    def sc_path(self, number: int, sop_instance_uid: str) -> Path:
        """The ``number``-th Secondary Capture (its Instance Number; two digits, so names sort by it)."""
        return self.sc_dir / f"{number:02d}_{sop_instance_uid}{_DICOM_SUFFIX}"

    def sc_files(self) -> list[Path]:
        """The Secondary Captures in Instance Number order."""
        return sorted(self.sc_dir.glob(f"*{_DICOM_SUFFIX}"))

    def pdf_path(self, sop_instance_uid: str) -> Path:
        return self.path / f"{_PDF_PREFIX}{sop_instance_uid}{_DICOM_SUFFIX}"

    def pdf_files(self) -> list[Path]:
        return sorted(self.path.glob(f"{_PDF_PREFIX}*{_DICOM_SUFFIX}"))

    def kos_path(self, sop_instance_uid: str) -> Path:
        return self.path / f"{_KOS_PREFIX}{sop_instance_uid}{_DICOM_SUFFIX}"

    def kos_files(self) -> list[Path]:
        """The Key Object Selection (none when no finding is graded Moderate or Severe)."""
        return sorted(self.path.glob(f"{_KOS_PREFIX}*{_DICOM_SUFFIX}"))

    @property
    def table_path(self) -> Path:
        return self.path / _TABLE_FILE

    @property
    def json_path(self) -> Path:
        return self.path / _JSON_FILE

    @property
    def running_marker(self) -> Path:
        """Present while a worker grades into the folder: left behind, it shows the worker died."""
        return self.path / _RUNNING_MARKER

    def result(self) -> dict[str, Any]:
        """The run's results.json, parsed (OSError when it is gone, ValueError when not JSON)."""
        data = json.loads(self.json_path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{self.json_path}: not a JSON object")
        return data

    def series_roles(self) -> dict[str, list[str]]:
        """The series roles the run found (role -> series UIDs), none when results.json cannot be read."""
        try:
            return dict(self.result().get("series_roles", {}))
        except (OSError, ValueError, TypeError):
            return {}

    def files_to_send(self, sr: Path | None = None) -> list[Path]:
        """What a delivery of this run sends, in the order sent: the SR (``sr``, the report the
        ledger recorded; by default the folder's newest), the Secondary Captures, the PDF, the KOS."""
        sr = sr if sr is not None else self.newest_sr()
        return [*([sr] if sr is not None else []), *self.sc_files(), *self.pdf_files(), *self.kos_files()]


class OutputKind(StrEnum):
    """The kinds of DICOM object a run sends to the PACS."""

    SR = "SR"
    SC = "SC"
    PDF = "PDF"
    KOS = "KOS"


@dataclass(frozen=True)
class OutputFile:
    """One DICOM object a run wrote."""

    kind: OutputKind
    path: Path
    series_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class RunOutputs:
    """What a run wrote: its DICOM objects in delivery order (the SR, the SCs, the PDF, the KOS) and its
    text files."""

    folder: Path
    files: tuple[OutputFile, ...]
    table: Path
    json: Path
    seconds: dict[str, float] = field(default_factory=dict)  # each step's wall time: read, sr, sc, pdf, text

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


def _save(ds: Dataset, kind: OutputKind, path: Path, sink: Callable[[Path], object] | None) -> OutputFile:
    settle_encoding(ds)
    write_dataset_file(ds, path)  # as ds.save_as(path, enforce_file_format=True): preamble, complete file meta
    if sink is not None:
        sink(path)
    return OutputFile(kind, path, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def settle_encoding(ds: Dataset) -> None:
    """Prepare a dataset built in memory for writing as Explicit VR Little Endian in one pass: the
    ambiguous VRs corrected and every element of every nested item made a decoded element, then
    each item marked as already in that encoding. pydicom's writer does the same work for a new
    dataset, but again for each nested item at every depth (the correction recurses into the
    subtree each time): a third of writing an SR's content tree. The bytes written are the same."""
    syntax = ds.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax != ExplicitVRLittleEndian:
        return  # written as pydicom would
    correct_ambiguous_vr(ds, True)
    stack: list[tuple[Dataset, str | list[str]]] = [(ds, default_encoding)]
    while stack:
        item, parent_encoding = stack.pop()
        charset = item.get("SpecificCharacterSet")
        encoding = convert_encodings(charset) if charset else parent_encoding
        for tag in list(item.keys()):
            element = item[tag]  # a raw element is decoded here, as the writer would
            if element.VR == VR.SQ:
                stack.extend((child, encoding) for child in element.value)
        item.set_original_encoding(False, True, encoding)


def _threads() -> int:
    """Threads that draw the heatmaps: the CPUs this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


#: Called with the report once it is written (and given to ``sink``), before the rest of the run is
#: drawn: the SR and the series its Secondary Captures will have (None: the run writes none).
ReportWritten = Callable[[OutputFile, str | None], object]


def write_run(result: StudyResult, instances: Sequence[Instance], folder: Path,
              supersedes: Supersedes | None = None, pdf: bool = True, key_images: bool = True,
              sink: Callable[[Path], object] | None = None, on_report: ReportWritten | None = None) -> RunOutputs:
    """Write a study's SR, Grad-CAM SCs, PDF summary (with ``pdf``), Key Object Selection (with
    ``key_images``, when a finding is graded Moderate or Severe), table and JSON into ``folder``.

    ``instances`` are the study's headers with their paths, keyed by (series, SOP instance); the
    images a finding is located on are read in full for the heatmaps. The patient/study
    attributes are read once, defensively (results.sources). With ``supersedes`` the new report lists the old one as its
    predecessor (same series, next instance number), the heatmaps keep their series and so does
    the PDF and the KOS (their series follow from the report's). ``sink`` is called with each
    file's path once it is written and closed (the node fsyncs it meanwhile, ``store.Syncer``).

    The heatmaps are drawn on a few threads (OpenCV and NumPy release the interpreter lock) while
    this thread builds and writes the SR, which is pure Python. With ``on_report`` the SR comes
    first, alone (the node sends it while the rest is drawn): it is written, ``on_report`` is
    called, and only then are the heatmaps drawn.
    """
    run = RunFolder(folder)
    seconds: dict[str, float] = {}
    lap = _Lap(seconds)
    headers = {image_key(ds): ds for ds, _ in instances}  # (series, SOP instance): the Kaggle files
    paths = {image_key(ds): path for ds, path in instances}  # repeat SOP Instance UIDs across series
    located = {location_key(r.location) for r in result.labels if isinstance(r, AssessedLabel)}
    full = {key: pydicom.dcmread(paths[key]) for key in located}
    patient = patient_study([*full.values(), *headers.values()], result.study_uid)  # logged once per run
    run.sc_dir.mkdir(parents=True, exist_ok=True)
    previous = supersedes.sr if supersedes else None
    sc_series = ((supersedes.sc_series_uid if supersedes else None) or generate_uid()) if result.assessed() else None
    lap("read")
    with ThreadPoolExecutor(_threads(), thread_name_prefix="heatmap") as pool:
        pictures = render_pictures(result, full, pool) if on_report is None else None
        sr = build_sr(result, headers, series_uid=None if previous is None else str(previous.SeriesInstanceUID),
                      instance_number=1 if previous is None else int(previous.InstanceNumber) + 1,
                      predecessors=[] if previous is None else [previous], patient=patient)
        files = [_save(sr, OutputKind.SR, run.sr_path(sr.SOPInstanceUID), sink)]
        lap("sr")
        if on_report is not None:
            on_report(files[0], sc_series)
            lap("report")
            pictures = render_pictures(result, full, pool)
        scs = build_sc_images(result, full, series_uid=sc_series, patient=patient, pictures=pictures)
    for sc in scs:
        files.append(_save(sc, OutputKind.SC, run.sc_path(int(sc.InstanceNumber), sc.SOPInstanceUID), sink))
    lap("sc")
    if pdf:
        heatmap = dict(zip((r.label for r in result.assessed()), scs, strict=True))
        source = next(iter(full.values()), None) or next(iter(headers.values()))
        document = build_pdf(result, sr, source, [(r, heatmap[r.label]) for r in key_findings(result)], patient=patient)
        files.append(_save(document, OutputKind.PDF, run.pdf_path(document.SOPInstanceUID), sink))
        lap("pdf")
    selected = key_images_of(result)
    kos = build_kos(result, headers, sr, patient=patient) if key_images else None
    if kos is not None:
        files.append(_save(kos, OutputKind.KOS, run.kos_path(kos.SOPInstanceUID), sink))
        lap("kos")
    table, data = run.table_path, run.json_path
    table.write_text(f"{result_table(result)}\n{note(selected, key_images)}\n")
    data.write_text(json.dumps(result_json(result) | key_images_json(selected, kos), indent=1))
    if sink is not None:
        sink(table)
        sink(data)
    lap("text")
    return RunOutputs(folder, tuple(files), table, data, seconds)


class _Lap:
    """Records the wall time since the previous lap under a step's name."""

    def __init__(self, into: dict[str, float]):
        self.into, self.last = into, time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.into[step] = round(now - self.last, 4)
        self.last = now


def previous_outputs(folder: Path) -> Supersedes | None:
    """What a folder written by ``write_run`` holds to supersede: its newest SR and the SC series."""
    run = RunFolder(folder)
    sr = run.newest_sr()
    if sr is None:
        return None
    old_sc = run.sc_files()
    sc_series = str(pydicom.dcmread(old_sc[0], stop_before_pixels=True).SeriesInstanceUID) if old_sc else None
    return Supersedes(pydicom.dcmread(sr), sc_series)

