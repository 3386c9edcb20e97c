"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler hands the received encoded dataset to
the node's one admission (``dicom_node.ingest``: checked without decoding pixels, written to the
spool, fsynced, recorded in the ledger per (series, SOP Instance UID)), then answers with the
admission's status. The audit trail gets one line per association and study when it closes."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    StoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # a name made at import
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import tls
from dicom_node.config import Settings
from dicom_node.dicom import tuning
from dicom_node.dicom.handoff import Handoff
from dicom_node.dicom.peers import GuardedServer, HandedServer, PeerGate, Slots
from dicom_node.dicom.responses import NO_DATA_SET
from dicom_node.ingest import Admission, Batch, Candidate, Source, StoreStatus
from dicom_node.observability import NodeMetrics, get_logger
from dicom_node.store import Ledger, uid_problem

__all__ = ["C_STORE_RQ_FIELD", "TRANSFER_SYNTAXES", "StorageSCP"]

log = get_logger(__name__)

# pynetdicom accepts the first syntax of this list that the caller proposes, so the order decides
# what a sender that offers several must send: lossless compressed first (a file compressed
# losslessly is stored as it was sent, nobody decompresses it), then uncompressed, and lossy last,
# taken only when the sender offers nothing else (the data is already lossy): the node never asks a
# sender to compress lossily.
TRANSFER_SYNTAXES = [
    JPEGLSLossless, JPEGLosslessSV1, JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLSNearLossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000,
]
C_STORE_RQ_FIELD = 0x0001  # Command Field of a C-STORE request (PS3.7 E.1)
# The command elements a C-STORE-RQ must carry for the node to serve it (PS3.7 9.3.1.1); Priority
# may be missing (pynetdicom takes it as MEDIUM), CommandDataSetType missing is an A-ABORT (nobody
# can tell whether a data set follows).
REQUIRED_C_STORE_ELEMENTS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID")


class StorageSCP:
    """Receives studies into the spool and the ledger."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: NodeMetrics | None = None,
                 slots: Slots | None = None, handoff: Handoff | None = None, lane: socket.socket | None = None):
        """``slots``: the association counts (``SharedSlots`` when there are receiver processes; one
        of this process's own by default). The node's process listens and, given ``handoff``, passes
        connections on to the receiver processes; a receiver process takes them from its ``lane``
        instead of listening (``dicom.handoff``)."""
        self.settings = settings
        self.handoff, self.lane = handoff, lane
        self.ledger = ledger
        self.metrics = metrics or NodeMetrics()
        self.admission = Admission(settings, ledger, self.metrics)
        # association id -> what it stored, per study: one audit line per association and study,
        # written when the connection closes
        self._batches: dict[int, Batch] = {}
        self.spool = Path(settings.storage.spool_dir)
        self.ae = AE(ae_title=settings.node.ae_title)
        self.ae.maximum_pdu_size = settings.node.max_pdu_size
        limits = settings.limits
        self.ae.acse_timeout = limits.acse_timeout_s
        self.ae.dimse_timeout = limits.dimse_timeout_s
        self.ae.network_timeout = limits.network_timeout_s
        # pynetdicom counts every open connection, even one that never sends an A-ASSOCIATE-RQ;
        # the node's limits (PeerGate) count associations only, so silent sockets held open by
        # someone cannot lock the PACS out: pynetdicom's own count is only the connection cap.
        self.ae.maximum_associations = limits.max_connections
        self.peers = PeerGate(settings, self.metrics, slots)
        self.max_instance_bytes = int(limits.max_instance_mb * 2**20)
        self._received: dict[int, int] = {}  # association id -> bytes received since its last C-STORE
        for context in StoragePresentationContexts:
            if context.abstract_syntax is not None:  # always set in pynetdicom's list
                self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.server: ThreadedAssociationServer | None = None
        self._in_flight = 0
        self._idle = threading.Condition()

    def start(self) -> None:
        """Listen in the background (pynetdicom runs one thread per association)."""
        node = self.settings.node
        handlers: list[EventHandlerType] = [(evt.EVT_REQUESTED, self.peers.check), (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_C_ECHO, lambda event: Status.SUCCESS), (evt.EVT_DATA_RECV, self._count_data),
                    (evt.EVT_DIMSE_RECV, self._answer_malformed), (evt.EVT_CONN_CLOSE, self._closed)]
        GuardedServer.socket_timeout_s = self.settings.limits.socket_timeout_s
        GuardedServer.max_connections = self.settings.limits.max_connections
        # With node.tls, every connection must speak TLS (plain TCP fails the handshake and is closed).
        ssl_context = tls.server_context(node.tls) if node.tls is not None else None
        # process-wide, and before the server binds its event handlers; stop() restores it
        tuning.apply(node.poll_interval_ms / 1000)
        try:
            # a receiver process takes its connections from its lane; the node's process listens
            kind, extra = ((HandedServer, {"lane": self.lane}) if self.lane is not None
                           else (GuardedServer, {"handoff": self.handoff}))
            server = cast(GuardedServer, self.ae.make_server((node.bind_address, node.port), evt_handlers=handlers,
                                                             server_class=kind, ssl_context=ssl_context, **extra))
        except BaseException:
            tuning.restore()
            raise
        server.ended = self._ended  # every association thread's `finally`: its slot back, however it ended
        threading.Thread(target=server.serve_forever, name="storage-scp-acceptor", daemon=True).start()
        self.server = server
        if self.lane is None:
            log.info("storage SCP listening", ae_title=node.ae_title, address=node.bind_address, port=node.port,
                     tls=tls.describe(node.tls))

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new associations, let the C-STORE writes in flight finish, then abort what is left."""
        if self.server is None:
            return
        associations = list(self.server.active_associations)
        self.server.shutdown()  # closes the listening socket: new associations are refused
        self.server = None
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        for assoc in associations:  # each abort waits for its reactor: in parallel, bounded below
            if assoc.is_alive():
                threading.Thread(target=_abort_quietly, args=(assoc,), name="storage-scp-abort", daemon=True).start()
        ended = time.monotonic() + 5.0  # their threads end before the excepthook and the filter go
        for assoc in associations:
            if assoc.is_alive():
                assoc.join(max(0.0, ended - time.monotonic()))
        for assoc in associations:  # a reactor that did not end in time: its connection is cut
            if assoc.is_alive() or assoc.dul.is_alive():
                tuning.abort_connection(assoc)
                self._forget(assoc)
        tuning.restore()
        log.info("storage SCP stopped", writes_unfinished=self._in_flight, associations_aborted=len(associations))

    def allowed(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE title (from this address) may associate (see ``PeerGate``)."""
        return self.peers.allowed(ae_title, address)

    def _count_data(self, event: evt.Event) -> None:
        """EVT_DATA_RECV: abort an association whose dataset grows beyond the instance limit, so
        that no peer can make the node hold more than ``limits.max_instance_mb`` for it."""
        key = id(event.assoc)
        total = self._received.get(key, 0) + len(event.data)
        self._received[key] = total
        if total > self.max_instance_bytes + 2**20:  # the command set and PDU headers on top
            log.warning("aborted an association: an instance larger than the limit",
                        address=event.assoc.requestor.address, max_instance_mb=self.settings.limits.max_instance_mb)
            self._received.pop(key, None)
            tuning.abort_connection(event.assoc)  # from the DUL thread: Association.abort() would wait on itself

    def _answer_malformed(self, event: evt.Event) -> None:
        """EVT_DIMSE_RECV: answer 0xC000 to a C-STORE request whose command set pynetdicom cannot
        serve (an empty Affected SOP Instance UID, no Message ID, ...): pynetdicom drops such a
        request without a response, so the sender would wait for its own timeout. One whose
        command set cannot even be read (an over-long UID) pynetdicom answers with an A-ABORT."""
        message = event.message
        command = message.command_set
        if command is None or command.get("CommandField") != C_STORE_RQ_FIELD or message.context_id is None:
            return
        if _plainly_valid(command):
            return  # the usual case, seen without building pynetdicom's primitive (which it builds next)
        try:
            request = message.message_to_primitive()
            if isinstance(request, C_STORE) and request.is_valid_request:
                return  # the storage service answers it (the handler checks the UIDs)
        except Exception:  # noqa: BLE001 - pynetdicom answers it with an A-ABORT itself (Evt19)
            log.warning("aborted an association: a C-STORE command set that cannot be read",
                        calling_aet=event.assoc.requestor.ae_title)
            return
        response = C_STORE()
        message_id = command.get("MessageID")
        valid_id = isinstance(message_id, int) and 0 <= message_id < 2**16
        response.MessageIDBeingRespondedTo = message_id if valid_id else 0
        if uid_problem(str(command.get("AffectedSOPClassUID", "")), "class") is None:
            response.AffectedSOPClassUID = command.AffectedSOPClassUID
        response.Status = StoreStatus.CANNOT_UNDERSTAND
        missing = [k for k in REQUIRED_C_STORE_ELEMENTS if k not in command]
        why = (f"missing {', '.join(missing)}" if missing else None) or \
            uid_problem(str(command.get("AffectedSOPInstanceUID", "")), "Affected SOP Instance UID") or \
            uid_problem(str(command.get("AffectedSOPClassUID", "")), "Affected SOP Class UID") or \
            "a command element out of range"
        response.ErrorComment = why[:64]  # type: ignore[assignment]  # typed None in pynetdicom; LO, 64 characters
        log.warning("refused a C-STORE request with a malformed command set",
                    calling_aet=event.assoc.requestor.ae_title, status=f"0x{StoreStatus.CANNOT_UNDERSTAND:04X}",
                    why=why)
        event.assoc.dimse.send_msg(response, message.context_id)

    def _closed(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: forget the connection (``_forget``)."""
        self._forget(event.assoc)

    def _ended(self, assoc: Association) -> None:
        """The ``finally`` of every association thread (``GuardedServer.ended``): a connection whose
        reactors stopped without closing it (a DUL reactor that died) is cut with an A-ABORT, and
        the connection is forgotten whether or not EVT_CONN_CLOSE came."""
        dul = assoc.dul
        if not dul.is_alive() and dul.state_machine.current_state != "Sta1" and tuning.abort_connection(assoc):
            log.warning("aborted a connection whose reactor had stopped", address=assoc.requestor.address)
        self._forget(assoc)

    def _forget(self, assoc: Association) -> None:
        """Hand back the association's slot, close its audit batch, say how many protocol errors it
        caused. Idempotent: the first of EVT_CONN_CLOSE and the thread's end does it."""
        key = id(assoc)
        self._received.pop(key, None)
        self.peers.closed(key)
        batch = self._batches.pop(key, None)
        if batch is not None:
            batch.close()
        suppressed = tuning.ERRORS.closed(assoc.dul.name) + tuning.ERRORS.closed(assoc.name)
        if suppressed:
            log.warning("connection closed after protocol errors", address=assoc.requestor.address,
                        errors_not_logged=suppressed)

    def handle_store(self, event: evt.Event) -> int:
        """Write, fsync, record, then answer; never raises into pynetdicom."""
        with self._idle:
            self._in_flight += 1
        started = time.perf_counter()
        status = StoreStatus.PROCESSING_FAILURE
        try:
            status = self._store(event)
            return status
        finally:
            self.metrics.cstore_seconds.observe(time.perf_counter() - started)
            self.metrics.cstore_status.labels(f"0x{int(status):04X}").inc()
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store(self, event: evt.Event) -> StoreStatus:
        calling = event.assoc.requestor.ae_title
        key = id(event.assoc)
        self._received.pop(key, None)  # this instance has arrived in full
        request = cast(C_STORE, event.request)  # EVT_C_STORE's request, as pynetdicom's own handlers cast it
        candidate = Candidate.received(request.DataSet.getvalue() if request.DataSet is not None else b"",
                                       event.context.transfer_syntax, str(request.AffectedSOPClassUID or ""),
                                       str(request.AffectedSOPInstanceUID or ""), calling, lambda: _file_meta(event))
        if key not in self._batches:
            self._batches[key] = self.admission.batch(Source.DICOM, calling)
        return self.admission.admit(candidate, self._batches[key]).status


def _plainly_valid(command: Dataset) -> bool:
    """Whether a C-STORE request's command set is one pynetdicom surely serves: a Message ID in
    range, both UIDs well formed, a data set announced, a known priority (or none). Anything else
    is looked at closely (``_answer_malformed``)."""
    message_id = command.get("MessageID")
    if not isinstance(message_id, int) or not 0 <= message_id < 2**16:
        return False
    if command.get("CommandDataSetType", NO_DATA_SET) == NO_DATA_SET or command.get("Priority", 0) not in (0, 1, 2):
        return False
    return all(isinstance(value := command.get(keyword), str) and uid_problem(value, keyword) is None
               for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"))


def _abort_quietly(assoc: Association) -> None:
    """``Association.abort()`` for ``stop()``: an association that is already broken may raise."""
    try:
        assoc.abort()
    except Exception as exc:  # noqa: BLE001 - stop() cuts the connection anyway
        log.debug("an abort at stop failed", error=f"{type(exc).__name__}: {exc}")


def _file_meta(event: evt.Event) -> bytes:
    """The preamble, 'DICM' and pynetdicom's file meta, as ``event.encoded_dataset()`` writes them
    before the data set (the spooled file is that, byte for byte)."""
    request = cast(C_STORE, event.request)
    return file_meta_bytes(str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
                           str(event.context.transfer_syntax))


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag[0], tag[1], vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
_FIXED_META = _element((0x0002, 0x0001), b"OB", b"\0\x01")
_IMPLEMENTATION = (_element((0x0002, 0x0012), b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
                   + _element((0x0002, 0x0013), b"SH", _VERSION + b" " * (len(_VERSION) % 2)))


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The preamble, 'DICM' and the File Meta Information that pynetdicom's ``create_file_meta`` and
    ``encode_file_meta`` make for a C-STORE (the same bytes), encoded directly: those build and
    validate a pydicom data set per instance, a sixth of the receiving thread's time."""
    body = (_FIXED_META + _element((0x0002, 0x0002), b"UI", _uid(sop_class_uid))
            + _element((0x0002, 0x0003), b"UI", _uid(sop_instance_uid))
            + _element((0x0002, 0x0010), b"UI", _uid(transfer_syntax)) + _IMPLEMENTATION)
    return b"\0" * 128 + b"DICM" + _element((0x0002, 0x0000), b"UL", struct.pack("<I", len(body))) + body
