"""Releasing received studies for grading, and recording what the worker pool returns.

A receiving study is released when it has been quiet for ``study.quiet_time_s``, when it is
complete (``study.release_when_complete``), or at once when asked (an upload, "grade again"). A
study about to be released without a series it needs is first completed from the PACS, once
(``fetch``: in a thread of its own, within ``retrieve.wait_s``), then released. The
release hands a ``GradeJob`` to a pool of worker processes (``worker.py``); the outcome becomes a
report with its deliveries (``delivery.py``), or a skipped or failed study. A worker that dies is
counted against the study, and the pool is replaced.

The report goes ahead of the rest of its run: a worker tells the node (``worker.ReportNotice``, a
datagram to the ``ReportInbox``) once the SR is written and on disk, the node records it with
deliveries that hold it alone (``Ledger.add_report(more=True)``) and sends it while the worker
draws the heatmaps, the PDF and the KOS; the outcome then completes the run (``Ledger.complete_run``).
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

import pydicom

from dicom_node.config import Settings
from dicom_node.observability import NodeMetrics, get_logger, skip_label
from dicom_node.pipeline.audit import audit
from dicom_node.pipeline.delivery import Deliveries
from dicom_node.pipeline.eligibility import has_all_roles
from dicom_node.pipeline.fetch import Fetcher, missing_note
from dicom_node.pipeline.worker import GradeJob, GradeOutcome, ReportNotice, grade, init_worker
from dicom_node.results import OutputKind, RunFolder
from dicom_node.states import EventKind, GradeResult, StudyState
from dicom_node.store import Ledger, Report, Study, UnsafePath, remove_tree, under
from inference.analyze import AnalysisLimits
from inference.labels import SeriesRole

__all__ = ["SWEEP_INTERVAL_S", "Releaser", "ReportInbox"]

log = get_logger(__name__)

SWEEP_INTERVAL_S = 0.1  # a study complete by completeness is released within this (issue 24: 0.5 s waited 0.31 s)


class ReportInbox:
    """The node's end of the workers' report notices: one end of a Unix datagram socket pair whose
    other end (``worker_end``) every grading worker inherits when the pool starts it
    (``init_worker``), and a thread that hands each notice to ``receive``. Nothing on the file
    system, nobody else can send to it; datagrams: a worker killed mid-send harms no other's notice."""

    def __init__(self, receive: Callable[[ReportNotice], None]):
        self._socket, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.settimeout(0.5)
        self._receive = receive
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="report-inbox", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                notice = ReportNotice.decode(data)
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a malformed report notice", size=len(data))
                continue
            try:
                self._receive(notice)
            except Exception:  # the outcome records the run in full instead
                log.exception("could not record a report ahead of its run", study_uid=notice.study_uid)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._socket.close()
        self.worker_end.close()


class Releaser:
    """The sweep that releases studies, the worker pool that grades them, and the recording of
    each outcome. ``stopping`` (set by the node's ``stop()``) ends releasing and pool replacement."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: NodeMetrics, deliveries: Deliveries,
                 stopping: threading.Event, fetcher: Fetcher | None = None):
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.deliveries = deliveries
        self.stopping = stopping
        self.results_dir = Path(settings.storage.results_dir)
        self.inbox = ReportInbox(self._report_written)  # before the pool: its workers inherit its end
        self.pool = self._new_pool()
        self.grading: set[str] = set()  # studies handed to the pool and not back yet
        self._release_now: dict[str, str] = {}  # studies the next sweep releases at once, and why
        self.fetcher = fetcher  # asks the PACS for the series a study lacks (None: never)
        self.asking: set[str] = set()  # studies whose missing series are being asked for
        self._checked: dict[str, int] = {}  # study -> instance count already found incomplete by roles
        self._pool_lock = threading.Lock()
        self.started_at = time.time()
        self._jobs: dict[str, GradeJob] = {}  # study -> its job with the pool, until its outcome is recorded
        self._ahead: dict[str, Report] = {}  # study -> its run's report, recorded ahead of the rest
        self._recording = threading.Lock()  # a report notice and the outcome of its run recorded one at a time

    def _new_pool(self) -> ProcessPoolExecutor:
        s = self.settings
        return ProcessPoolExecutor(
            s.workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
            initargs=(str(s.models.dir) if s.models.dir else None, tuple(s.models.providers), s.logging.format,
                      s.logging.level, s.limits.worker_memory_mb, self.inbox.worker_end))

    def _run_folder(self, study_uid: str, run: int) -> Path:
        """results/<study>/run-<n>, checked to lie under the results folder (UnsafePath otherwise)."""
        return under(self.results_dir, study_uid, f"run-{run}")

    def _next_run(self, study_uid: str) -> int:
        last = self.ledger.last_report(study_uid)
        return last.run + 1 if last else 1

    def queued(self) -> int:
        """How many studies are with the worker pool (grading, or waiting for a worker)."""
        return len(self.grading)

    # -- at start ------------------------------------------------------------------------------------

    def count_worker_deaths(self) -> None:
        """At start: a study left analysing whose run folder still holds the running marker was
        being graded when its worker (and the node) died; count it, and give up on it at the limit."""
        for study in self.ledger.studies((StudyState.ANALYSING,)):
            try:
                folder = self._run_folder(study.study_uid, self._next_run(study.study_uid))
            except UnsafePath:
                continue
            if RunFolder(folder).running_marker.exists():
                self._worker_died(study.study_uid)

    def _worker_died(self, study_uid: str) -> None:
        limit = self.settings.limits.worker_deaths_before_giving_up
        reason = (f"the grading worker died on this study {limit} times (out of memory or killed); "
                  "not graded again until `lumbar-node reprocess`")
        if self.ledger.worker_died(study_uid, limit, reason):
            log.error("study failed: its grading killed the worker", study_uid=study_uid, deaths=limit)
        else:
            log.warning("the grading worker died on this study: it will be graded once more", study_uid=study_uid)

    # -- what the web page asks for ------------------------------------------------------------------

    def release_now(self, study_uid: str, why: str = "upload") -> None:
        """Grade a study at the next sweep, without waiting for the quiet time."""
        self._release_now[study_uid] = why

    def grade_again(self, study_uid: str, actor: str) -> bool:
        """Grade a study again (the new report supersedes the old). False if the ledger does not know it."""
        if not self.ledger.reopen(study_uid):
            return False
        audit(self.ledger, EventKind.GRADE_AGAIN, study_uid, f"requested by {actor}", actor=actor)
        self._release_now[study_uid] = "grade again"
        return True

    # -- releasing studies ---------------------------------------------------------------------------

    def sweep(self) -> None:
        """Release every receiving study that is quiet, or complete (when so configured)."""
        now = time.time()
        for study in self.ledger.studies((StudyState.RECEIVING,)):
            if self.stopping.is_set() or study.study_uid in self.grading or study.study_uid in self.asking:
                continue
            if study.study_uid in self._release_now:
                self._release(study, self._release_now.pop(study.study_uid))
            elif now - max(study.last_received, self.started_at) >= self.settings.study.quiet_time_s:
                self._release(study, "quiet time")
            elif self.settings.study.release_when_complete and self._complete(study):
                self._release(study, "complete")

    def _complete(self, study: Study) -> bool:
        """Every series holds its ImagesInAcquisition instances, and the three needed roles are there."""
        if self._checked.get(study.study_uid) == study.instances:
            return False
        series = self.ledger.series_counts(study.study_uid)
        if not series or any(s.expected is None or s.received < s.expected for s in series):
            return False
        self._checked[study.study_uid] = study.instances
        try:
            headers = [pydicom.dcmread(s.a_file, stop_before_pixels=True) for s in series]
        except Exception:  # noqa: BLE001 - unreadable: the quiet time will release it
            return False
        return has_all_roles(headers)

    def _ask_first(self, study: Study) -> bool:
        """Before a release: when the study lacks a needed series and the PACS was never asked about
        it, record that it is asked and ask in a thread of its own (True: not released now; the
        thread releases it when done)."""
        uid = study.study_uid
        if self.fetcher is None or not self.fetcher.sources or not self.settings.retrieve.missing_series:
            return False
        if self.ledger.pacs_query(uid) is not None:
            return False  # asked once already (before a restart, or by `lumbar-node fetch`)
        missing = self.fetcher.missing_roles(uid)
        if not missing or not self.ledger.ask_pacs(uid):
            return False
        self.asking.add(uid)
        log.info("study lacks needed series: asking the PACS before grading", study_uid=uid,
                 missing=sorted(r.value for r in missing))
        threading.Thread(target=self._ask, args=(self.fetcher, uid, missing), name="ask-pacs", daemon=True).start()
        return True

    def _ask(self, fetcher: Fetcher, study_uid: str, missing: set[SeriesRole]) -> None:
        """The thread that asks the sources about one study, records the answer, then releases it."""
        try:
            answer = fetcher.complete(study_uid, missing)
            self.ledger.pacs_answered(study_uid, answer.outcome, answer.source, answer.detail)
            log.info("asked the PACS for missing series", study_uid=study_uid, outcome=answer.outcome.value,
                     source=answer.source, instances=answer.retrieved, detail=answer.detail)
            audit(self.ledger, EventKind.ASKED_PACS, study_uid, f"{answer.outcome.value}: {answer.detail}",
                  {"outcome": answer.outcome.value, "source": answer.source, "instances": answer.retrieved})
        except Exception:  # the study is graded with what it has; the ledger says it was asked
            log.exception("asking the PACS for missing series failed", study_uid=study_uid)
        finally:
            self._release_now[study_uid] = "after asking the PACS"
            self.asking.discard(study_uid)

    def _release(self, study: Study, why: str) -> None:
        uid = study.study_uid
        if self._ask_first(study):
            return
        if not self.ledger.set_state(uid, StudyState.ANALYSING, generation=study.generation):
            return  # an instance arrived in between: next sweep
        self._checked.pop(uid, None)
        run = self._next_run(uid)
        try:
            folder = self._run_folder(uid, run)
        except UnsafePath as exc:  # a ledger from before UIDs were checked at the door
            self.ledger.set_state(uid, StudyState.FAILED, f"not graded: {exc}", generation=study.generation)
            return
        remove_tree(self.results_dir, folder)  # a run cut short by a crash is redone from scratch
        previous = self.ledger.last_report(uid, published=True)  # what the PACS has is what is superseded
        limits = self.settings.limits
        job = GradeJob(uid, study.generation, run, [str(p) for p in self.ledger.instance_paths(uid)], str(folder),
                       previous.sr_path if previous else None, previous.sc_series_uid if previous else None,
                       AnalysisLimits(limits.max_series_images, limits.max_pixels, limits.localiser_batch),
                       limits.grading_timeout_s, pdf=self.settings.outputs.pdf,
                       report_when_nothing_assessed=self.settings.study.report_when_nothing_assessed,
                       key_images=self.settings.outputs.key_images,
                       missing_note=missing_note(self.ledger.pacs_query(uid)),
                       fsync=self.settings.storage.fsync, notify=True)
        log.info("study released for grading", study_uid=uid, why=why, instances=study.instances, run=run)
        self.metrics.released.labels(why).inc()
        audit(self.ledger, EventKind.RELEASED, uid, f"run {run}: {why}, {study.instances} instances",
              {"run": run, "why": why, "instances": study.instances})
        self.grading.add(uid)
        with self._recording:
            self._jobs[uid] = job
        pool = self.pool
        try:
            future = pool.submit(grade, job)
        except (RuntimeError, BrokenProcessPool) as exc:  # shutting down, or a dead pool
            self.grading.discard(uid)
            with self._recording:
                self._jobs.pop(uid, None)
            self.ledger.set_state(uid, StudyState.RECEIVING, generation=study.generation)
            if isinstance(exc, BrokenProcessPool):
                self._replace_pool(pool)
            return
        future.add_done_callback(partial(self._graded, job, pool))

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """A new worker pool in place of ``broken`` (once, however many of its futures report it)."""
        with self._pool_lock:
            if self.pool is broken and not self.stopping.is_set():
                self.pool = self._new_pool()
                log.warning("grading workers replaced after one of them died")

    # -- recording outcomes --------------------------------------------------------------------------

    def _report_written(self, notice: ReportNotice) -> None:
        """A worker wrote a run's report (the inbox's thread): record it with deliveries that hold it
        alone, and send it. Ignored unless it is the report of a job with the pool, in its folder."""
        uid = notice.study_uid
        with self._recording:
            job = self._jobs.get(uid)
            sr = Path(notice.sr_path)
            if (job is None or job.run != notice.run or uid in self._ahead or sr.parent != Path(job.folder)
                    or not sr.is_file()):
                return
            report = Report(uid, job.run, str(sr), notice.sr_series_uid, notice.sc_series_uid)
            upload = self.ledger.upload(uid)
            destinations = list(self.deliveries.destinations) if upload is None or upload.send else []
            ids = self.ledger.add_report(report, job.generation, destinations, [str(sr)], more=True)
            if ids is None:
                return  # a late instance re-opened the study: the outcome discards the run
            self._ahead[uid] = report
        log.info("report recorded ahead of its run", study_uid=uid, run=job.run, sr=report.sr_path,
                 waited_s=round(time.time() - notice.sent_at, 4))
        self.deliveries.schedule_ids(ids)

    def _graded(self, job: GradeJob, pool: ProcessPoolExecutor, future: Future[GradeOutcome]) -> None:
        """Record a worker's outcome (in the pool's thread): report + deliveries, or skipped/failed."""
        with self._recording:
            self._jobs.pop(job.study_uid, None)
            ahead = self._ahead.pop(job.study_uid, None)
            self._record(job, pool, future, ahead)

    def _record(self, job: GradeJob, pool: ProcessPoolExecutor, future: Future[GradeOutcome],
                ahead: Report | None) -> None:
        """``_graded``'s work; ``ahead``: the run's report, recorded already (``_report_written``)."""
        uid = job.study_uid
        try:
            if future.cancelled():
                if ahead is not None:
                    self.ledger.abandon_run(uid)
                return  # shut down before it ran: resumed at the next start
            try:
                outcome: GradeOutcome = future.result()
            except BrokenProcessPool:
                self._replace_pool(pool)
                if self.stopping.is_set():
                    return  # ended by the shutdown: resumed at the next start
                if RunFolder(Path(job.folder)).running_marker.exists():
                    self._worker_died(uid)  # the study the worker died on
                else:  # queued behind it: graded by the new pool, not failed with it
                    self.ledger.set_state(uid, StudyState.RECEIVING, generation=job.generation)
                return
            except Exception as exc:  # noqa: BLE001 - whatever the pool raises fails this study, not the node
                outcome = GradeOutcome.failed(f"grading failed: {type(exc).__name__}: {exc}")
            if outcome.result is not GradeResult.REPORTED or outcome.outputs is None:
                if ahead is not None:  # failed after its report was recorded (and maybe sent)
                    self.ledger.abandon_run(uid)
                state = outcome.result.study_state
                if self.ledger.set_state(uid, state, outcome.reason, generation=job.generation):
                    log.warning(f"study {state}", study_uid=uid, reason=outcome.reason)
                    skipped = state is StudyState.SKIPPED
                    (self.metrics.skipped.labels(skip_label(outcome.reason)) if skipped else self.metrics.failed).inc()
                    audit(self.ledger, EventKind.SKIPPED if skipped else EventKind.GRADING_FAILED, uid,
                          f"run {job.run}: {outcome.reason}", {"run": job.run})
                return
            outputs = outcome.outputs
            report = Report(uid, job.run, str(outputs.sr.path), outputs.sr.series_uid,
                            outputs.series_uid(OutputKind.SC))
            files = [str(p) for p in outputs.paths]  # on disk (job.fsync): the commit below publishes them
            upload = self.ledger.upload(uid)
            destinations = list(self.deliveries.destinations) if upload is None or upload.send else []
            if ahead is not None:
                ids: list[int] | None = self.ledger.complete_run(uid, job.run, job.generation, files)
            else:
                ids = self.ledger.add_report(report, job.generation, destinations, files)
            if ids is None:
                log.info("graded run discarded: new instances arrived while grading", study_uid=uid, run=job.run)
                remove_tree(self.results_dir, Path(job.folder))
                return
            log.info("results ready", study_uid=uid, run=job.run, sr=report.sr_path, files=len(files),
                     seconds=round(outcome.seconds, 3))
            self.metrics.graded.inc()
            self.metrics.grading_seconds.observe(outcome.seconds)
            audit(self.ledger, EventKind.GRADED, uid, f"run {job.run}: {outcome.assessed} of 25 labels assessed in "
                  f"{outcome.seconds:.1f} s" + ("" if destinations else "; not sent (upload)"),
                  {"run": job.run, "assessed": outcome.assessed, "seconds": round(outcome.seconds, 3),
                   "series_roles": RunFolder(outputs.folder).series_roles()})
            self.deliveries.schedule_ids(ids)
        except Exception:  # never lose the pool's thread; the study stays analysing and is resumed at start
            log.exception("could not record a grading outcome", study_uid=uid)
        finally:
            self.grading.discard(uid)

    # -- shutting down -------------------------------------------------------------------------------

    def shutdown(self, grace_s: float) -> None:
        """Let a running grading finish within ``grace_s`` (queued ones are resumed at the next
        start); a grading that hangs has its worker ended."""
        shutdown = threading.Thread(target=self.pool.shutdown, kwargs={"wait": True, "cancel_futures": True},
                                    name="pool-shutdown", daemon=True)
        shutdown.start()
        shutdown.join(grace_s)
        self.inbox.close()
        if shutdown.is_alive():  # a grading that hangs: end its worker rather than wait for ever
            for worker in multiprocessing.active_children():
                log.warning("a grading worker did not finish in time: ended", pid=worker.pid, grace_s=grace_s)
                worker.kill()
            shutdown.join(10.0)

