"""``lumbar-node predict``: grade the studies in a folder of DICOM files with the ONNX model."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.logconfig import get_logger
from inference.analyze import StudyResult, analyze_study
from inference.labels import SEVERITY_NAMES
from inference.runtime import OnnxRunner

log = get_logger(__name__)
DISCLAIMER = "AI result - not for diagnosis. Model trained on synthetic phantom data, not a clinical model."


def read_folder(folder: Path) -> dict[str, list[tuple[pydicom.Dataset, Path]]]:
    """Image headers under ``folder`` grouped by StudyInstanceUID; unreadable files are logged and skipped."""
    studies: dict[str, list[tuple[pydicom.Dataset, Path]]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("skipped a file that is not readable DICOM", path=str(path), error=str(exc))
            continue
        if "StudyInstanceUID" in ds and "ImageOrientationPatient" in ds:
            studies[str(ds.StudyInstanceUID)].append((ds, path))
    return dict(studies)


def result_json(result: StudyResult) -> dict[str, Any]:
    """A study result as plain JSON (Grad-CAM maps left out)."""
    labels = []
    for r in result.labels:
        item: dict[str, Any] = {"label": r.label.column, "condition": r.label.condition.display,
                                "level": r.label.level.value, "assessed": r.assessed}
        if r.assessed and r.location is not None:
            item.update({"grade": r.grade.display, "probabilities": dict(zip(SEVERITY_NAMES, r.probabilities, strict=True)),
                         "series_uid": r.location.series_uid, "sop_instance_uid": r.location.sop_instance_uid,
                         "instance_number": r.location.instance_number, "pixel_xy": r.location.pixel,
                         "patient_xyz": r.location.patient})
        else:
            item["reason"] = r.reason
        labels.append(item)
    info = result.model
    return {"study_uid": result.study_uid, "disclaimer": DISCLAIMER,
            "model": None if info is None else {"name": info.name, "version": info.version, "sha256": info.sha256,
                                               "training_data": info.training_data},
            "series_roles": result.series_roles, "seconds": result.seconds, "labels": labels}


def result_table(result: StudyResult) -> str:
    """A fixed-width table, one row per label."""
    lines = [f"Study {result.study_uid}", DISCLAIMER,
             f"{'level':6} {'condition':34} {'grade':12} {'P(N/M)':>7} {'P(Mod)':>7} {'P(Sev)':>7}  where"]
    for r in result.labels:
        if r.assessed and r.location is not None:
            p = r.probabilities
            where = f"series ...{r.location.series_uid[-8:]} image {r.location.instance_number}"
            lines.append(f"{r.label.level.value:6} {r.label.condition.display:34} {r.grade.display:12} "
                         f"{p[0]:7.3f} {p[1]:7.3f} {p[2]:7.3f}  {where}")
        else:
            lines.append(f"{r.label.level.value:6} {r.label.condition.display:34} {'not assessed':12} {r.reason}")
    return "\n".join(lines)


def write_results(result: StudyResult, instances: list[tuple[pydicom.Dataset, Path]], folder: Path,
                  previous_sr: pydicom.Dataset | None = None, sc_series_uid: str | None = None) -> list[Path]:
    """Write a study's SR (``SR_<uid>.dcm``, first) and Grad-CAM SCs (``SC/``) into ``folder``.

    With ``previous_sr`` the new report supersedes it (Predecessor Documents Sequence, same series,
    next instance number); ``sc_series_uid`` keeps the heatmaps in the series they had.
    """
    from dicom_node.sc import build_sc_images
    from dicom_node.sr import build_sr

    headers = {str(ds.SOPInstanceUID): ds for ds, _ in instances}
    paths = {str(ds.SOPInstanceUID): path for ds, path in instances}
    located = {r.location.sop_instance_uid for r in result.labels if r.location is not None}
    full = {uid: pydicom.dcmread(paths[uid]) for uid in located}
    (folder / "SC").mkdir(parents=True, exist_ok=True)
    sr = build_sr(result, headers, series_uid=None if previous_sr is None else str(previous_sr.SeriesInstanceUID),
                  instance_number=1 if previous_sr is None else int(previous_sr.InstanceNumber) + 1,
                  predecessors=[] if previous_sr is None else [previous_sr])
    written = [folder / f"SR_{sr.SOPInstanceUID}.dcm"]
    sr.save_as(written[0])
    for sc in build_sc_images(result, full, series_uid=sc_series_uid):
        written.append(folder / "SC" / f"{int(sc.InstanceNumber):02d}_{sc.SOPInstanceUID}.dcm")
        sc.save_as(written[-1])
    return written


def write_outputs(result: StudyResult, instances: list[tuple[pydicom.Dataset, Path]], out: Path) -> list[Path]:
    """The study's SR and Grad-CAM Secondary Captures under ``out/<StudyInstanceUID>/``; a re-run
    supersedes the newest SR found there and replaces the heatmaps, keeping their series."""
    folder = out / result.study_uid
    previous = sorted((pydicom.dcmread(p) for p in folder.glob("SR_*.dcm")), key=lambda d: int(d.InstanceNumber))
    old_sc = sorted((folder / "SC").glob("*.dcm"))
    sc_series = str(pydicom.dcmread(old_sc[0], stop_before_pixels=True).SeriesInstanceUID) if old_sc else None
    if previous:
        log.info("superseding an earlier report", study_uid=result.study_uid,
                 predecessor=str(previous[-1].SOPInstanceUID))
    for path in old_sc:  # the superseded heatmaps leave this folder (a PACS keeps its copies)
        path.unlink()
    return write_results(result, instances, folder, previous[-1] if previous else None, sc_series)


def predict_folder(folder: Path, model_dir: Path | None, providers: tuple[str, ...], as_json: bool,
                   echo: Callable[[str], None], out: Path | None = None) -> list[StudyResult]:
    """Grade every study found under ``folder``, print each result, and with ``out`` write its
    Structured Report and Grad-CAM Secondary Captures there."""
    studies = read_folder(folder)
    if not studies:
        raise ValueError(f"no DICOM images with geometry under {folder}")
    runner = OnnxRunner(model_dir, providers)
    log.info("model loaded", model_dir=str(runner.model_dir), providers=runner.providers)
    results = []
    for study_uid, instances in studies.items():
        result = analyze_study(instances, runner)
        log.info("study graded", study_uid=study_uid, seconds=round(sum(result.seconds.values()), 3),
                 assessed=sum(r.assessed for r in result.labels))
        results.append(result)
        if out is not None:
            written = write_outputs(result, instances, out)
            log.info("results written", study_uid=study_uid, sr=str(written[0]), secondary_captures=len(written) - 1)
    if as_json:
        echo(json.dumps([result_json(r) for r in results], indent=1))
    else:
        echo("\n\n".join(result_table(r) for r in results))
    return results
