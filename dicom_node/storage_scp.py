"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only writes the received encoded
dataset to the spool (no pixel decoding), fsyncs it, records it in the ledger, then answers."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
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
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status

from dicom_node.config import Settings
from dicom_node.dimse import RejectReason, RejectResult, RejectSource, StoreStatus
from dicom_node.ledger import Ledger
from dicom_node.logconfig import get_logger

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
UNDEFINED_LENGTH = 0xFFFFFFFF

# Stored and recorded, but they do not (re)open a study for grading: Structured Reports (our own
# results coming back from the PACS among them), Secondary Captures, presentation states.
_NOT_GRADED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.")


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


class _PollClock:
    """``time`` for pynetdicom's association and DUL modules, with their sleeps capped at ``poll_s``.

    pynetdicom's acceptor reactor sleeps a fixed 1 ms between polls of its DIMSE queue, and each
    association's DUL reactor 1 ms between polls of its socket; neither has a public setting, and
    each C-STORE waits for such polls: at 4 to 5 ms per image that is a large share.
    """

    def __init__(self, poll_s: float):
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll_s))

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(data: bytes, target: Path, fsync: bool = True) -> None:
    """Write to a temporary file in the target's folder, fsync, rename into place, fsync the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StorageSCP:
    """Receives studies into the spool and the ledger."""

    def __init__(self, settings: Settings, ledger: Ledger):
        self.settings = settings
        self.ledger = ledger
        self.spool = Path(settings.storage.spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.ae = AE(ae_title=settings.node.ae_title)
        self.ae.maximum_pdu_size = settings.node.max_pdu_size
        for context in StoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.server = None
        self._in_flight = 0
        self._idle = threading.Condition()

    def start(self) -> None:
        """Listen in the background (pynetdicom runs one thread per association)."""
        node = self.settings.node
        self.server = self.ae.start_server((node.bind_address, node.port), block=False,
                                           evt_handlers=[(evt.EVT_REQUESTED, self.check_peer),
                                                         (evt.EVT_C_STORE, self.handle_store),
                                                         (evt.EVT_C_ECHO, lambda event: Status.SUCCESS)])
        log.info("storage SCP listening", ae_title=node.ae_title, port=node.port)

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
        log.info("storage SCP stopped", writes_unfinished=self._in_flight, associations_aborted=len(associations))

    def allowed(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE title (from this address) may associate."""
        if not self.settings.node.refuse_unknown_peers:
            return True
        return any(p.ae_title == ae_title and p.host in (None, address) for p in self.settings.node.allowed_peers)

    def check_peer(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject an association from a caller that is not configured."""
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        address = event.assoc.requestor.address
        if not self.allowed(calling, address):
            log.warning("rejected an association from an unknown peer", calling_aet=calling, address=address)
            event.assoc.acse.send_reject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                         RejectReason.CALLING_AE_NOT_RECOGNISED)
            event.assoc.kill()

    def _disk_low(self) -> bool:
        floor = self.settings.storage.min_free_disk_mb * 2**20
        return shutil.disk_usage(self.spool).free < floor

    def handle_store(self, event: evt.Event) -> int:
        """Write, fsync, record, then answer; never raises into pynetdicom."""
        with self._idle:
            self._in_flight += 1
        try:
            return self._store(event)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        sop_class = str(event.request.AffectedSOPClassUID)
        if self._disk_low():
            log.warning("refused an instance: free disk under the configured floor",
                        sop_instance_uid=sop_uid, min_free_disk_mb=self.settings.storage.min_free_disk_mb)
            return StoreStatus.OUT_OF_RESOURCES
        try:
            ds = event.dataset  # parsed lazily: only the UIDs below are read, pixels are not decoded
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            cut = truncation(ds, sop_class, UID(event.context.transfer_syntax))
            if cut is not None:
                raise ValueError(f"truncated dataset: {cut}")
            size = ds.get("ImagesInAcquisition")
            series_size = int(size) if size not in (None, "") else None
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - any malformed payload is answered, not raised
            log.warning("refused an instance that cannot be parsed", sop_instance_uid=sop_uid,
                        calling_aet=calling, error=f"{type(exc).__name__}: {exc}")
            return StoreStatus.CANNOT_UNDERSTAND
        target = self.spool / study_uid / f"{sop_uid}.dcm"
        try:
            write_durably(data, target, self.settings.storage.fsync)
            new = self.ledger.record_instance(sop_uid, study_uid, series_uid, sop_class, target, calling,
                                              series_size, reopens_study(sop_class))
        except OSError as exc:
            log.error("could not store an instance", sop_instance_uid=sop_uid, error=str(exc))
            return StoreStatus.OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else StoreStatus.PROCESSING_FAILURE
        except Exception as exc:  # noqa: BLE001 - the service keeps running
            log.error("could not record an instance", sop_instance_uid=sop_uid, error=f"{type(exc).__name__}: {exc}")
            return StoreStatus.PROCESSING_FAILURE
        log.debug("stored", sop_instance_uid=sop_uid, study_uid=study_uid, new=new)
        return StoreStatus.SUCCESS
