"""Grading one spooled study, in a worker process of the node: read the headers, check that it is a
lumbar spine MRI, run the ONNX model, write the SR and Grad-CAM SCs into the run's folder.

The worker never touches the ledger; it returns a GradeOutcome and the node records it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.logconfig import configure_logging, get_logger
from inference.labels import SeriesRole
from inference.runtime import OnnxRunner
from inference.series import assign_roles, group_series, role_of

log = get_logger(__name__)

REPORTED, SKIPPED, FAILED = "reported", "skipped", "failed"
# BodyPartExamined values (PS3.16 CID 4031 defined terms and common variants) that are a lumbar spine.
LUMBAR_BODY_PARTS = frozenset({"LSPINE", "SPINE", "TLSPINE", "LSSPINE", "LUMBAR", "LUMBARSPINE", "L-SPINE"})
ALL_ROLES = frozenset(SeriesRole)

_runner: OnnxRunner | None = None


@dataclass(frozen=True)
class GradeJob:
    """What a worker needs to grade one study (plain data: it crosses a process boundary)."""

    study_uid: str
    generation: int
    run: int
    paths: list[str]
    folder: str
    previous_sr: str | None = None
    sc_series_uid: str | None = None


@dataclass
class GradeOutcome:
    """What a worker returns: reported (with the files written), skipped or failed, with a reason."""

    state: str
    reason: str | None = None
    files: list[str] = field(default_factory=list)
    sr_series_uid: str | None = None
    sc_series_uid: str | None = None
    assessed: int = 0
    seconds: float = 0.0


def init_worker(model_dir: str | None, providers: tuple[str, ...], log_format: str, log_level: str) -> None:
    """Process-pool initializer: logging, and the ONNX sessions loaded once per worker.

    Ctrl-C and SIGTERM go to the node, which shuts the pool down in order; workers ignore them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    configure_logging(log_format, log_level)
    global _runner
    _runner = OnnxRunner(Path(model_dir) if model_dir else None, providers)


def _exit_with_parent(parent: int) -> None:
    """A worker whose node died (kill -9, OOM killer) exits instead of lingering as an orphan."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def worker_ready() -> dict[str, object]:
    """The loaded model and providers of this worker (the node calls it once per worker at start)."""
    assert _runner is not None, "init_worker was not run"
    info = _runner.info
    return {"model": info.name, "version": info.version, "sha256": info.sha256[:12], "providers": _runner.providers}


def _headers(paths: list[str]) -> list[tuple[pydicom.Dataset, Path]]:
    headers = []
    for name in paths:
        try:
            headers.append((pydicom.dcmread(name, stop_before_pixels=True), Path(name)))
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("left out a spooled file that cannot be read", path=name, error=str(exc))
    return headers


def mr_images(headers: list[tuple[pydicom.Dataset, Path]]) -> list[tuple[pydicom.Dataset, Path]]:
    """The MR instances among a study's headers (our own SR/SC and anything else left out)."""
    return [(ds, p) for ds, p in headers if ds.get("Modality") == "MR"]


def skip_reason(headers: list[tuple[pydicom.Dataset, Path]]) -> str | None:
    """Why this study is not a lumbar spine MRI we can grade, or None if it is."""
    if not headers:
        return "no readable DICOM instances"
    modalities = sorted({str(ds.get("Modality", "")) or "none" for ds, _ in headers})
    mr = mr_images(headers)
    if not mr:
        return f"not an MR study (modality {', '.join(modalities)})"
    parts = sorted({str(ds.get("BodyPartExamined", "")).upper() for ds, _ in mr} - {""})
    if parts and not LUMBAR_BODY_PARTS.intersection(parts):
        return f"not a lumbar spine study (BodyPartExamined {', '.join(parts)})"
    if not assign_roles(group_series(mr)):
        return "no Sagittal T1, Sagittal T2/STIR or Axial T2 series found"
    return None


def has_all_roles(headers: list[pydicom.Dataset]) -> bool:
    """Whether these headers (one or more per series) cover Sagittal T1, Sagittal T2/STIR and Axial T2."""
    roles = {role_of(s) for s in group_series((ds, None) for ds in headers)}
    return ALL_ROLES <= roles


def grade(job: GradeJob) -> GradeOutcome:
    """Grade one study (in a worker process); any error becomes a 'failed' outcome with its reason."""
    from dicom_node.predict import DISCLAIMER, result_json, result_table, write_results
    from inference.analyze import analyze_study

    started = time.perf_counter()
    try:
        headers = _headers(job.paths)
        reason = skip_reason(headers)
        if reason is not None:
            return GradeOutcome(SKIPPED, reason)
        assert _runner is not None, "init_worker was not run"
        mr = mr_images(headers)
        result = analyze_study(mr, _runner)
        folder = Path(job.folder)
        previous = pydicom.dcmread(job.previous_sr) if job.previous_sr else None
        written = write_results(result, mr, folder, previous, job.sc_series_uid)
        (folder / "results.txt").write_text(result_table(result) + "\n")
        (folder / "results.json").write_text(json.dumps(result_json(result), indent=1))
        sc_series = str(pydicom.dcmread(written[1], stop_before_pixels=True).SeriesInstanceUID) if len(written) > 1 else None
        sr_series = str(pydicom.dcmread(written[0], stop_before_pixels=True).SeriesInstanceUID)
        assessed = sum(r.assessed for r in result.labels)
        log.info("study graded", study_uid=job.study_uid, run=job.run, assessed=assessed,
                 seconds=round(time.perf_counter() - started, 3), note=DISCLAIMER)
        return GradeOutcome(REPORTED, None, [str(p) for p in written], sr_series, sc_series, assessed,
                            time.perf_counter() - started)
    except Exception as exc:
        log.exception("grading failed", study_uid=job.study_uid)
        return GradeOutcome(FAILED, f"grading failed: {type(exc).__name__}: {exc}")
