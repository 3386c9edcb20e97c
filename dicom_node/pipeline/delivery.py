"""Delivering a run's results to every destination: one scheduled attempt per delivery (apscheduler),
retried with doubling backoff until ``delivery.max_attempts``; every attempt recorded in the
ledger and the audit trail, a result never dropped silently. The sending itself is the destination's
kind's (``pipeline.destinations``: C-STORE or STOW-RS). Destinations are served in parallel, each by
threads of its own: one that hangs until the timeouts delays no other.

A run's report goes out as soon as it is recorded, before the run's other files are written
(``Ledger.add_report(more=True)``): its delivery is ``open``, sends what it holds (the SR), records
how far it got (``Ledger.delivery_sent``), and is scheduled again when the rest is recorded
(``Ledger.complete_run``), which it then sends; it is delivered, audited and logged ("results
delivered") once, when every file of the run is stored."""

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
from dicom_node.store import Delivery, DeliveryProgress, Ledger

__all__ = ["Deliveries", "backoff"]

log = get_logger(__name__)


#: Deliveries to one destination that run at once (a run's files go over one association each).
THREADS_PER_DESTINATION = 2
#: Attempts of one delivery that may be scheduled at once (an open delivery is scheduled again when its
#: run is complete, possibly while it still sends the report); they take turns (``Deliveries._turn``).
_INSTANCES_PER_DELIVERY = 4


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
        self._turns: dict[int, tuple[threading.Lock, int]] = {}  # delivery id -> its attempts' lock, their count
        self._turns_lock = threading.Lock()
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
                               replace_existing=True, executor=executor, max_instances=_INSTANCES_PER_DELIVERY)

    def schedule_ids(self, delivery_ids: list[int]) -> None:
        """Schedule the deliveries the ledger just recorded."""
        for delivery_id in delivery_ids:
            delivery = self.ledger.delivery(delivery_id)
            if delivery is not None:
                self.schedule(delivery)

    def _turn(self, delivery_id: int, taking: bool) -> threading.Lock:
        """The lock the attempts of a delivery take turns by, counted while any attempt holds or awaits it."""
        with self._turns_lock:
            lock, users = self._turns.get(delivery_id, (threading.Lock(), 0))
            users += 1 if taking else -1
            if users:
                self._turns[delivery_id] = (lock, users)
            else:
                self._turns.pop(delivery_id, None)
            return lock

    def deliver(self, delivery_id: int) -> None:
        """One delivery attempt (attempts of one delivery take turns); on failure of any kind
        (refused, unreachable, a destination that does not take a SOP class, a file that cannot be
        read, a hang ended by the timeouts) the attempt is recorded with its reason and the next
        one scheduled with backoff, or the study fails after ``delivery.max_attempts``: a result is
        never dropped silently. Only the files not yet stored are sent (an open delivery's report
        went ahead of the rest)."""
        try:
            with self._turn(delivery_id, taking=True):
                while self._attempt(delivery_id) is DeliveryProgress.MORE:
                    pass  # the run's other files were recorded while its report was being sent
        finally:
            self._turn(delivery_id, taking=False)

    def _attempt(self, delivery_id: int) -> DeliveryProgress | None:
        """Send what a pending delivery holds and has not stored yet; where it stands then (None:
        not pending, or failed)."""
        delivery = self.ledger.delivery(delivery_id)
        if delivery is None or delivery.state is not DeliveryState.PENDING:
            return None
        where = {"study_uid": delivery.study_uid, "destination": delivery.destination, "run": delivery.run}
        destination = self.destinations.get(delivery.destination)
        todo = delivery.paths[delivery.sent:]
        try:
            if destination is None:
                raise DeliveryError(f"destination {delivery.destination!r} is no longer configured")
            started = time.perf_counter()
            if todo:
                sender_for(destination, self.settings).send([Path(p) for p in todo])
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
                return None
            delay = backoff(attempt, self.settings.delivery)
            self.ledger.delivery_failed(delivery_id, error, time.time() + delay)
            log.warning("delivery failed, will retry", attempts=attempt, retry_in_s=delay, error=error, **where)
            retry = self.ledger.delivery(delivery_id)
            if retry is not None:
                self.schedule(retry)
            return None
        progress = self.ledger.delivery_sent(delivery_id, len(delivery.paths))
        if progress is DeliveryProgress.OPEN and todo:
            log.info("report delivered ahead of the run's other files", files=len(todo),
                     seconds=round(time.perf_counter() - started, 3), **where)
        if progress is not DeliveryProgress.DELIVERED:
            return progress
        log.info("results delivered", files=len(delivery.paths), seconds=round(time.perf_counter() - started, 3),
                 **where)
        self.metrics.deliveries.labels(delivery.destination).inc()
        audit(self.ledger, EventKind.DELIVERED, delivery.study_uid, f"run {delivery.run} to {delivery.destination}: "
              f"{len(delivery.paths)} files, attempt {delivery.attempts + 1}",
              {"run": delivery.run, "destination": delivery.destination, "files": len(delivery.paths)})
        study = self.ledger.study(delivery.study_uid)
        if study is not None and study.state is StudyState.DONE:
            self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - study.last_received))
        return progress

    def send_again(self, study_uid: str, actor: str) -> int:
        """Send the newest report's files to every destination again; how many deliveries were queued."""
        report = self.ledger.last_report(study_uid)
        if report is None or not self.destinations:
            return 0
        sr = Path(report.sr_path)
        if RunFolder.of_sr(sr).running_marker.exists():
            return 0  # its report went ahead, the rest of the run is still being written
        paths = [str(p) for p in RunFolder.of_sr(sr).files_to_send(sr)]
        ids = self.ledger.add_deliveries(study_uid, report.run, list(self.destinations), paths)
        audit(self.ledger, EventKind.SEND_AGAIN, study_uid, f"run {report.run} to {', '.join(self.destinations)}, "
              f"requested by {actor}", {"run": report.run}, actor=actor)
        self.schedule_ids(ids)
        return len(ids)
