"""``lumbar-node predict``: grade the studies in a folder of DICOM files with the ONNX model."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node.observability import PHI_VALUES, get_logger, study_scope
from dicom_node.pipeline import nothing_assessed
from dicom_node.results import (
    OutputKind,
    RunFolder,
    RunOutputs,
    previous_outputs,
    result_json,
    result_table,
    write_run,
)
from inference.analyze import StudyResult, analyze_study
from inference.instances import Instance, read_folder
from inference.runtime import OnnxRunner

log = get_logger(__name__)


def write_outputs(result: StudyResult, instances: Sequence[Instance], out: Path, pdf: bool = True,
                  key_images: bool = True) -> RunOutputs:
    """The study's outputs under ``out/<StudyInstanceUID>/``; a re-run supersedes the newest SR
    found there and replaces the heatmaps, the PDF and the key images, keeping their series."""
    folder = out / result.study_uid
    supersedes = previous_outputs(folder)
    if supersedes is not None:
        log.info("superseding an earlier report", study_uid=result.study_uid,
                 predecessor=str(supersedes.sr.SOPInstanceUID))
    # the superseded heatmaps, PDF and KOS leave this folder (a PACS keeps its copies)
    run = RunFolder(folder)
    for path in [*run.sc_files(), *run.pdf_files(), *run.kos_files()]:
        path.unlink()
    return write_run(result, instances, folder, supersedes, pdf=pdf, key_images=key_images)


def predict_folder(folder: Path, model_dir: Path | None, providers: tuple[str, ...], as_json: bool,
                   echo: Callable[[str], None], out: Path | None = None, pdf: bool = True,
                   report_when_nothing_assessed: bool = False, key_images: bool = True) -> list[StudyResult]:
    """Grade every study found under ``folder``, print each result, and with ``out`` write its
    Structured Report, Grad-CAM Secondary Captures, (with ``pdf``) PDF summary and (with
    ``key_images``) Key Object Selection there. A study of
    which nothing could be assessed gets no outputs (unless ``report_when_nothing_assessed``)."""
    studies = read_folder(folder)
    for instances in studies.values():
        for ds, _ in instances:
            PHI_VALUES.add_from(ds)
    if not studies:
        raise ValueError(f"no DICOM images with geometry under {folder}")
    runner = OnnxRunner(model_dir, providers)
    log.info("model loaded", model_dir=str(runner.model_dir), providers=runner.providers)
    results = []
    printed: list[tuple[StudyResult, str | None]] = []
    for study_uid, instances in studies.items():
        with study_scope(study_uid):  # pydicom's repeated warnings: one line per study and warning, counted
            result = analyze_study(instances, runner)
        log.info("study graded", study_uid=study_uid, seconds=round(sum(result.seconds.values()), 3),
                 assessed=len(result.assessed()))
        results.append(result)
        skip = None if report_when_nothing_assessed else nothing_assessed(result)
        no_report = PHI_VALUES.scrub(str(skip)) if skip is not None else None
        printed.append((result, no_report))
        if no_report is not None:
            log.warning("no report: nothing could be assessed", study_uid=study_uid, reason=no_report)
        elif out is not None:
            written = write_outputs(result, instances, out, pdf, key_images)
            log.info("results written", study_uid=study_uid, sr=str(written.sr.path),
                     secondary_captures=sum(f.kind is OutputKind.SC for f in written.files),
                     pdf=next((str(f.path) for f in written.files if f.kind is OutputKind.PDF), None),
                     key_images=next((str(f.path) for f in written.files if f.kind is OutputKind.KOS), None))
    if as_json:
        echo(json.dumps([result_json(r) | ({"no_report": why} if why else {}) for r, why in printed], indent=1))
    else:
        echo("\n\n".join(result_table(r) + (f"\nNo report: {why}" if why else "") for r, why in printed))
    return results
