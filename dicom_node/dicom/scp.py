"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only writes the received encoded
dataset to the spool (no pixel decoding), fsyncs it, records it in the ledger, then answers.
Instances are spooled and recorded per (series, SOP Instance UID)."""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import socket
import socketserver
import threading
import time
import zlib
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
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
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import tls
from dicom_node.config import Settings
from dicom_node.dimse import (
    ProviderRejectReason,
    RejectReason,
    RejectResult,
    RejectSource,
    StoreStatus,
)
from dicom_node.durable import write_durably
from dicom_node.ledger import Ledger, Recorded
from dicom_node.logconfig import PHI_VALUES, get_logger
from dicom_node.metrics import NodeMetrics
from dicom_node.safety import UnsafePath, uid_problem, under
from dicom_node.states import EventKind

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
PIXEL_DATA = Tag(0x7FE0, 0x0010)
C_STORE_RQ_FIELD = 0x0001  # Command Field of a C-STORE request (PS3.7 E.1)
UNDEFINED_LENGTH = 0xFFFFFFFF

# Stored and recorded, but they do not (re)open a study for grading: Structured Reports (our own
# results coming back from the PACS among them), Secondary Captures, presentation states, PDFs.
_NOT_GRADED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.",
                        "1.2.840.10008.5.1.4.1.1.104.")  # ... and encapsulated documents (our PDF)


def truncation(ds: Dataset, sop_class_uid: str, transfer_syntax: UID) -> str | None:
    """Why a received dataset looks cut short, or None. Reads raw element lengths and a few image
    attributes, never decodes pixels: an image without Pixel Data, a last element shorter than its
    declared length, or native Pixel Data shorter than Rows x Columns x samples x frames."""
    tags = list(ds.keys())
    if not tags:
        return "empty dataset"
    if "Image Storage" in UID(sop_class_uid).name and PIXEL_DATA not in tags:
        return "an image without Pixel Data"
    last = ds.get_item(tags[-1])
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and last.value is not None \
            and len(last.value) != last.length:
        return f"element {last.tag} holds {len(last.value)} of its {last.length} bytes"
    if PIXEL_DATA in tags and not transfer_syntax.is_compressed:
        try:
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
        except (AttributeError, TypeError, ValueError):
            return "an image without usable Rows, Columns or Bits Allocated"
        got = len(ds.get_item(PIXEL_DATA).value or b"")
        if got < expected:
            return f"Pixel Data holds {got} of the {expected} bytes its image size needs"
    return None


IDLE_POLL_S = 0.1  # an association idle for IDLE_AFTER_S polls ten times a second
IDLE_AFTER_S = 1.0


class _PollClock:
    """``time`` for pynetdicom's association and DUL modules: their sleeps capped at ``poll_s``
    while a reactor has work, and ``idle_s`` long once it has had none for ``idle_after_s``.

    pynetdicom's acceptor reactor sleeps a fixed 1 ms between polls of its DIMSE queue, and each
    association's DUL reactor 1 ms between polls of its socket; neither has a public setting, and
    each C-STORE waits for such polls: at 4 to 5 ms per image that is a large share. A reactor
    that calls ``sleep`` again right after the last one returned found nothing to do; once that
    has lasted ``idle_after_s`` its polls slow down to ``idle_s``, so an idle association costs
    (near) no CPU, and the first message after the pause waits at most ``idle_s``.
    """

    BUSY_GAP_S = 0.0005  # more than this between two sleeps of a thread: it did some work

    def __init__(self, poll_s: float, idle_s: float = IDLE_POLL_S, idle_after_s: float = IDLE_AFTER_S):
        self.poll_s, self.idle_s, self.idle_after_s = poll_s, idle_s, idle_after_s
        self._threads = threading.local()

    def sleep(self, seconds: float) -> None:
        state, now = self._threads, time.monotonic()
        if now - getattr(state, "last_wake", 0.0) > self.BUSY_GAP_S:
            state.idle_since = now
        idle = now - getattr(state, "idle_since", now) >= self.idle_after_s
        time.sleep(max(seconds, self.idle_s) if idle else min(seconds, self.poll_s))
        state.last_wake = time.monotonic()

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def set_poll_interval(poll_s: float) -> None:
    """Poll pynetdicom's association and DUL reactors every ``poll_s`` seconds instead of every 1 ms.

    This changes pynetdicom for the whole process (every AE in it, the delivery SCU included): the
    node applies it once, explicitly, when it starts (``node.poll_interval_ms``), never as a side
    effect of building an object. ``restore_poll_interval`` undoes it.
    """
    clock = _PollClock(poll_s)
    pynetdicom.association.time = clock  # type: ignore[attr-defined]
    pynetdicom.dul.time = clock  # type: ignore[attr-defined]


def restore_poll_interval() -> None:
    """pynetdicom's own polling again (1 ms)."""
    pynetdicom.association.time = time  # type: ignore[attr-defined]
    pynetdicom.dul.time = time  # type: ignore[attr-defined]


def reopens_study(sop_class_uid: str) -> bool:
    """Whether a new instance of this SOP class means its study must be graded (again)."""
    return not sop_class_uid.startswith(_NOT_GRADED_PREFIXES)


class Refused(Exception):
    """An instance the node does not store: the status to answer and why (for the log)."""

    def __init__(self, status: StoreStatus, why: str):
        super().__init__(why)
        self.status = status


def spool_path(spool: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance is spooled: spool/<study>/<series>/<SOP instance>.dcm (the RSNA Kaggle
    files repeat SOP Instance UIDs across series); UnsafePath unless it lies under the spool."""
    return under(spool, study_uid, series_uid, f"{sop_uid}.dcm")


def image_size_problem(ds: Dataset, max_pixels: int) -> str | None:
    """Why an image's declared size is refused (Rows x Columns x frames x samples over
    ``max_pixels``, or not numbers), read from the header before anything is decoded."""
    if PIXEL_DATA not in ds:
        return None
    try:
        pixels = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                  * int(ds.get("SamplesPerPixel", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        return "an image without usable Rows, Columns, NumberOfFrames or SamplesPerPixel"
    if pixels > max_pixels:
        return f"an image of {pixels} pixels (Rows x Columns x frames x samples; at most {max_pixels})"
    return None


def inflated_size_problem(raw: bytes, max_bytes: int) -> str | None:
    """Why a Deflated Explicit VR Little Endian dataset is refused: it inflates beyond ``max_bytes``
    (checked in bounded steps, so a deflate bomb never inflates in full), or is not deflate data."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, data = 0, raw
    try:
        while data:
            total += len(inflater.decompress(data, 1 << 20))
            if total > max_bytes:
                return f"a deflated dataset that inflates beyond {max_bytes // 2**20} MiB"
            data = inflater.unconsumed_tail
    except zlib.error as exc:
        return f"a deflated dataset that does not inflate ({exc})"
    return None


def series_size_of(ds: Dataset, max_images: int) -> int | None:
    """ImagesInAcquisition when it is a plausible series size (1..max_images), else None (ignored)."""
    try:
        value = int(str(ds.get("ImagesInAcquisition", "")).strip())
    except (TypeError, ValueError):
        return None
    return value if 1 <= value <= max_images else None


class _GuardedServer(ThreadedAssociationServer):
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


class _OnceperConnection(logging.Filter):
    """Lets the first pynetdicom error of each association thread through and counts the rest,
    so that protocol garbage costs a bounded number of log lines (the count is logged when the
    connection closes)."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("pynetdicom"):
            return True
        name = threading.current_thread().name
        with self._lock:
            if name in self.suppressed:
                self.suppressed[name] += 1
                return False
            self.suppressed[name] = 0
        record.exc_info, record.exc_text = None, None  # the first line says what; no traceback per PDU
        return True

    def closed(self, thread_name: str) -> int:
        """Forget a connection's thread; how many of its errors were suppressed."""
        with self._lock:
            return self.suppressed.pop(thread_name, 0)


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a pynetdicom reactor thread (an association or its DUL) that meets an
    exception ends its association (A-ABORT) instead of leaving the peer waiting; logged once."""
    thread = args.thread
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    log.error("a thread ended with an exception", thread=getattr(thread, "name", "?"),
              error=f"{args.exc_type.__name__}: {args.exc_value}", association=assoc is not None)
    if isinstance(assoc, Association) and assoc.is_alive():
        try:
            assoc.abort()
        except Exception:  # noqa: BLE001 - the association is already broken
            pass


class StorageSCP:
    """Receives studies into the spool and the ledger."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: NodeMetrics | None = None):
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics or NodeMetrics()
        # association id -> (calling AE title, study UID -> [instances, bytes] stored): one audit line
        # per association and study, written when the connection closes
        self._batches: dict[int, tuple[str, dict[str, list[int]]]] = {}
        self.spool = Path(settings.storage.spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.ae = AE(ae_title=settings.node.ae_title)
        self.ae.maximum_pdu_size = settings.node.max_pdu_size
        limits = settings.limits
        self.ae.acse_timeout = limits.acse_timeout_s
        self.ae.dimse_timeout = limits.dimse_timeout_s
        self.ae.network_timeout = limits.network_timeout_s
        # pynetdicom counts every open connection, even one that never sends an A-ASSOCIATE-RQ;
        # the node's limits (check_peer) count associations only, so silent sockets held open by
        # someone cannot lock the PACS out: pynetdicom's own count is only the connection cap.
        self.ae.maximum_associations = limits.max_connections
        self._associations: dict[int, str] = {}  # id(association) -> peer address, once requested
        self._lock = threading.Lock()
        self.max_instance_bytes = int(limits.max_instance_mb * 2**20)
        self._received: dict[int, int] = {}  # association id -> bytes received since its last C-STORE
        self._errors = _OnceperConnection()
        for context in StoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.server = None
        self._repeats_logged: set[str] = set()  # studies said to repeat SOP Instance UIDs across series
        self._in_flight = 0
        self._idle = threading.Condition()

    def start(self) -> None:
        """Listen in the background (pynetdicom runs one thread per association)."""
        node = self.settings.node
        handlers = [(evt.EVT_REQUESTED, self.check_peer), (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_C_ECHO, lambda event: Status.SUCCESS), (evt.EVT_DATA_RECV, self._count_data),
                    (evt.EVT_DIMSE_RECV, self._answer_malformed), (evt.EVT_CONN_CLOSE, self._closed)]
        _GuardedServer.socket_timeout_s = self.settings.limits.socket_timeout_s
        _GuardedServer.max_connections = self.settings.limits.max_connections
        # With node.tls, every connection must speak TLS (plain TCP fails the handshake and is closed).
        ssl_context = tls.server_context(node.tls) if node.tls is not None else None
        server = self.ae.make_server((node.bind_address, node.port), evt_handlers=handlers,
                                     server_class=_GuardedServer, ssl_context=ssl_context)
        threading.Thread(target=server.serve_forever, name="storage-scp-acceptor", daemon=True).start()
        self.server = server
        for handler in logging.getLogger().handlers:  # a logger's own filter would miss pynetdicom.dul & co
            handler.addFilter(self._errors)
        threading.excepthook = _thread_died
        log.info("storage SCP listening", ae_title=node.ae_title, address=node.bind_address, port=node.port,
                 tls=tls.describe(node.tls))

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new associations, let the C-STORE writes in flight finish, then abort what is left."""
        if self.server is None:
            return
        associations = list(self.server.active_associations)
        self.server.shutdown()  # closes the listening socket: new associations are refused
        self.server = None
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._errors)
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        for assoc in associations:
            if assoc.is_alive():
                assoc.abort()
        log.info("storage SCP stopped", writes_unfinished=self._in_flight, associations_aborted=len(associations))

    def allowed(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE title (from this address) may associate."""
        if not self.settings.node.refuse_unknown_peers:
            return True
        return any(p.ae_title == ae_title and p.host in (None, address) for p in self.settings.node.allowed_peers)

    def check_peer(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject an association from a caller that is not configured."""
        try:
            calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
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

    @staticmethod
    def _reject(event: evt.Event, result: int, source: int, reason: int) -> None:
        event.assoc.acse.send_reject(result, source, reason)
        event.assoc.kill()

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
            event.assoc.abort()

    def _answer_malformed(self, event: evt.Event) -> None:
        """EVT_DIMSE_RECV: answer 0xC000 to a C-STORE request whose command set pynetdicom cannot
        serve (an empty Affected SOP Instance UID, no Message ID, ...): pynetdicom drops such a
        request without a response, so the sender would wait for its own timeout. One whose
        command set cannot even be read (an over-long UID) pynetdicom answers with an A-ABORT."""
        message = event.message
        command = message.command_set
        if command is None or command.get("CommandField") != C_STORE_RQ_FIELD:
            return
        try:
            if message.message_to_primitive().is_valid_request:
                return  # the storage service answers it (the handler checks the UIDs)
        except Exception:  # noqa: BLE001 - pynetdicom answers it with an A-ABORT itself (Evt19)
            log.warning("aborted an association: a C-STORE command set that cannot be read",
                        calling_aet=event.assoc.requestor.ae_title)
            return
        response = C_STORE()
        message_id = command.get("MessageID")
        response.MessageIDBeingRespondedTo = message_id if isinstance(message_id, int) and 0 <= message_id < 2**16 else 0
        if uid_problem(str(command.get("AffectedSOPClassUID", "")), "class") is None:
            response.AffectedSOPClassUID = command.AffectedSOPClassUID
        response.Status = StoreStatus.CANNOT_UNDERSTAND
        log.warning("refused a C-STORE request with a malformed command set", calling_aet=event.assoc.requestor.ae_title,
                    status=f"0x{StoreStatus.CANNOT_UNDERSTAND:04X}",
                    why=uid_problem(str(command.get("AffectedSOPInstanceUID", "")), "Affected SOP Instance UID")
                    or "required command elements missing")
        event.assoc.dimse.send_msg(response, message.context_id)

    def _closed(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: forget the connection; say how many protocol errors it caused."""
        self._received.pop(id(event.assoc), None)
        with self._lock:
            self._associations.pop(id(event.assoc), None)
        self._audit_batch(id(event.assoc))
        suppressed = self._errors.closed(threading.current_thread().name)
        if suppressed:
            log.warning("connection closed after protocol errors", address=event.address[0],
                        errors_not_logged=suppressed)

    def _count(self, key: int, calling: str, study_uid: str, size: int) -> None:
        """Metrics and this association's audit batch for one stored instance (never raises)."""
        try:
            self.metrics.instances_received.labels("dicom").inc()
            self.metrics.received_bytes.labels("dicom").inc(size)
            batch = self._batches.setdefault(key, (calling, {}))[1].setdefault(study_uid, [0, 0])
            batch[0] += 1
            batch[1] += size
        except Exception as exc:  # noqa: BLE001 - accounting never fails a C-STORE
            log.error("could not count an instance", error=f"{type(exc).__name__}: {exc}")

    def _audit_batch(self, key: int) -> None:
        """The audit trail's line per study for what one association stored (never raises)."""
        calling, studies = self._batches.pop(key, ("", {}))
        for study_uid, (count, size) in studies.items():
            try:
                self.ledger.add_event(EventKind.RECEIVED, calling, study_uid, f"{count} instances ({size} bytes) "
                                      f"from {calling}", {"instances": count, "bytes": size, "calling_aet": calling})
            except Exception as exc:  # noqa: BLE001 - the audit line is lost, the instances are not
                log.error("could not write the audit trail", study_uid=study_uid, error=f"{type(exc).__name__}: {exc}")

    def _disk_low(self) -> bool:
        floor = self.settings.storage.min_free_disk_mb * 2**20
        return shutil.disk_usage(self.spool).free < floor

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

    def _store(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title
        self._received.pop(id(event.assoc), None)  # this instance has arrived in full
        try:
            return self._file(event, calling)
        except Refused as exc:
            log.warning("refused an instance", calling_aet=calling, status=f"0x{exc.status:04X}", why=str(exc))
            return exc.status

    def _checked(self, event: evt.Event) -> tuple[Dataset, str, str, str, str]:
        """The dataset and its UIDs (SOP instance, SOP class, study, series), checked before
        anything touches the disk; Refused otherwise."""
        request = event.request
        sop_uid, sop_class = str(request.AffectedSOPInstanceUID or ""), str(request.AffectedSOPClassUID or "")
        for value, name in ((sop_uid, "Affected SOP Instance UID"), (sop_class, "Affected SOP Class UID")):
            if (problem := uid_problem(value, name)) is not None:
                raise Refused(StoreStatus.CANNOT_UNDERSTAND, problem)
        transfer_syntax = UID(event.context.transfer_syntax)
        raw = request.DataSet.getvalue() if request.DataSet is not None else b""
        if len(raw) > self.max_instance_bytes:
            raise Refused(StoreStatus.OUT_OF_RESOURCES, f"an instance of {len(raw)} bytes")
        if transfer_syntax == DeflatedExplicitVRLittleEndian and (
                problem := inflated_size_problem(raw, self.max_instance_bytes)) is not None:
            raise Refused(StoreStatus.OUT_OF_RESOURCES, problem)
        try:
            ds = event.dataset  # parsed lazily: only the UIDs below are read, pixels are not decoded
            PHI_VALUES.add_from(ds)  # whatever is logged about it from now on is scrubbed of these
            uids = {name: str(ds.get(name, "") or "") for name in
                    ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
            cut = truncation(ds, sop_class, transfer_syntax)
            too_big = image_size_problem(ds, self.settings.limits.max_pixels)
        except Exception as exc:  # noqa: BLE001 - any malformed payload is answered, not raised
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, f"cannot be parsed: {type(exc).__name__}: {exc}") from None
        if uids["SOPInstanceUID"] != sop_uid:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, "the dataset's SOP Instance UID differs from the command's")
        for name in ("StudyInstanceUID", "SeriesInstanceUID"):
            if (problem := uid_problem(uids[name], name)) is not None:
                raise Refused(StoreStatus.CANNOT_UNDERSTAND, problem)
        if cut is not None:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, f"truncated dataset: {cut}")
        if too_big is not None:
            raise Refused(StoreStatus.OUT_OF_RESOURCES, too_big)
        return ds, sop_uid, sop_class, uids["StudyInstanceUID"], uids["SeriesInstanceUID"]

    def _file(self, event: evt.Event, calling: str) -> int:
        if self._disk_low():
            raise Refused(StoreStatus.OUT_OF_RESOURCES, "free disk under the configured floor")
        ds, sop_uid, sop_class, study_uid, series_uid = self._checked(event)
        try:
            target = spool_path(self.spool, study_uid, series_uid, sop_uid)
            data = event.encoded_dataset(include_meta=True)
        except UnsafePath as exc:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from None
        except Exception as exc:  # noqa: BLE001
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, f"cannot be encoded: {type(exc).__name__}: {exc}") from None
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        known = self.ledger.instance(series_uid, sop_uid)
        if known is not None and known[0] != study_uid:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, f"SOP Instance UID {sop_uid} of series {series_uid} is already "
                                                          f"filed under another study ({known[0]})")
        if known is not None and known[1] == digest:
            log.debug("re-sent instance, same content", sop_instance_uid=sop_uid, study_uid=study_uid)
            return StoreStatus.SUCCESS
        series_size = series_size_of(ds, self.settings.limits.max_series_images)
        try:
            write_durably(data, target, self.settings.storage.fsync)
            recorded = self.ledger.record_instance(sop_uid, study_uid, series_uid, sop_class, target, calling,
                                                   series_size, reopens_study(sop_class), digest)
        except OSError as exc:
            log.error("could not store an instance", sop_instance_uid=sop_uid, error=str(exc))
            return StoreStatus.OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else StoreStatus.PROCESSING_FAILURE
        except Exception as exc:  # noqa: BLE001 - the service keeps running
            log.error("could not record an instance", sop_instance_uid=sop_uid, error=f"{type(exc).__name__}: {exc}")
            return StoreStatus.PROCESSING_FAILURE
        if recorded is Recorded.OTHER_STUDY:  # filed under another study between our check and now
            target.unlink(missing_ok=True)
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, f"SOP Instance UID {sop_uid} of series {series_uid} is already "
                                                          "filed under another study")
        if recorded is Recorded.REPLACED:
            log.info("instance re-sent with new content: replaced, study re-opened", sop_instance_uid=sop_uid,
                     series_uid=series_uid, study_uid=study_uid)
        if recorded is Recorded.NEW and study_uid not in self._repeats_logged \
                and self.ledger.sop_uid_repeats(study_uid, sop_uid):
            self._repeats_logged.add(study_uid)
            log.info("SOP Instance UIDs repeat across the series of a study: every instance kept, "
                     "keyed by series and SOP Instance UID", study_uid=study_uid, sop_instance_uid=sop_uid)
        log.debug("stored", sop_instance_uid=sop_uid, study_uid=study_uid, recorded=recorded.value)
        if recorded in (Recorded.NEW, Recorded.REPLACED):
            self._count(id(event.assoc), calling, study_uid, len(data))
        return StoreStatus.SUCCESS
