"""The node: the storage SCP, the ledger, study release, grading in a worker pool, and delivery
of the results with retries (apscheduler), all resumable from the ledger after a restart.

Threads: pynetdicom runs one thread per association (they only write to the spool and the
ledger); the scheduler's threads run the release sweep and the deliveries; grading runs in worker
processes, so the model's CPU time never holds up an association.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pydicom
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Settings
from dicom_node.delivery import DeliveryError, backoff, send_files
from dicom_node.durable import fsync_files, restrict_access
from dicom_node.grading import (
    RUNNING_MARKER,
    GradeJob,
    GradeOutcome,
    grade,
    has_all_roles,
    init_worker,
    worker_ready,
)
from dicom_node.ledger import Delivery, Ledger, Report, Study
from dicom_node.logconfig import get_logger
from dicom_node.metrics import NodeMetrics, skip_label
from dicom_node.outputs import PDF_GLOB, SC_FOLDER, OutputKind
from dicom_node.safety import UnsafePath, remove_tree, under
from dicom_node.states import DeliveryState, EventKind, GradeResult, StudyState
from dicom_node.storage_scp import StorageSCP, restore_poll_interval, set_poll_interval
from dicom_node.tls import describe
from inference.analyze import AnalysisLimits

log = get_logger(__name__)

SWEEP_INTERVAL_S = 0.5
PURGE_INTERVAL_S = 10.0


class Node:
    """The running node. ``start()`` resumes from the ledger; ``stop()`` shuts down in order."""

    def __init__(self, settings: Settings):
        self.settings = settings
        storage = settings.storage
        restrict_access([Path(storage.spool_dir), Path(storage.results_dir)], storage.group,
                        shared=[Path(storage.ledger_path).parent])
        self.results_dir = Path(settings.storage.results_dir)
        self.ledger = Ledger(Path(settings.storage.ledger_path))
        self.metrics = NodeMetrics()
        self.scp = StorageSCP(settings, self.ledger, self.metrics)
        self.web = None  # the web page (dicom_node.web), started by start() when web.port is set
        self._release_now: set[str] = set()  # uploaded studies the next sweep releases at once
        self.scheduler = BackgroundScheduler(timezone=UTC,
                                             job_defaults={"misfire_grace_time": None, "coalesce": True})
        self.destinations = {d.name: d for d in settings.destinations}
        self.pool = self._new_pool()
        self._grading: set[str] = set()  # studies handed to the pool and not back yet
        self._checked: dict[str, int] = {}  # study -> instance count already found incomplete by roles
        self._stopping = threading.Event()
        self._pool_lock = threading.Lock()
        self._started_at = time.time()

    def _new_pool(self) -> ProcessPoolExecutor:
        s = self.settings
        return ProcessPoolExecutor(
            s.workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
            initargs=(str(s.models.dir) if s.models.dir else None, tuple(s.models.providers), s.logging.format,
                      s.logging.level, s.limits.worker_memory_mb))

    def _run_folder(self, study_uid: str, run: int) -> Path:
        """results/<study>/run-<n>, checked to lie under the results folder (UnsafePath otherwise)."""
        return under(self.results_dir, study_uid, f"run-{run}")

    def _next_run(self, study_uid: str) -> int:
        last = self.ledger.last_report(study_uid)
        return last.run + 1 if last else 1

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in every worker, resume the ledger's unfinished work, then listen.

        pynetdicom's reactors are set to poll every ``node.poll_interval_ms`` here, for the whole
        process (see ``storage_scp.set_poll_interval``), and restored by ``stop()``."""
        set_poll_interval(self.settings.node.poll_interval_ms / 1000)
        ready = [self.pool.submit(worker_ready) for _ in range(self.settings.workers)]
        log.info("grading workers ready", workers=self.settings.workers, **ready[0].result())
        self._started_at = time.time()  # a study cut off by a restart gets a fresh quiet time
        self._count_worker_deaths()
        regrade = self.ledger.resume()
        self.scheduler.start()
        pending = self.ledger.deliveries(state=DeliveryState.PENDING)
        for delivery in pending:
            self._schedule_delivery(delivery)
        log.info("resumed from the ledger", studies_to_grade=regrade + len(self.ledger.studies((StudyState.RECEIVING,))),
                 deliveries_pending=len(pending))
        self.scheduler.add_job(self.sweep, "interval", seconds=SWEEP_INTERVAL_S, id="sweep", max_instances=1)
        storage = self.settings.storage
        if storage.retention_days is not None or storage.purge_below_free_mb:
            self.scheduler.add_job(self.purge, "interval", seconds=PURGE_INTERVAL_S, id="purge", max_instances=1,
                                   next_run_time=datetime.now(UTC))
        self.scp.start()
        if self.settings.web.port is not None:
            from dicom_node.web.server import WebServer

            self.web = WebServer(self)
            self.web.start()

    def _count_worker_deaths(self) -> None:
        """At start: a study left analysing whose run folder still holds the running marker was
        being graded when its worker (and the node) died; count it, and give up on it at the limit."""
        for study in self.ledger.studies((StudyState.ANALYSING,)):
            try:
                folder = self._run_folder(study.study_uid, self._next_run(study.study_uid))
            except UnsafePath:
                continue
            if (folder / RUNNING_MARKER).exists():
                self._worker_died(study.study_uid)

    def _worker_died(self, study_uid: str) -> None:
        limit = self.settings.limits.worker_deaths_before_giving_up
        reason = (f"the grading worker died on this study {limit} times (out of memory or killed); "
                  "not graded again until `lumbar-node reprocess`")
        if self.ledger.worker_died(study_uid, limit, reason):
            log.error("study failed: its grading killed the worker", study_uid=study_uid, deaths=limit)
        else:
            log.warning("the grading worker died on this study: it will be graded once more", study_uid=study_uid)

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new associations and finish the writes in flight, let a running grading finish
        within ``grace_s`` (queued ones are resumed at the next start; a grading that hangs is
        ended), stop the deliveries, close the ledger."""
        self._stopping.set()
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        for job in ("sweep", "purge"):
            if self.scheduler.get_job(job) is not None:
                self.scheduler.remove_job(job)
        shutdown = threading.Thread(target=self.pool.shutdown, kwargs={"wait": True, "cancel_futures": True},
                                    name="pool-shutdown", daemon=True)
        shutdown.start()
        shutdown.join(grace_s)
        if shutdown.is_alive():  # a grading that hangs: end its worker rather than wait for ever
            for worker in multiprocessing.active_children():
                log.warning("a grading worker did not finish in time: ended", pid=worker.pid, grace_s=grace_s)
                worker.kill()
            shutdown.join(10.0)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.ledger.close()
        restore_poll_interval()
        log.info("node stopped")

    # -- retention -----------------------------------------------------------------------------------

    def purge(self) -> int:
        """Remove the spool files and results of finished studies past ``storage.retention_days``,
        and, oldest first, while free disk is under ``storage.purge_below_free_mb``. Only the files
        the ledger lists are removed (an instance arriving meanwhile stays); a study in work never
        is a candidate. Returns how many studies were purged."""
        storage, now = self.settings.storage, time.time()
        settle = self.settings.study.quiet_time_s  # nothing that may still be arriving
        candidates = self.ledger.purgeable(now - settle)
        spool, results = Path(storage.spool_dir), self.results_dir
        purged = 0
        for study_uid, files in candidates:
            too_old = storage.retention_days is not None and self._last_received(study_uid) < now - storage.retention_days * 86400
            disk_low = storage.purge_below_free_mb and shutil.disk_usage(spool).free < storage.purge_below_free_mb * 2**20
            if not (too_old or disk_low):
                continue
            try:
                for path in files:
                    under(spool, *path.resolve().relative_to(spool.resolve()).parts).unlink(missing_ok=True)
                # the series folders, then the study's (spool/<study>/<series>/<sop>.dcm)
                for folder in sorted({p.parent for p in files} | {p.parent.parent for p in files},
                                     key=lambda f: len(f.parts), reverse=True):
                    if folder.resolve() != spool.resolve() and folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
                remove_tree(results, under(results, study_uid))
            except (UnsafePath, ValueError, OSError) as exc:
                log.error("could not purge a study", study_uid=study_uid, error=f"{type(exc).__name__}: {exc}")
                continue
            why = "retention" if too_old else "disk watermark"
            self.ledger.purged(study_uid, files, f"{len(files)} spooled instances and the results ({why})")
            log.info("study purged", study_uid=study_uid, instances=len(files), why=why)
            purged += 1
        return purged

    def _last_received(self, study_uid: str) -> float:
        study = self.ledger.study(study_uid)
        return study.last_received if study is not None else time.time()

    # -- releasing studies ----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Release every receiving study that is quiet, or complete (when so configured)."""
        now = time.time()
        for study in self.ledger.studies((StudyState.RECEIVING,)):
            if self._stopping.is_set() or study.study_uid in self._grading:
                continue
            if study.study_uid in self._release_now:
                self._release_now.discard(study.study_uid)
                self._release(study, "upload")
            elif now - max(study.last_received, self._started_at) >= self.settings.study.quiet_time_s:
                self._release(study, "quiet time")
            elif self.settings.study.release_when_complete and self._complete(study):
                self._release(study, "complete")

    def _complete(self, study: Study) -> bool:
        """Every series holds its ImagesInAcquisition instances, and the three needed roles are there."""
        if self._checked.get(study.study_uid) == study.instances:
            return False
        series = self.ledger.series_counts(study.study_uid)
        if not series or any(size is None or count < size for _, count, size, _ in series):
            return False
        self._checked[study.study_uid] = study.instances
        try:
            headers = [pydicom.dcmread(path, stop_before_pixels=True) for *_, path in series]
        except Exception:  # noqa: BLE001 - unreadable: the quiet time will release it
            return False
        return has_all_roles(headers)

    def _release(self, study: Study, why: str) -> None:
        uid = study.study_uid
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
                       report_when_nothing_assessed=self.settings.study.report_when_nothing_assessed)
        log.info("study released for grading", study_uid=uid, why=why, instances=study.instances, run=run)
        self.metrics.released.labels(why).inc()
        self.audit(EventKind.RELEASED, uid, f"run {run}: {why}, {study.instances} instances",
                   {"run": run, "why": why, "instances": study.instances})
        self._grading.add(uid)
        pool = self.pool
        try:
            future = pool.submit(grade, job)
        except (RuntimeError, BrokenProcessPool) as exc:  # shutting down, or a dead pool
            self._grading.discard(uid)
            self.ledger.set_state(uid, StudyState.RECEIVING, generation=study.generation)
            if isinstance(exc, BrokenProcessPool):
                self._replace_pool(pool)
            return
        future.add_done_callback(partial(self._graded, job, pool))

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """A new worker pool in place of ``broken`` (once, however many of its futures report it)."""
        with self._pool_lock:
            if self.pool is broken and not self._stopping.is_set():
                self.pool = self._new_pool()
                log.warning("grading workers replaced after one of them died")

    def _graded(self, job: GradeJob, pool: ProcessPoolExecutor, future: Future) -> None:
        """Record a worker's outcome (in the pool's thread): report + deliveries, or skipped/failed."""
        uid = job.study_uid
        try:
            if future.cancelled():
                return  # shut down before it ran: resumed at the next start
            try:
                outcome: GradeOutcome = future.result()
            except BrokenProcessPool:
                self._replace_pool(pool)
                if self._stopping.is_set():
                    return  # ended by the shutdown: resumed at the next start
                if (Path(job.folder) / RUNNING_MARKER).exists():
                    self._worker_died(uid)  # the study the worker died on
                else:  # queued behind it: graded by the new pool, not failed with it
                    self.ledger.set_state(uid, StudyState.RECEIVING, generation=job.generation)
                return
            except Exception as exc:  # noqa: BLE001
                outcome = GradeOutcome.failed(f"grading failed: {type(exc).__name__}: {exc}")
            if outcome.result is not GradeResult.REPORTED or outcome.outputs is None:
                state = outcome.result.study_state
                if self.ledger.set_state(uid, state, outcome.reason, generation=job.generation):
                    log.warning(f"study {state}", study_uid=uid, reason=outcome.reason)
                    skipped = state is StudyState.SKIPPED
                    (self.metrics.skipped.labels(skip_label(outcome.reason)) if skipped else self.metrics.failed).inc()
                    self.audit(EventKind.SKIPPED if skipped else EventKind.GRADING_FAILED, uid,
                               f"run {job.run}: {outcome.reason}", {"run": job.run})
                return
            outputs = outcome.outputs
            report = Report(uid, job.run, str(outputs.sr.path), outputs.sr.series_uid, outputs.series_uid(OutputKind.SC))
            files = [str(p) for p in outputs.paths]
            if self.settings.storage.fsync:  # on disk before the commit that publishes them
                fsync_files([*outputs.paths, outputs.table, outputs.json])
            upload = self.ledger.upload(uid)
            destinations = list(self.destinations) if upload is None or upload.send else []
            ids = self.ledger.add_report(report, job.generation, destinations, files)
            if ids is None:
                log.info("graded run discarded: new instances arrived while grading", study_uid=uid, run=job.run)
                remove_tree(self.results_dir, Path(job.folder))
                return
            log.info("results ready", study_uid=uid, run=job.run, sr=report.sr_path, files=len(files),
                     seconds=round(outcome.seconds, 3))
            self.metrics.graded.inc()
            self.metrics.grading_seconds.observe(outcome.seconds)
            self.audit(EventKind.GRADED, uid, f"run {job.run}: {outcome.assessed} of 25 labels assessed in "
                       f"{outcome.seconds:.1f} s" + ("" if destinations else "; not sent (upload)"),
                       {"run": job.run, "assessed": outcome.assessed, "seconds": round(outcome.seconds, 3),
                        "series_roles": _series_roles(outputs.json)})
            for delivery_id in ids:
                delivery = self.ledger.delivery(delivery_id)
                if delivery is not None:
                    self._schedule_delivery(delivery)
        except Exception:  # never lose the pool's thread; the study stays analysing and is resumed at start
            log.exception("could not record a grading outcome", study_uid=uid)
        finally:
            self._grading.discard(uid)

    # -- delivering results --------------------------------------------------------------------------

    def _schedule_delivery(self, delivery: Delivery) -> None:
        if self._stopping.is_set():
            return
        self.scheduler.add_job(self._deliver, "date", args=[delivery.id], id=f"delivery-{delivery.id}",
                               run_date=datetime.fromtimestamp(delivery.next_attempt_at, UTC),
                               replace_existing=True)

    def _deliver(self, delivery_id: int) -> None:
        """One delivery attempt; on failure of any kind (refused, unreachable, a destination that
        does not take a SOP class, a file that cannot be read, a hang ended by the timeouts) the
        attempt is recorded with its reason and the next one scheduled with backoff, or the study
        fails after ``delivery.max_attempts``: a result is never dropped silently."""
        delivery = self.ledger.delivery(delivery_id)
        if delivery is None or delivery.state is not DeliveryState.PENDING:
            return
        where = {"study_uid": delivery.study_uid, "destination": delivery.destination, "run": delivery.run}
        destination = self.destinations.get(delivery.destination)
        try:
            if destination is None:
                raise DeliveryError(f"destination {delivery.destination!r} is no longer configured")
            started = time.perf_counter()
            send_files(destination, self.settings.node.ae_title, [Path(p) for p in delivery.paths],
                       timeout=self.settings.delivery.timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure is an attempt with its reason
            error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
            attempt = delivery.attempts + 1
            self.metrics.delivery_failures.labels(delivery.destination).inc()
            self.audit(EventKind.DELIVERY_FAILED, delivery.study_uid, f"run {delivery.run} to {delivery.destination}, "
                       f"attempt {attempt}: {error}", {"run": delivery.run, "destination": delivery.destination,
                                                        "attempt": attempt, "error": error})
            if attempt >= self.settings.delivery.max_attempts or destination is None:
                self.ledger.delivery_failed(delivery_id, error, None)
                log.error("delivery failed for good: study marked failed", attempts=attempt, error=error, **where)
                return
            delay = backoff(attempt, self.settings.delivery)
            self.ledger.delivery_failed(delivery_id, error, time.time() + delay)
            log.warning("delivery failed, will retry", attempts=attempt, retry_in_s=delay, error=error, **where)
            retry = self.ledger.delivery(delivery_id)
            if retry is not None:
                self._schedule_delivery(retry)
            return
        self.ledger.delivery_done(delivery_id)
        log.info("results delivered", files=len(delivery.paths), seconds=round(time.perf_counter() - started, 3),
                 **where)
        self.metrics.deliveries.labels(delivery.destination).inc()
        self.audit(EventKind.DELIVERED, delivery.study_uid, f"run {delivery.run} to {delivery.destination}: "
                   f"{len(delivery.paths)} files, attempt {delivery.attempts + 1}",
                   {"run": delivery.run, "destination": delivery.destination, "files": len(delivery.paths)})
        study = self.ledger.study(delivery.study_uid)
        if study is not None and study.state is StudyState.DONE:
            self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - study.last_received))

    # -- what the web page asks for ------------------------------------------------------------------

    def audit(self, kind: EventKind, study_uid: str | None, detail: str, data: dict | None = None,
              actor: str = "node") -> None:
        """One line of the audit trail (a failure to write it is logged, never raised)."""
        try:
            self.ledger.add_event(kind, actor, study_uid, detail, data)
        except Exception as exc:  # noqa: BLE001
            log.error("could not write the audit trail", study_uid=study_uid, error=f"{type(exc).__name__}: {exc}")

    def release_now(self, study_uid: str) -> None:
        """Grade an uploaded study at the next sweep, without waiting for the quiet time."""
        self._release_now.add(study_uid)

    def grade_again(self, study_uid: str, actor: str) -> bool:
        """Grade a study again (the new report supersedes the old). False if the ledger does not know it."""
        if not self.ledger.reopen(study_uid):
            return False
        self.audit(EventKind.GRADE_AGAIN, study_uid, f"requested by {actor}", actor=actor)
        self._release_now.add(study_uid)
        return True

    def send_again(self, study_uid: str, actor: str) -> int:
        """Send the newest report's files to every destination again; how many deliveries were queued."""
        report = self.ledger.last_report(study_uid)
        if report is None or not self.destinations:
            return 0
        folder = Path(report.sr_path).parent
        paths = [report.sr_path, *map(str, sorted((folder / SC_FOLDER).glob("*.dcm"))),
                 *map(str, sorted(folder.glob(PDF_GLOB)))]
        ids = self.ledger.add_deliveries(study_uid, report.run, list(self.destinations), paths)
        self.audit(EventKind.SEND_AGAIN, study_uid, f"run {report.run} to {', '.join(self.destinations)}, "
                   f"requested by {actor}", {"run": report.run}, actor=actor)
        for delivery_id in ids:
            delivery = self.ledger.delivery(delivery_id)
            if delivery is not None:
                self._schedule_delivery(delivery)
        return len(ids)


def _series_roles(results_json: Path) -> dict[str, list[str]]:
    """The series roles a run found (results.json), or none when it cannot be read."""
    try:
        return dict(json.loads(results_json.read_text()).get("series_roles", {}))
    except (OSError, ValueError):
        return {}


def run_until_signalled(node: Node, stop: threading.Event) -> None:
    """Start the node, wait for ``stop`` (set by SIGTERM/SIGINT), then stop it."""
    try:
        node.start()
        own = node.settings.node
        if own.tls is None or own.tls.ca_certificates is None:
            anywhere = [p.ae_title for p in own.allowed_peers if p.host is None]
            if anywhere:
                log.warning("peers accepted from any address: the AE title alone authenticates them; set their "
                            "host, or node.tls with ca_certificates (client certificates)", peers=anywhere)
        log.info("node ready", ae_title=own.ae_title, port=own.port, tls=describe(own.tls),
                 destinations=[f"{d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}"
                               for d in node.destinations.values()])
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down: refusing new associations, finishing writes in flight")
        node.stop()
