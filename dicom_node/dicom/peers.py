"""Who may associate: the configured peers (calling AE title, and address when given), the limits
on associations at once (in total and per address), and the listening server's own guards (a
timeout on each accepted socket, a cap on open connections)."""

from __future__ import annotations

import socket
import socketserver
import threading

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Settings
from dicom_node.dicom.statuses import ProviderRejectReason, RejectReason, RejectResult, RejectSource
from dicom_node.observability import NodeMetrics, get_logger

__all__ = ["GuardedServer", "PeerGate"]

log = get_logger(__name__)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a timeout on each accepted socket (a peer that sends half
    a PDU is dropped after ``socket_timeout_s`` instead of holding its thread for ever) and a cap
    on open connections (each costs a thread until it associates or its ACSE timeout ends it):
    beyond ``max_connections`` a new connection is closed at once."""

    socket_timeout_s: float = 30.0
    max_connections: int = 64

    def verify_request(self, request: object, client_address: object) -> bool:
        if len(self.active_associations) < self.max_connections:
            return True
        log.warning("closed a connection: too many open connections", limit=self.max_connections)
        return False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.settimeout(self.socket_timeout_s)
        return client, address

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (this server is not in the AE's own list:
        the node starts it itself, not through ``AE.start_server``)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class PeerGate:
    """The EVT_REQUESTED check: a configured peer, within the association limits, or rejected."""

    def __init__(self, settings: Settings, metrics: NodeMetrics):
        self.settings = settings
        self.metrics = metrics
        self._associations: dict[int, str] = {}  # id(association) -> peer address, once requested
        self._lock = threading.Lock()

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
            with self._lock:
                total = len(self._associations)
                mine = sum(a == address for a in self._associations.values())
                over = total >= limits.max_associations or mine >= limits.max_associations_per_address
                if not over:
                    self._associations[id(event.assoc)] = address
            if over:
                log.warning("rejected an association: too many at once", address=address, open=total,
                            open_from_address=mine, limit=limits.max_associations,
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

    def closed(self, assoc_id: int) -> None:
        """Forget an association whose connection closed."""
        with self._lock:
            self._associations.pop(assoc_id, None)

    @staticmethod
    def _reject(event: evt.Event, result: int, source: int, reason: int) -> None:
        event.assoc.acse.send_reject(result, source, reason)
        event.assoc.kill()
