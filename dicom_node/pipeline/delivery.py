"""Delivering a run's results to every destination: one scheduled attempt per delivery (apscheduler),
retried with doubling backoff until ``delivery.max_attempts``; every attempt recorded in the
ledger and the audit trail, a result never dropped silently. The sending itself is the destination's
kind's (``pipeline.destinations``: C-STORE or STOW-RS). Destinations are served in parallel, each by
threads of its own: one that hangs until the timeouts delays no other."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import BaseScheduler

from dicom_node.config import DeliverySettings, Settings
from dicom_node.dicom import DeliveryError
from dicom_node.errors import NodeError
from dicom_node.observability import NodeMetrics, get_logger
from dicom_node.pipeline.audit import audit
from dicom_node.pipeline.destinations import sender_for
from dicom_node.results import RunFolder
from dicom_node.states import DeliveryState, EventKind, StudyState
from dicom_node.store import Delivery, Ledger

__all__ = ["Deliveries", "backoff"]

log = get_logger(__name__)


#: Deliveries to one destination that run at once (a run's files go over one association each).
THREADS_PER_DESTINATION = 2


def _executor(destination: str) -> str:
    """The scheduler's executor (thread pool) of a destination's deliveries."""
    return f"destination:{destination}"


def backoff(attempt: int, settings: DeliverySettings) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): doubling, capped."""
    return min(settings.backoff_initial_s * 2.0 ** (attempt - 1), settings.backoff_max_s)


class Deliveries:
    """Schedules and runs the deliveries the ledger holds (``schedule``, ``resume``), and queues new
    ones (``send_again``); nothing is scheduled once ``stopping`` is set."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: NodeMetrics, scheduler: BaseScheduler,
                 stopping: threading.Event):
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.scheduler = scheduler
        self.stopping = stopping
        self.destinations = {d.name: d for d in settings.destinations}
        for name in self.destinations:  # each destination its own threads: a hung one holds up no other
            scheduler.add_executor(ThreadPoolExecutor(THREADS_PER_DESTINATION), alias=_executor(name))

    def resume(self) -> int:
        """Schedule every pending delivery of the ledger (at start); how many."""
        pending = self.ledger.deliveries(state=DeliveryState.PENDING)
        for delivery in pending:
            self.schedule(delivery)
        return len(pending)

    def schedule(self, delivery: Delivery) -> None:
        """Run ``delivery``'s next attempt at its ``next_attempt_at``."""
        if self.stopping.is_set():
            return
        executor = _executor(delivery.destination) if delivery.destination in self.destinations else "default"
        self.scheduler.add_job(self.deliver, "date", args=[delivery.id], id=f"delivery-{delivery.id}",
                               run_date=datetime.fromtimestamp(delivery.next_attempt_at, UTC),
                               replace_existing=True, executor=executor)

    def schedule_ids(self, delivery_ids: list[int]) -> None:
        """Schedule the deliveries the ledger just recorded."""
        for delivery_id in delivery_ids:
            delivery = self.ledger.delivery(delivery_id)
            if delivery is not None:
                self.schedule(delivery)

    def deliver(self, delivery_id: int) -> None:
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
            sender_for(destination, self.settings).send([Path(p) for p in delivery.paths])
        except Exception as exc:  # noqa: BLE001 - every failure is an attempt with its reason
            error = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"
            attempt = delivery.attempts + 1
            self.metrics.delivery_failures.labels(delivery.destination).inc()
            audit(self.ledger, EventKind.DELIVERY_FAILED, delivery.study_uid, f"run {delivery.run} to "
                  f"{delivery.destination}, attempt {attempt}: {error}", {"run": delivery.run, "destination":
                  delivery.destination, "attempt": attempt, "error": error})
            if attempt >= self.settings.delivery.max_attempts or destination is None:
                self.ledger.delivery_failed(delivery_id, error, None)
                log.error("delivery failed for good: study marked failed", attempts=attempt, error=error, **where)
                return
            delay = backoff(attempt, self.settings.delivery)
            self.ledger.delivery_failed(delivery_id, error, time.time() + delay)
            log.warning("delivery failed, will retry", attempts=attempt, retry_in_s=delay, error=error, **where)
            retry = self.ledger.delivery(delivery_id)
            if retry is not None:
                self.schedule(retry)
            return
        self.ledger.delivery_done(delivery_id)
        log.info("results delivered", files=len(delivery.paths), seconds=round(time.perf_counter() - started, 3),
                 **where)
        self.metrics.deliveries.labels(delivery.destination).inc()
        audit(self.ledger, EventKind.DELIVERED, delivery.study_uid, f"run {delivery.run} to {delivery.destination}: "
              f"{len(delivery.paths)} files, attempt {delivery.attempts + 1}",
              {"run": delivery.run, "destination": delivery.destination, "files": len(delivery.paths)})
        study = self.ledger.study(delivery.study_uid)
        if study is not None and study.state is StudyState.DONE:
            self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - study.last_received))

    def send_again(self, study_uid: str, actor: str) -> int:
        """Send the newest report's files to every destination again; how many deliveries were queued."""
        report = self.ledger.last_report(study_uid)
        if report is None or not self.destinations:
            return 0
        sr = Path(report.sr_path)
        paths = [str(p) for p in RunFolder.of_sr(sr).files_to_send(sr)]
        ids = self.ledger.add_deliveries(study_uid, report.run, list(self.destinations), paths)
        audit(self.ledger, EventKind.SEND_AGAIN, study_uid, f"run {report.run} to {', '.join(self.destinations)}, "
              f"requested by {actor}", {"run": report.run}, actor=actor)
        self.schedule_ids(ids)
        return len(ids)
