"""Who may associate: the configured peers (calling AE title, and address when given), the limits
on associations at once (in total and per address: ``AssociationSlots``, the one owner of those
counts), and the listening server's own guards (a timeout on each accepted socket, a cap on open
connections, and a ``finally`` around every association thread that hands the connection back
however it ended)."""

from __future__ import annotations

import os
import socket
import socketserver
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.config import Settings
from dicom_node.dicom.handoff import Handoff, accept_handed, report_closed
from dicom_node.dicom.statuses import ProviderRejectReason, RejectReason, RejectResult, RejectSource
from dicom_node.observability import NodeMetrics, get_logger

__all__ = ["AssociationSlots", "GuardedServer", "HandedOver", "HandedServer", "PeerGate", "SharedSlots", "SlotGrant",
           "Slots"]

log = get_logger(__name__)


class _EndingHandler(RequestHandler):
    """pynetdicom's request handler whose association thread calls the server's ``ended`` in a
    ``finally``: the one place that sees every connection end (a release, an abort, a reactor that
    died, a closed socket, a timeout), whether or not pynetdicom triggered EVT_CONN_CLOSE."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        run, server = assoc.run, self.server

        def run_then_end() -> None:
            try:
                run()
            finally:
                if isinstance(server, GuardedServer):
                    server.association_ended(assoc)
                else:
                    ended = getattr(server, "ended", None)
                    if ended is not None:
                        ended(assoc)

        assoc.run = run_then_end  # type: ignore[method-assign]  # Thread.run of this one thread
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a timeout on each accepted socket (a peer that sends half
    a PDU is dropped after ``socket_timeout_s`` instead of holding its thread for ever) and a cap
    on open connections (each costs a thread until it associates or its ACSE timeout ends it):
    beyond ``max_connections`` a new connection is closed at once. It counts the connections it
    took and those that ended; with ``handoff`` (the node's process, when there are receiver
    processes) it passes each accepted connection to the least busy process (``dicom.handoff``)."""

    socket_timeout_s: float = 30.0
    max_connections: int = 64
    #: called with each association when its thread ends, however it ended (``_EndingHandler``)
    ended: Callable[[Association], None] | None = None

    def __init__(self, *args: object, handoff: Handoff | None = None, **kwargs: object) -> None:
        kwargs.setdefault("request_handler", _EndingHandler)
        self.handoff = handoff
        self.taken = 0  # connections this process took (accepted and kept, or handed to it)
        self.finished = 0  # of them, how many have ended
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # pynetdicom's own arguments

    def verify_request(self, request: object, client_address: object) -> bool:
        if len(self.active_associations) < self.max_connections:
            return True
        log.warning("closed a connection: too many open connections", limit=self.max_connections)
        return False

    def accept(self) -> tuple[socket.socket, tuple[object, ...]]:
        """The next connection, as the listening socket gives it (before TLS)."""
        assert self.socket is not None  # bound in __init__
        connection, address = self.socket.accept()
        return connection, tuple(address)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept (or take a handed) connection; hand it on to a less busy receiver process, or
        wrap it in TLS (as pynetdicom's own ``get_request``) and give it its socket timeout."""
        connection, address = self.accept()
        if self.handoff is not None:
            with self._count_lock:
                kept_open = self.taken - self.finished
            if self.handoff.pass_on(connection, address, kept_open):
                connection.close()  # the receiver has its own descriptor now
                raise HandedOver  # socketserver skips a request whose get_request raised OSError
        with self._count_lock:
            self.taken += 1
        try:
            if self.ssl_context:
                connection = self.ssl_context.wrap_socket(connection, server_side=True)
            connection.settimeout(self.socket_timeout_s)
        except BaseException:
            connection.close()
            self._count_finished()
            raise
        return connection, cast(tuple[str, int], address)

    def shutdown_request(self, request: object) -> None:
        """A connection closed before any association thread ran for it (refused, or it failed)."""
        super().shutdown_request(request)  # type: ignore[arg-type]  # socketserver's own request
        self._count_finished()

    def association_ended(self, assoc: Association) -> None:
        """The ``finally`` of every association thread: counted, then ``ended``."""
        self._count_finished()
        if self.ended is not None:
            self.ended(assoc)

    def _count_finished(self) -> None:
        with self._count_lock:
            self.finished += 1
            finished = self.finished
        self.connection_finished(finished)

    def connection_finished(self, finished: int) -> None:
        """A connection this process took has ended (``finished`` so far); ``HandedServer`` tells the node."""

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (this server is not in the AE's own list:
        the node starts it itself, not through ``AE.start_server``)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class HandedOver(OSError):
    """``get_request`` of the node's process: the connection went to a receiver process."""


class HandedServer(GuardedServer):
    """A receiver process's server: it does not listen on the port; it takes the connections the
    node's process hands it over ``lane`` (``dicom.handoff``) and reports each one that ends."""

    def __init__(self, *args: object, lane: socket.socket, **kwargs: object) -> None:
        self.lane = lane
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # pynetdicom's own arguments
        assert self.socket is not None  # socketserver made one in __init__; never bound (server_bind)
        self.socket.close()
        self.socket = lane  # serve_forever selects on it; get_request takes the handed connections from it

    def server_bind(self) -> None:
        """Nothing to bind: the node's process listens."""

    def server_activate(self) -> None:
        """Nothing to listen on: the node's process listens."""

    def accept(self) -> tuple[socket.socket, tuple[object, ...]]:
        return accept_handed(self.lane)

    def connection_finished(self, finished: int) -> None:
        report_closed(self.lane, finished)


@dataclass(frozen=True)
class SlotGrant:
    """What ``AssociationSlots.acquire`` decided, and the counts it decided on."""

    granted: bool
    total: int  # associations open before this one
    from_address: int  # of them, from this one's address


class Slots(Protocol):
    """The owner of the association counts (``AssociationSlots`` in one process, ``SharedSlots``
    across the receiver processes)."""

    def acquire(self, key: int, address: str) -> SlotGrant: ...

    def release(self, key: int) -> bool: ...

    def counts(self) -> Counter[str]: ...


class AssociationSlots:
    """The one owner of the association counts (in total and per peer address): a slot is taken
    when an association is accepted and handed back exactly once, by ``release``, whichever close
    path gets there first (EVT_CONN_CLOSE, or the ``finally`` of the association thread)."""

    def __init__(self, max_total: int, max_per_address: int):
        self.max_total, self.max_per_address = max_total, max_per_address
        self._held: dict[int, str] = {}  # association key -> peer address
        self._lock = threading.Lock()

    def acquire(self, key: int, address: str) -> SlotGrant:
        """Take a slot for association ``key`` from ``address`` if both limits allow it."""
        with self._lock:
            total = len(self._held)
            mine = sum(a == address for a in self._held.values())
            granted = key in self._held or (total < self.max_total and mine < self.max_per_address)
            if granted:
                self._held[key] = address
            return SlotGrant(granted, total, mine)

    def release(self, key: int) -> bool:
        """Hand association ``key``'s slot back; whether it held one (a second call is a no-op)."""
        with self._lock:
            return self._held.pop(key, None) is not None

    def counts(self) -> Counter[str]:
        """Slots held now, per peer address (``sum(...)`` is the total)."""
        with self._lock:
            return Counter(self._held.values())


class SharedSlots:
    """``AssociationSlots`` for several receiver processes: the slots are rows of a small SQLite
    table (process id, association key, address) that every receiver reads and writes in short
    ``BEGIN IMMEDIATE`` transactions, so the limits hold across processes. A row whose process is
    gone (killed, even with SIGKILL) counts for nothing: ``acquire`` and ``counts`` drop such rows
    first, and the supervisor drops a dead receiver's rows at once (``forget_process``)."""

    def __init__(self, path: Path, max_total: int, max_per_address: int):
        self.path, self.max_total, self.max_per_address = Path(path), max_total, max_per_address
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # the table means nothing after a restart: reset() clears it
        self._db.execute("CREATE TABLE IF NOT EXISTS slots (pid INTEGER NOT NULL, key INTEGER NOT NULL, "
                         "address TEXT NOT NULL, PRIMARY KEY (pid, key))")
        self._lock = threading.Lock()
        self.forget_process(os.getpid())  # rows of an earlier process that had this id

    def reset(self) -> None:
        """Forget every slot (the node starts: no association is open)."""
        with self._lock:
            self._db.execute("DELETE FROM slots")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def acquire(self, key: int, address: str) -> SlotGrant:
        """Take a slot for association ``key`` (of this process) from ``address`` if both limits allow it."""
        pid = os.getpid()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._drop_dead()
                total, mine = self._db.execute("SELECT COUNT(*), COALESCE(SUM(address = ?), 0) FROM slots",
                                               (address,)).fetchone()
                held = self._db.execute("SELECT 1 FROM slots WHERE pid = ? AND key = ?", (pid, key)).fetchone()
                granted = held is not None or (total < self.max_total and mine < self.max_per_address)
                if granted and held is None:
                    self._db.execute("INSERT INTO slots VALUES (?, ?, ?)", (pid, key, address))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return SlotGrant(granted, int(total), int(mine))

    def release(self, key: int) -> bool:
        """Hand association ``key``'s slot back; whether it held one (a second call is a no-op)."""
        with self._lock:
            return self._db.execute("DELETE FROM slots WHERE pid = ? AND key = ?", (os.getpid(), key)).rowcount > 0

    def forget_process(self, pid: int) -> int:
        """Drop every slot of a receiver process that ended; how many it held."""
        with self._lock:
            return self._db.execute("DELETE FROM slots WHERE pid = ?", (pid,)).rowcount

    def counts(self) -> Counter[str]:
        """Slots held now, per peer address, by every live receiver process."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._drop_dead()
                rows = self._db.execute("SELECT address, COUNT(*) FROM slots GROUP BY address").fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Counter(dict(rows))

    def _drop_dead(self) -> None:
        for (pid,) in self._db.execute("SELECT DISTINCT pid FROM slots").fetchall():
            if not _alive(pid):
                self._db.execute("DELETE FROM slots WHERE pid = ?", (pid,))


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie too: its parent reaps it and forgets its slots)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PeerGate:
    """The EVT_REQUESTED check: a configured peer, within the association limits, or rejected."""

    def __init__(self, settings: Settings, metrics: NodeMetrics, slots: Slots | None = None):
        self.settings = settings
        self.metrics = metrics
        limits = settings.limits
        self.slots: Slots = slots or AssociationSlots(limits.max_associations, limits.max_associations_per_address)

    def allowed(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE title (from this address) may associate."""
        if not self.settings.node.refuse_unknown_peers:
            return True
        return any(p.ae_title == ae_title and p.host in (None, address) for p in self.settings.node.allowed_peers)

    def check(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject an association from a caller that is not configured."""
        try:
            request = event.assoc.requestor.primitive
            if request is None:  # pynetdicom sets it before EVT_REQUESTED; without it, the check fails closed
                raise ValueError("no A-ASSOCIATE-RQ to check")
            calling = str(request.calling_ae_title).strip()
            address = event.assoc.requestor.address
            if not self.allowed(calling, address):
                log.warning("rejected an association from an unknown peer", calling_aet=calling, address=address)
                self._reject(event, RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                             RejectReason.CALLING_AE_NOT_RECOGNISED)
                self.metrics.associations.labels("rejected", "unknown peer").inc()
                return
            limits = self.settings.limits
            grant = self.slots.acquire(id(event.assoc), address)
            if not grant.granted:
                log.warning("rejected an association: too many at once", address=address, open=grant.total,
                            open_from_address=grant.from_address, limit=limits.max_associations,
                            limit_per_address=limits.max_associations_per_address)
                self._reject(event, RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                             ProviderRejectReason.LOCAL_LIMIT_EXCEEDED)
                self.metrics.associations.labels("rejected", "too many").inc()
            else:
                self.metrics.associations.labels("accepted", "").inc()
        except Exception as exc:  # noqa: BLE001 - a check that fails rejects (fail closed), never lets in
            log.error("rejected an association: the peer check failed", error=f"{type(exc).__name__}: {exc}")
            self._reject(event, RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.NO_REASON)
            self.metrics.associations.labels("rejected", "peer check failed").inc()

    def closed(self, assoc_id: int) -> bool:
        """Hand back the slot of an association whose connection closed; whether it held one."""
        return self.slots.release(assoc_id)

    @staticmethod
    def _reject(event: evt.Event, result: int, source: int, reason: int) -> None:
        event.assoc.acse.send_reject(result, source, reason)
        event.assoc.kill()
