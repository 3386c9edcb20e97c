"""The node's composition root: builds the ledger, the metrics, the storage SCP, the release and
its worker pool, the deliveries, the scheduler and the web page, and runs their life cycle, all
resumable from the ledger after a restart.

Threads: pynetdicom runs one thread per association (they only write to the spool and the
ledger); a thread of its own runs the release sweep, the scheduler's threads the purge and the
deliveries; grading runs in worker processes, so the model's CPU time never holds up an association.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import DicomWebDestination, Settings
from dicom_node.dicom import Handoff, Receivers, SharedSlots, StorageSCP, StudyQuery, receiver_count, slots_path
from dicom_node.ingest import Staging
from dicom_node.observability import NodeMetrics, get_logger
from dicom_node.pipeline import (
    PURGE_INTERVAL_S,
    SWEEP_INTERVAL_S,
    Deliveries,
    Fetcher,
    FetchJob,
    FetchJobs,
    Releaser,
    purge,
    worker_ready,
)
from dicom_node.states import StudyState
from dicom_node.store import Ledger, restrict_access
from dicom_node.tls import describe

if TYPE_CHECKING:
    from dicom_node.web import WebServer

__all__ = ["Node", "run_until_signalled"]

log = get_logger(__name__)


class Node:
    """The running node. ``start()`` resumes from the ledger; ``stop()`` shuts down in order.
    It provides what the web page asks of it (``web.NodeActions``)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        storage = settings.storage
        restrict_access([Path(storage.spool_dir), Path(storage.results_dir)], storage.group,
                        shared=[Path(storage.ledger_path).parent])
        self.results_dir = Path(settings.storage.results_dir)
        self.ledger = Ledger(Path(settings.storage.ledger_path))
        self.metrics = NodeMetrics()
        # receiving in several processes (dicom.receivers): this one and `receivers - 1` others on the port
        count = receiver_count(settings)
        self.slots = None if count == 1 else SharedSlots(slots_path(settings), settings.limits.max_associations,
                                                         settings.limits.max_associations_per_address)
        self.handoff = None if self.slots is None else Handoff()  # the connections this process passes on
        self.scp = StorageSCP(settings, self.ledger, self.metrics, slots=self.slots, handoff=self.handoff)
        self.receivers = (None if self.slots is None or self.handoff is None
                          else Receivers(settings, count - 1, self.slots, self.metrics, self.handoff))
        self.web: WebServer | None = None  # the web page (dicom_node.web), started by start() when web.port is set
        self.scheduler = BackgroundScheduler(timezone=UTC,
                                             job_defaults={"misfire_grace_time": None, "coalesce": True})
        self._stopping = threading.Event()
        self.deliveries = Deliveries(settings, self.ledger, self.metrics, self.scheduler, self._stopping)
        self.destinations = self.deliveries.destinations
        self.fetcher = Fetcher(settings, self.ledger, self.scp.admission)  # query/retrieve sources
        self.release = Releaser(settings, self.ledger, self.metrics, self.deliveries, self._stopping, self.fetcher)
        self.fetch_jobs = FetchJobs(self.fetcher, lambda study_uid: self.release.release_now(study_uid, "fetched"))
        self._sweeper = threading.Thread(target=self._sweep_until_stopped, name="release-sweep", daemon=True)

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in every worker, resume the ledger's unfinished work, then listen.

        The storage SCP applies the node's pynetdicom tuning (``dicom.tuning``: the poll interval
        ``node.poll_interval_ms``, the error filter, the excepthook) for the whole process when it
        starts, and restores it when it stops."""
        ready = [self.release.pool.submit(worker_ready) for _ in range(self.settings.workers)]
        log.info("grading workers ready", workers=self.settings.workers, **ready[0].result())
        self.release.started_at = time.time()  # a study cut off by a restart gets a fresh quiet time
        self.release.count_worker_deaths()
        regrade = self.ledger.resume()
        if (left := Staging(Path(self.settings.storage.spool_dir)).clear()):  # uploads cut off by a stop or a crash
            log.info("removed unfinished uploads from the staging area", uploads=left)
        self.scheduler.start()
        pending = self.deliveries.resume()
        receiving = len(self.ledger.studies((StudyState.RECEIVING,)))
        log.info("resumed from the ledger", studies_to_grade=regrade + receiving, deliveries_pending=pending)
        self._sweeper.start()
        storage = self.settings.storage
        if storage.retention_days is not None or storage.purge_below_free_mb:
            self.scheduler.add_job(self.purge, "interval", seconds=PURGE_INTERVAL_S, id="purge", max_instances=1,
                                   next_run_time=datetime.now(UTC))
        if self.slots is not None:
            self.slots.reset()  # no association is open yet: rows of an earlier run count for nothing
        self.scp.start()
        if self.receivers is not None:
            self.receivers.start()
        if self.settings.web.port is not None:
            from dicom_node.web import WebServer

            self.web = WebServer(self.settings, self)
            self.web.start()

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new associations and finish the writes in flight, let a running grading finish
        within ``grace_s`` (queued ones are resumed at the next start; a grading that hangs is
        ended), stop the deliveries, close the ledger."""
        self._stopping.set()
        if self.web is not None:
            self.web.stop()
        if self.receivers is not None:
            self.receivers.stop()
        self.scp.stop()  # restores the pynetdicom tuning it applied
        if self._sweeper.is_alive():
            self._sweeper.join()  # ends at once (``_stopping``), or when the sweep in progress ends
        if self.scheduler.get_job("purge") is not None:
            self.scheduler.remove_job("purge")
        self.release.shutdown(grace_s)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.ledger.close()
        log.info("node stopped")

    # -- scheduled jobs ------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Release every receiving study that is quiet, or complete (when so configured)."""
        self.release.sweep()

    def _sweep_until_stopped(self) -> None:
        """The release sweep every SWEEP_INTERVAL_S (a study complete by completeness waits at most
        that long) until ``stop()``: its own thread, so that a slow sweep delays the next one
        instead of overlapping it or being skipped with a warning."""
        while not self._stopping.wait(SWEEP_INTERVAL_S):
            try:
                self.sweep()
            except Exception:  # a failed sweep (the ledger busy, a disk error) is tried again next time
                log.exception("release sweep failed")

    def purge(self) -> int:
        """Retention (``pipeline.purge``): how many studies were purged."""
        return purge(self.settings, self.ledger)

    # -- what the web page asks for (web.NodeActions) ------------------------------------------------

    def release_now(self, study_uid: str) -> None:
        """Grade an uploaded study at the next sweep, without waiting for the quiet time."""
        self.release.release_now(study_uid)

    def grade_again(self, study_uid: str, actor: str) -> bool:
        """Grade a study again (the new report supersedes the old). False if the ledger does not know it."""
        return self.release.grade_again(study_uid, actor)

    def send_again(self, study_uid: str, actor: str) -> int:
        """Send the newest report's files to every destination again; how many deliveries were queued."""
        return self.deliveries.send_again(study_uid, actor)

    def queued(self) -> int:
        """How many studies are with the grading workers."""
        return self.release.queued()

    def fetch(self, accession: str, actor: str) -> FetchJob:
        """Find the study with this accession number on the query/retrieve sources, retrieve it
        and grade it (in the background); the job, which the page shows as it goes."""
        return self.fetch_jobs.start(StudyQuery(accession=accession), actor)

    def fetches(self) -> list[FetchJob]:
        """The fetches requested on the web page, newest first."""
        return self.fetch_jobs.jobs()

    def can_fetch(self) -> bool:
        """Whether any query/retrieve source is configured."""
        return bool(self.fetcher.sources)


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
        for web in (d for d in node.destinations.values() if isinstance(d, DicomWebDestination)):
            service = web.dicomweb
            if not service.verify or (service.url.startswith("http://") and
                                      (service.username is not None or service.token is not None)):
                log.warning("a DICOMweb destination's credentials or results can be read or changed on the way: "
                            "use https:// with TLS verification", destination=web.name, url=service.url)
        log.info("node ready", ae_title=own.ae_title, port=own.port, tls=describe(own.tls),
                 destinations=[d.where for d in node.destinations.values()])
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down: refusing new associations, finishing writes in flight")
        node.stop()
