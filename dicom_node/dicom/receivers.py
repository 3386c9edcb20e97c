"""Receiving in several processes: ``node.receivers`` storage SCPs share the DICOM port, so C-STOREs
are not serialised by one interpreter lock. The node's own process runs one of them and alone
listens: it hands each connection it accepts to the least busy process, itself included
(``dicom.handoff``). ``Receivers`` runs the others, each a spawned process with the same admission
(``dicom_node.ingest``), its own ledger connection (SQLite WAL, ``BEGIN IMMEDIATE`` transactions, a
busy timeout), the association limits in one
``SharedSlots`` table, the node's logging (and scrubbing) configured from the same settings, and
its counters sent to the node's process about once a second (``NodeMetrics.add_source``).

A receiver that dies (even by SIGKILL) loses its slots and its lane at once (the node takes the new
connections meanwhile) and is started again with a new lane; SIGTERM to
the node stops every receiver the way it stops its own (new associations refused, the writes in
flight finished); a receiver whose node died (SIGKILL) is killed by the kernel with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from multiprocessing.context import SpawnProcess
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.dicom.handoff import Handoff
from dicom_node.dicom.peers import SharedSlots
from dicom_node.dicom.scp import StorageSCP
from dicom_node.observability import NodeMetrics, Snapshot, configure_logging, get_logger
from dicom_node.store import Ledger

__all__ = ["METRICS_EVERY_S", "Receivers", "receiver_count", "slots_path"]

log = get_logger(__name__)

METRICS_EVERY_S = 1.0  # how often a receiver sends its counters
WATCH_EVERY_S = 0.5  # how often the node looks for receivers that died
STOP_GRACE_S = 20.0  # SIGTERM, then this long to finish the writes in flight, then SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2)
READY_TIMEOUT_S = 120.0  # how long the node waits for its receivers to listen when it starts


def receiver_count(settings: Settings) -> int:
    """How many receiver processes (the node's own included): ``node.receivers``, or the CPU count
    (at least one). Each receiver is one interpreter (one lock) that keeps at most about a core
    busy; the node's process hands each connection to the least busy one (``dicom.handoff``). On
    the 2-CPU machine where it was measured, two took 1.6x one's images per second with 4 senders
    (README, "Performance")."""
    return settings.node.receivers or max(1, os.cpu_count() or 1)


def slots_path(settings: Settings) -> Path:
    """The association slots table shared by the receivers, beside the ledger."""
    ledger = Path(settings.storage.ledger_path)
    return ledger.with_name(ledger.stem + "-associations.sqlite")


def _receive(settings: Settings, index: int, metrics_out: multiprocessing.Queue[tuple[int, Snapshot | None]],
             lane: socket.socket) -> None:
    """A receiver process: one storage SCP serving the connections the node hands it over ``lane``, until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us
    configure_logging(settings.logging.format, settings.logging.level)
    limits = settings.limits
    slots = SharedSlots(slots_path(settings), limits.max_associations, limits.max_associations_per_address)
    ledger = Ledger(Path(settings.storage.ledger_path))
    metrics = NodeMetrics()
    scp = StorageSCP(settings, ledger, metrics, slots=slots, lane=lane)
    scp.start()
    metrics_out.put((os.getpid(), None))  # listening: the node waits for this before it says it is ready
    log.info("receiver process started", receiver=index, pid=os.getpid())
    parent = os.getppid()
    metrics_out.cancel_join_thread()  # exiting never waits for a node that no longer reads the counters
    orphaned = False
    try:
        while not stop.wait(METRICS_EVERY_S):
            if os.getppid() != parent:  # the node died (SIGKILL): a receiver never outlives it
                log.warning("the node's process is gone: the receiver process stops", receiver=index)
                orphaned = True
                break
            metrics_out.put((os.getpid(), metrics.snapshot()))
    finally:
        scp.stop(timeout=5.0 if orphaned else 30.0)
        if not orphaned:
            metrics_out.put((os.getpid(), metrics.snapshot()))
        ledger.close()
        slots.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL when the node's thread that started this receiver ends (the watcher, which
    lives until the receivers have stopped), so a receiver dies with its node, even by SIGKILL, as
    a node in one process would: every instance it acknowledged is already on disk and in the
    ledger. The polling of ``os.getppid`` is the fallback elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Receivers:
    """The receiver processes besides the node's own: started, watched (one that dies loses its
    slots and is started again), their counters collected, stopped by SIGTERM."""

    def __init__(self, settings: Settings, count: int, slots: SharedSlots, metrics: NodeMetrics, handoff: Handoff):
        self.settings, self.count, self.slots, self.handoff = settings, count, slots, handoff
        self._context = multiprocessing.get_context("spawn")
        self._metrics_in: multiprocessing.Queue[tuple[int, Snapshot | None]] = self._context.Queue()
        self._processes: dict[int, SpawnProcess] = {}
        self._latest: dict[int, Snapshot] = {}  # process id -> its last snapshot
        self._retired: list[Snapshot] = []  # the last snapshots of receivers that ended (their counts stay)
        self._ended: set[int] = set()  # process ids of receivers that ended: a late snapshot is ignored
        self._ready: set[int] = set()  # process ids of receivers that listen
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()  # every receiver has stopped: the watcher (their parent thread) may end
        self._watcher: threading.Thread | None = None
        metrics.add_source(self.snapshots)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the watcher, which starts the receivers (the thread that starts a receiver lives
        until it has stopped: see ``_die_with_parent``); wait until each listens (at most ``timeout_s``)."""
        self._watcher = threading.Thread(target=self._watch, name="receivers-watch", daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + timeout_s
        while len(self._processes) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        while len(self._ready) < self.count and time.monotonic() < deadline:
            if not any(p.is_alive() for p in self._processes.values()):
                break
            self._drain(wait_s=0.2)
        if len(self._ready) < self.count:
            log.warning("receiver processes not listening in time", listening=len(self._ready), started=self.count)
        log.info("receiver processes started", receivers=self.count + 1)

    def pids(self) -> list[int]:
        """The process ids of the receivers now running."""
        with self._lock:
            return [p.pid for p in self._processes.values() if p.pid is not None and p.is_alive()]

    def snapshots(self) -> list[Snapshot]:
        """Every receiver's counters (the running ones' latest, and those of receivers that ended)."""
        self._drain()
        with self._lock:
            return [*self._retired, *self._latest.values()]

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every receiver, wait for them (SIGKILL after ``grace_s``), forget their slots."""
        self._stopping.set()  # the watcher starts no receiver any more; it ends once they have stopped
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("a receiver process did not stop in time: killed", pid=process.pid)
                process.kill()
                process.join(5)
            if process.pid is not None:
                self.slots.forget_process(process.pid)
        self._drain()
        self._done.set()
        if self._watcher is not None:
            self._watcher.join(5)
        log.info("receiver processes stopped", receivers=len(processes))

    def _spawn(self, index: int) -> None:
        lane = self.handoff.open_lane(index)
        process = self._context.Process(target=_receive, args=(self.settings, index, self._metrics_in, lane),
                                        name=f"receiver-{index}", daemon=True)
        try:
            process.start()
        finally:
            lane.close()  # the receiver has its own copy
        with self._lock:
            self._processes[index] = process

    def _watch(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)
        while not self._done.wait(WATCH_EVERY_S):
            if self._stopping.is_set():
                continue
            with self._lock:
                ended = [(i, p) for i, p in self._processes.items() if not p.is_alive()]
            for index, process in ended:
                if self._stopping.is_set():
                    return
                freed = self.slots.forget_process(process.pid) if process.pid is not None else 0
                self._drain()
                with self._lock:
                    self._ended.add(process.pid or 0)
                    if process.pid in self._latest:
                        self._retired.append(self._latest.pop(process.pid))
                log.warning("a receiver process ended: started again", receiver=index, pid=process.pid,
                            exit_code=process.exitcode, slots_freed=freed)
                self._spawn(index)

    def _drain(self, wait_s: float = 0.0) -> None:
        while True:
            try:
                pid, snapshot = self._metrics_in.get(timeout=wait_s) if wait_s else self._metrics_in.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                return
            wait_s = 0.0
            with self._lock:
                if snapshot is None:
                    self._ready.add(pid)
                elif pid not in self._ended:
                    self._latest[pid] = snapshot

