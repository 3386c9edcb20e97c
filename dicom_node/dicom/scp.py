"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only writes the received encoded
dataset to the spool (no pixel decoding), fsyncs it, records it in the ledger, then answers.
Instances are spooled and recorded per (series, SOP Instance UID)."""

from __future__ import annotations

import errno
import hashlib
import shutil
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
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
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status

from dicom_node import tls
from dicom_node.config import Settings
from dicom_node.dicom import tuning
from dicom_node.dicom.peers import GuardedServer, PeerGate
from dicom_node.dicom.statuses import StoreStatus
from dicom_node.errors import NodeError
from dicom_node.ingest import image_size_problem, inflated_size_problem, reopens_study, series_size_of, truncation
from dicom_node.observability import PHI_VALUES, NodeMetrics, get_logger
from dicom_node.states import EventKind
from dicom_node.store import Ledger, Recorded, UnsafePath, spool_path, uid_problem, write_durably

__all__ = ["C_STORE_RQ_FIELD", "TRANSFER_SYNTAXES", "Refused", "StorageSCP"]

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


class Refused(NodeError):
    """An instance the node does not store: the status to answer and why (for the log)."""

    def __init__(self, status: StoreStatus, why: str):
        super().__init__(why)
        self.status = status


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
        # the node's limits (PeerGate) count associations only, so silent sockets held open by
        # someone cannot lock the PACS out: pynetdicom's own count is only the connection cap.
        self.ae.maximum_associations = limits.max_connections
        self.peers = PeerGate(settings, self.metrics)
        self.max_instance_bytes = int(limits.max_instance_mb * 2**20)
        self._received: dict[int, int] = {}  # association id -> bytes received since its last C-STORE
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
        handlers = [(evt.EVT_REQUESTED, self.peers.check), (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_C_ECHO, lambda event: Status.SUCCESS), (evt.EVT_DATA_RECV, self._count_data),
                    (evt.EVT_DIMSE_RECV, self._answer_malformed), (evt.EVT_CONN_CLOSE, self._closed)]
        GuardedServer.socket_timeout_s = self.settings.limits.socket_timeout_s
        GuardedServer.max_connections = self.settings.limits.max_connections
        # With node.tls, every connection must speak TLS (plain TCP fails the handshake and is closed).
        ssl_context = tls.server_context(node.tls) if node.tls is not None else None
        server = self.ae.make_server((node.bind_address, node.port), evt_handlers=handlers,
                                     server_class=GuardedServer, ssl_context=ssl_context)
        tuning.apply(node.poll_interval_ms / 1000)  # process-wide; stop() restores it
        threading.Thread(target=server.serve_forever, name="storage-scp-acceptor", daemon=True).start()
        self.server = server
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
        for assoc in associations:
            if assoc.is_alive():
                assoc.abort()
        ended = time.monotonic() + 5.0  # their threads end before the excepthook and the filter go
        for assoc in associations:
            if assoc.is_alive():
                assoc.join(max(0.0, ended - time.monotonic()))
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
        self.peers.closed(id(event.assoc))
        self._audit_batch(id(event.assoc))
        suppressed = tuning.ERRORS.closed(threading.current_thread().name)
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
