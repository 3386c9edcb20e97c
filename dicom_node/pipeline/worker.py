"""Grading one spooled study, in a worker process of the node: read the headers, check that it is a
lumbar spine MRI (``eligibility``), run the ONNX model, write the run's outputs into its folder.

The worker never touches the ledger; it returns a GradeOutcome and the node records it. With
``GradeJob.notify`` it also tells the node as soon as the run's report is written and on disk
(``ReportNotice``: one datagram on the socket it inherited from the node), so that the node records the report and
sends it while the worker draws the rest of the run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from dicom_node.errors import NodeError
from dicom_node.observability import PHI_VALUES, configure_logging, get_logger, study_scope
from dicom_node.pipeline.eligibility import mr_images, note_missing, nothing_assessed, skip_reason
from dicom_node.results import DISCLAIMER, OutputFile, OutputKind, RunFolder, RunOutputs, Supersedes, write_run
from dicom_node.states import GradeResult
from dicom_node.store import Syncer, fsync_files
from inference.analyze import AnalysisLimits, analyze_study
from inference.instances import read_headers
from inference.runtime import OnnxRunner

__all__ = ["MIXED_PATIENTS", "GradeJob", "GradeOutcome", "GradingTimeout", "ReportNotice", "grade", "init_worker",
           "worker_ready"]

log = get_logger(__name__)

MIXED_PATIENTS = "instances of more than one patient (PatientID differs): not graded, nothing sent"

_runner: OnnxRunner | None = None
_reports: socket.socket | None = None  # the node's report inbox (``init_worker``)


class GradingTimeout(NodeError):
    """The grading of one study took longer than ``limits.grading_timeout_s``."""


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
    limits: AnalysisLimits = field(default_factory=AnalysisLimits)
    timeout_s: float = 600.0
    pdf: bool = True  # outputs.pdf: write the PDF summary too
    report_when_nothing_assessed: bool = False  # study.report_when_nothing_assessed
    key_images: bool = True  # outputs.key_images: write the Key Object Selection too
    missing_note: str | None = None  # the PACS was asked for the missing series: added to their labels' reasons
    fsync: bool = False  # storage.fsync: the files are on disk when the worker returns (store.Syncer)
    notify: bool = False  # tell the node when the report is written (ReportNotice, to the worker's ``reports``)


@dataclass(frozen=True)
class GradeOutcome:
    """What a worker returns: a report with the files written, or skipped / failed with a reason."""

    result: GradeResult
    reason: str | None = None
    outputs: RunOutputs | None = None
    assessed: int = 0
    seconds: float = 0.0

    @classmethod
    def reported(cls, outputs: RunOutputs, assessed: int, seconds: float) -> GradeOutcome:
        return cls(GradeResult.REPORTED, None, outputs, assessed, seconds)

    @classmethod
    def skipped(cls, reason: str) -> GradeOutcome:
        return cls(GradeResult.SKIPPED, reason)

    @classmethod
    def failed(cls, reason: str) -> GradeOutcome:
        return cls(GradeResult.FAILED, reason)


def init_worker(model_dir: str | None, providers: tuple[str, ...], log_format: str, log_level: str,
                memory_mb: int | None = None, reports: socket.socket | None = None) -> None:
    """Process-pool initializer: logging, the memory limit, and the ONNX sessions loaded once.

    Ctrl-C and SIGTERM go to the node, which shuts the pool down in order; workers ignore them.
    With ``memory_mb`` the worker's address space is limited (RLIMIT_AS): a study that needs more
    fails with MemoryError instead of taking the machine's memory.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if memory_mb is not None:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    configure_logging(log_format, log_level)
    global _runner, _reports
    _reports = reports  # the node's report inbox (``ReportNotice``), inherited from the node
    _runner = OnnxRunner(Path(model_dir) if model_dir else None, providers)


def _exit_with_parent(parent: int) -> None:
    """A worker whose node died (kill -9, OOM killer) exits instead of lingering as an orphan."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _loaded_runner() -> OnnxRunner:
    if _runner is None:
        raise RuntimeError("init_worker was not run in this process")
    return _runner


def worker_ready() -> dict[str, object]:
    """The loaded model and providers of this worker (the node calls it once per worker at start)."""
    runner = _loaded_runner()
    info = runner.info
    return {"model": info.name, "version": info.version, "sha256": info.sha256[:12], "providers": runner.providers}



@dataclass(frozen=True)
class ReportNotice:
    """The datagram a worker sends the node once the run's report is written (and, with fsync,
    on disk): which run, the SR, and the series the run's Secondary Captures will have."""

    study_uid: str
    run: int
    sr_path: str
    sr_series_uid: str
    sc_series_uid: str | None
    sent_at: float  # time.time() when sent

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, data: bytes) -> ReportNotice:
        """The notice in ``data`` (ValueError, KeyError or TypeError when it is not one)."""
        fields = json.loads(data)
        return cls(str(fields["study_uid"]), int(fields["run"]), str(fields["sr_path"]), str(fields["sr_series_uid"]),
                   None if fields["sc_series_uid"] is None else str(fields["sc_series_uid"]), float(fields["sent_at"]))


def _notifier(job: GradeJob) -> Callable[[OutputFile, str | None], None] | None:
    """What the writer calls with the report once written: it is made durable (with ``job.fsync``:
    the file, its folder and the folder's parent) and the node told (``job.notify``, through the
    socket this worker inherited, ``init_worker``). A node that cannot be told learns of the report
    from the outcome, as without a notice."""
    reports = _reports
    if not job.notify or reports is None:
        return None

    def report_written(sr: OutputFile, sc_series_uid: str | None) -> None:
        if job.fsync:
            fsync_files([sr.path])
        notice = ReportNotice(job.study_uid, job.run, str(sr.path), sr.series_uid, sc_series_uid, time.time())
        try:
            reports.send(notice.encode(), socket.MSG_DONTWAIT)  # never waits on a node that does not read
        except OSError as exc:
            log.warning("could not tell the node that the report is written", study_uid=job.study_uid, error=str(exc))

    return report_written


def _timed_out(signum: int, frame: object) -> None:
    raise GradingTimeout


def grade(job: GradeJob) -> GradeOutcome:
    """Grade one study (in a worker process) within ``job.timeout_s``; any error becomes a
    'failed' outcome with its reason. A grading stuck where Python cannot interrupt it (inside a
    native call) ends the worker 30 s after the timeout; the node then replaces it."""
    marker = RunFolder(Path(job.folder)).running_marker  # left behind: the study the worker died on
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    watchdog = threading.Timer(job.timeout_s + 30.0, os._exit, (70,))
    watchdog.daemon = True
    watchdog.start()
    previous = signal.signal(signal.SIGALRM, _timed_out)
    signal.setitimer(signal.ITIMER_REAL, job.timeout_s)
    try:
        return _grade(job)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        watchdog.cancel()
        marker.unlink(missing_ok=True)


def _grade(job: GradeJob) -> GradeOutcome:
    with study_scope(job.study_uid):  # pydicom's repeated warnings: one line per study and warning, counted
        return _grade_study(job)


def _grade_study(job: GradeJob) -> GradeOutcome:
    started = time.perf_counter()
    try:
        headers = read_headers(job.paths)
        for ds, _ in headers:
            PHI_VALUES.add_from(ds)  # scrubbed from this worker's log lines and from the reasons it returns
        skip = skip_reason(headers)
        if skip is not None:
            return GradeOutcome.skipped(str(skip))
        mr = mr_images(headers)
        if len({str(ds.get("PatientID", "")) for ds, _ in mr}) > 1:  # a mislabelled instance: never mix patients
            return GradeOutcome.failed(MIXED_PATIENTS)
        read = time.perf_counter()
        result = analyze_study(mr, _loaded_runner(), job.limits)
        if job.missing_note is not None:
            result = note_missing(result, job.missing_note)
        skip = None if job.report_when_nothing_assessed else nothing_assessed(result)
        if skip is not None:
            log.info("study skipped: nothing could be assessed, nothing sent", study_uid=job.study_uid, run=job.run)
            return GradeOutcome.skipped(PHI_VALUES.scrub(str(skip)))
        supersedes = None
        if job.previous_sr:
            supersedes = Supersedes(pydicom.dcmread(job.previous_sr), job.sc_series_uid)
        analysed = time.perf_counter()
        with Syncer() as syncer:  # each file fsynced while the next is drawn and written
            outputs = write_run(result, mr, Path(job.folder), supersedes, pdf=job.pdf, key_images=job.key_images,
                                sink=syncer.add if job.fsync else None, on_report=_notifier(job))
            written = time.perf_counter()
            syncer.finish()
        assessed = len(result.assessed())
        steps = {f"{step}_s": s for step, s in outputs.seconds.items()}  # the writer's steps
        log.info("study graded", study_uid=job.study_uid, run=job.run, assessed=assessed,
                 sc_series_uid=outputs.series_uid(OutputKind.SC),
                 seconds=round(time.perf_counter() - started, 3), headers_s=round(read - started, 4),
                 analysis_s=round(analysed - read, 4), **steps, fsync_s=round(time.perf_counter() - written, 4),
                 note=DISCLAIMER)
        return GradeOutcome.reported(outputs, assessed, time.perf_counter() - started)
    except GradingTimeout:
        log.error("grading timed out", study_uid=job.study_uid, timeout_s=job.timeout_s)
        return GradeOutcome.failed(f"grading took longer than {job.timeout_s:g} s (limits.grading_timeout_s)")
    except MemoryError:
        log.error("grading ran out of memory", study_uid=job.study_uid)
        return GradeOutcome.failed("grading needed more memory than a worker may use (limits.worker_memory_mb)")
    except Exception as exc:
        log.exception("grading failed", study_uid=job.study_uid)
        return GradeOutcome.failed(PHI_VALUES.scrub(f"grading failed: {type(exc).__name__}: {exc}"))
