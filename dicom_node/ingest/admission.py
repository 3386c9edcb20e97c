"""One admission for every image, whatever brought it (C-STORE, the web page's upload, STOW-RS):
the same checks, in the same order, before anything is inflated, decoded or filed, and the same
filing: the free-disk floor; the command's UIDs (C-STORE); the instance size bound and the
Deflate bound (inflated in bounded steps, never whole, before it is read); the header read with
every large value deferred; the UIDs (pydicom's ``UID.is_valid``); truncation; the image-size
bound (``limits.max_pixels``); the spool path; the conflict check (the same (series, SOP
instance) filed under another study is refused, the same bytes again are a re-send); then the
write (bytes) or the rename (a file staged under the spool), fsynced, the ledger record (renames,
folder fsyncs and ledger commits shared by the instances filed at the same time: ``GroupCommit``),
the metrics, and the audit trail's line per association and study (``Batch``).

``Admission.admit`` does it all for one instance (C-STORE, STOW-RS); an upload, which is taken
whole or not at all, calls ``inspect`` on every file first and ``file`` on each once all passed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from dicom_node.config import Settings
from dicom_node.errors import NodeError
from dicom_node.ingest.checks import image_size_problem, reopens_study, series_size_of, truncation
from dicom_node.ingest.header import CHUNK, InflateProblem, as_uid, inflate, read_file_meta, read_header
from dicom_node.ingest.staging import Staging
from dicom_node.ingest.statuses import StoreStatus
from dicom_node.observability import PHI_VALUES, NodeMetrics, get_logger, study_scope
from dicom_node.states import EventKind
from dicom_node.store import (
    GroupCommit,
    InstanceRecord,
    Ledger,
    Recorded,
    UnsafePath,
    spool_path,
    uid_problem,
    write_beside,
)

log = get_logger(__name__)


class Source(StrEnum):
    """What brought an instance: the ``source`` label of the metrics."""

    DICOM = "dicom"  # C-STORE
    UPLOAD = "upload"  # the web page's upload
    STOW = "stow"  # STOW-RS
    RETRIEVE = "retrieve"  # fetched by the node itself from a query/retrieve source (C-GET, WADO-RS)


class Reason(StrEnum):
    """Why an instance is refused (the kind; the refusal's ``detail`` says what exactly)."""

    DISK_LOW = "free disk under the floor"
    INVALID_UID = "invalid UID"
    NOT_DICOM = "not a DICOM file"
    TOO_LARGE = "too large"
    UNREADABLE = "cannot be parsed"
    UIDS_DIFFER = "UIDs differ"
    TRUNCATED = "truncated"
    TOO_MANY_PIXELS = "image too large"
    OTHER_STUDY = "filed under another study"


class Outcome(StrEnum):
    """What admitting an instance came to."""

    NEW = "new"
    REPLACED = "replaced"  # the same (series, SOP instance) with other bytes: the study is graded again
    RESENT = "resent"  # the same bytes again: nothing changes
    REFUSED = "refused"  # nothing stored: the sender's fault (``reason``)
    FAILED = "failed"  # nothing stored: the node's fault (a disk or ledger error)


ADMITTED = frozenset({Outcome.NEW, Outcome.REPLACED, Outcome.RESENT})


class Refused(NodeError, ValueError):
    """An instance the node does not store: the DICOM status to answer, the kind and what exactly."""

    def __init__(self, status: StoreStatus, reason: Reason, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class Candidate:
    """An instance offered for admission: the bytes C-STORE received (a bare dataset in the
    presentation context's ``transfer_syntax``, with the command's UIDs and pynetdicom's file
    meta to write before it), or a Part 10 file (``body`` bytes or a file staged under the spool's
    staging area, moved into the spool when filed: it is never read whole into memory)."""

    source: Source
    sender: str  # the calling AE title, or the user who uploaded
    body: bytes | Path
    transfer_syntax: UID | None = None  # a bare dataset's; None: ``body`` is Part 10 and its file meta says
    sop_class_uid: str | None = None  # the command's (C-STORE)
    sop_instance_uid: str | None = None  # the command's (C-STORE): the dataset's must be the same
    file_meta: Callable[[], bytes] | None = None  # preamble, 'DICM' and file meta to write before a bare dataset

    @property
    def commanded(self) -> bool:
        """Whether it came with a command's UIDs (C-STORE): checked first, the dataset's must agree."""
        return self.sop_instance_uid is not None or self.sop_class_uid is not None

    @classmethod
    def received(cls, dataset: bytes, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str,
                 calling_aet: str, file_meta: Callable[[], bytes], source: Source = Source.DICOM) -> Candidate:
        """A C-STORE's data set as pynetdicom assembled it (``Source.RETRIEVE``: a C-GET's sub-operation)."""
        return cls(source, calling_aet, dataset, as_uid(transfer_syntax), sop_class_uid, sop_instance_uid,
                   file_meta)

    @classmethod
    def staged(cls, path: Path, source: Source, sender: str) -> Candidate:
        """A Part 10 file streamed to the staging area (an upload, STOW-RS)."""
        return cls(source, sender, path)


@dataclass(frozen=True)
class Admissible:
    """An instance that passed every check, ready to be filed (``Admission.file``)."""

    candidate: Candidate
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    series_size: int | None  # ImagesInAcquisition when plausible (``limits.max_series_images``), else None
    target: Path  # where it goes in the spool
    head: bytes  # written before a bare dataset: preamble, 'DICM' and file meta (empty for a Part 10 body)
    size: int  # bytes of the Part 10 file filed
    digest: str  # of those bytes
    resent: bool  # the same bytes are already filed under this (series, SOP instance)


@dataclass(frozen=True)
class Verdict:
    """What admitting an instance came to: the DICOM status to answer, and for a refusal or a
    failure the kind and what exactly (plain words, no file names)."""

    outcome: Outcome
    status: StoreStatus
    reason: Reason | None = None
    detail: str = ""
    instance: Admissible | None = None

    @property
    def admitted(self) -> bool:
        return self.outcome in ADMITTED


@dataclass
class Batch:
    """What one association stored, per study: counted as it goes, written to the audit trail as
    one line per study when it ends (``close``)."""

    ledger: Ledger
    source: Source
    sender: str
    studies: dict[str, list[int]] = field(default_factory=dict)  # study UID -> [instances, bytes]

    def count(self, study_uid: str, size: int) -> None:
        tally = self.studies.setdefault(study_uid, [0, 0])
        tally[0] += 1
        tally[1] += size

    def close(self) -> None:
        """The audit trail's line per study (never raises)."""
        studies, self.studies = self.studies, {}
        for study_uid, (count, size) in studies.items():
            try:
                self.ledger.add_event(EventKind.RECEIVED, self.sender, study_uid,
                                      f"{count} instances ({size} bytes) from {self.sender}",
                                      {"instances": count, "bytes": size, "calling_aet": self.sender})
            except Exception as exc:  # noqa: BLE001 - the audit line is lost, the instances are not
                log.error("could not write the audit trail", study_uid=study_uid, error=f"{type(exc).__name__}: {exc}")


class Admission:
    """The node's one way in for an instance: checks, then the spool and the ledger."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: NodeMetrics):
        self.settings, self.ledger, self.metrics = settings, ledger, metrics
        self.spool = Path(settings.storage.spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.staging = Staging(self.spool)
        self.commits = GroupCommit(ledger, settings.storage.fsync)  # shared by the threads that file at once
        self.max_instance_bytes = int(settings.limits.max_instance_mb * 2**20)
        self._repeats_logged: set[str] = set()  # studies said to repeat SOP Instance UIDs across series

    def batch(self, source: Source, sender: str) -> Batch:
        """A new tally for one association's (or request's) audit lines."""
        return Batch(self.ledger, source, sender)

    def disk_low(self) -> bool:
        """Whether the spool's free disk is under ``storage.min_free_disk_mb``."""
        return shutil.disk_usage(self.spool).free < self.settings.storage.min_free_disk_mb * 2**20

    # -- one instance, start to end ----------------------------------------------------------------

    def admit(self, candidate: Candidate, batch: Batch | None = None) -> Verdict:
        """Check and file one instance; a refusal is logged (its kind and detail, never a file name)."""
        try:
            admissible = self.inspect(candidate)
        except Refused as exc:
            log.warning("refused an instance", **{_sender_key(candidate.source): candidate.sender},
                        status=f"0x{exc.status:04X}", why=exc.detail)
            return Verdict(Outcome.REFUSED, exc.status, exc.reason, exc.detail)
        verdict = self.file(admissible, batch)
        if verdict.outcome is Outcome.REFUSED:
            log.warning("refused an instance", **{_sender_key(candidate.source): candidate.sender},
                        status=f"0x{verdict.status:04X}", why=verdict.detail)
        return verdict

    # -- the checks --------------------------------------------------------------------------------

    def inspect(self, candidate: Candidate) -> Admissible:
        """Every check, before anything touches the spool or the ledger; Refused otherwise."""
        if self.disk_low():
            raise Refused(StoreStatus.OUT_OF_RESOURCES, Reason.DISK_LOW, "free disk under the configured floor")
        for value, name in ((candidate.sop_instance_uid, "Affected SOP Instance UID"),
                            (candidate.sop_class_uid, "Affected SOP Class UID")):
            if candidate.commanded and (problem := uid_problem(value, name)) is not None:
                raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.INVALID_UID, problem)
        with _opened(candidate.body) as (fp, end):
            meta, transfer_syntax = self._file_meta(candidate, fp)
            ds, header_end = self._read(fp, end, transfer_syntax, candidate.body)
        try:
            with study_scope(_text(ds, "StudyInstanceUID"), summarize=False):  # pydicom's warnings: once per study
                PHI_VALUES.add_from(ds)  # whatever is logged about it from now on is scrubbed of these
            sop_uid = (candidate.sop_instance_uid or _text(ds, "SOPInstanceUID")
                       or _text(meta, "MediaStorageSOPInstanceUID"))
            sop_class = candidate.sop_class_uid or _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
            uids = {name: _text(ds, name) for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
            modality = _text(ds, "Modality")
            cut = truncation(ds, sop_class, transfer_syntax, header_end)
            too_big = image_size_problem(ds, self.settings.limits.max_pixels)
            series_size = series_size_of(ds, self.settings.limits.max_series_images)
        except Exception as exc:  # noqa: BLE001 - any malformed payload is answered, not raised
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.UNREADABLE,
                          f"cannot be parsed: {type(exc).__name__}: {exc}") from None
        if candidate.commanded and uids["SOPInstanceUID"] != sop_uid:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.UIDS_DIFFER,
                          "the dataset's SOP Instance UID differs from the command's")
        checked = [("StudyInstanceUID", uids["StudyInstanceUID"]), ("SeriesInstanceUID", uids["SeriesInstanceUID"])]
        if not candidate.commanded:  # a file: its own SOP UIDs (C-STORE's are the command's, checked above)
            checked = [("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class), *checked]
        for name, value in checked:
            if (problem := uid_problem(value, name)) is not None:
                raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.INVALID_UID, problem)
        if cut is not None:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.TRUNCATED, f"truncated dataset: {cut}")
        if too_big is not None:
            raise Refused(StoreStatus.OUT_OF_RESOURCES, Reason.TOO_MANY_PIXELS, too_big)
        study_uid, series_uid = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
        try:
            target = spool_path(self.spool, study_uid, series_uid, sop_uid)
        except UnsafePath as exc:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.INVALID_UID, str(exc)) from None
        head = self._head(candidate)
        size, digest = _digest(candidate.body, head)
        known = self.ledger.instance(series_uid, sop_uid)
        if known is not None and known.study_uid != study_uid:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.OTHER_STUDY,
                          f"SOP Instance UID {sop_uid} of series {series_uid} is already filed under another "
                          f"study ({known.study_uid})")
        return Admissible(candidate, sop_uid, sop_class, study_uid, series_uid, modality, series_size, target, head,
                          size, digest, known is not None and known.digest == digest)

    def _file_meta(self, candidate: Candidate, fp: BinaryIO) -> tuple[Dataset, UID]:
        """A Part 10 body's file meta and transfer syntax (``fp`` left at the dataset), or a bare
        dataset's given syntax."""
        if candidate.transfer_syntax is not None:
            return Dataset(), candidate.transfer_syntax
        try:
            meta: FileMetaDataset = read_file_meta(fp)
            transfer_syntax = as_uid(_text(meta, "TransferSyntaxUID"))
        except Exception as exc:  # noqa: BLE001 - no 'DICM', or file meta that cannot be read
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.NOT_DICOM,
                          f"not a DICOM Part 10 file ({type(exc).__name__})") from None
        try:
            known = bool(transfer_syntax) and transfer_syntax.is_transfer_syntax
        except ValueError:  # a private UID
            known = False
        if not known:
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.UNREADABLE,
                          f"cannot be parsed: unknown transfer syntax {transfer_syntax[:64]!r}")
        return meta, transfer_syntax

    def _read(self, fp: BinaryIO, end: int, transfer_syntax: UID, body: bytes | Path) -> tuple[Dataset, int]:
        """The dataset from ``fp``'s position, after the size and Deflate bounds; and the size of
        the stream it was read from (raw lengths are checked against it)."""
        size = end - fp.tell()
        if size > self.max_instance_bytes:
            raise Refused(StoreStatus.OUT_OF_RESOURCES, Reason.TOO_LARGE, f"an instance of {size} bytes")
        start = fp.tell()
        if transfer_syntax.is_deflated:
            try:
                inflate(fp.read, self.max_instance_bytes)  # counted only: a bomb is refused here
            except InflateProblem as exc:
                status = StoreStatus.OUT_OF_RESOURCES if exc.too_large else StoreStatus.CANNOT_UNDERSTAND
                raise Refused(status, Reason.TOO_LARGE if exc.too_large else Reason.UNREADABLE, str(exc)) from None
            fp.seek(start)
            # within the bound: inflated for reading, into memory for bytes, beside the staged file for a file
            with io.BytesIO() if isinstance(body, bytes) else tempfile.TemporaryFile(dir=body.parent) as inflated:
                end = inflate(fp.read, self.max_instance_bytes, inflated)
                inflated.seek(0)
                return self._parse(inflated, transfer_syntax), end
        return self._parse(fp, transfer_syntax), end

    @staticmethod
    def _parse(fp: BinaryIO, transfer_syntax: UID) -> Dataset:
        try:
            return read_header(fp, transfer_syntax)
        except Exception as exc:  # noqa: BLE001 - any malformed payload is answered, not raised
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.UNREADABLE,
                          f"cannot be parsed: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _head(candidate: Candidate) -> bytes:
        if candidate.file_meta is None:
            return b""
        try:
            return candidate.file_meta()
        except Exception as exc:  # noqa: BLE001 - pynetdicom's encoder fails many ways: each is a refusal
            raise Refused(StoreStatus.CANNOT_UNDERSTAND, Reason.UNREADABLE,
                          f"cannot be encoded: {type(exc).__name__}: {exc}") from None

    # -- filing ------------------------------------------------------------------------------------

    def file(self, item: Admissible, batch: Batch | None = None) -> Verdict:
        """Write (bytes) or move (a staged file) an admissible instance into the spool, fsynced,
        and record it; count it in the metrics and ``batch``. Never raises."""
        candidate, sop_uid, study_uid = item.candidate, item.sop_instance_uid, item.study_uid
        if item.resent:
            log.debug("re-sent instance, same content", sop_instance_uid=sop_uid, study_uid=study_uid)
            return Verdict(Outcome.RESENT, StoreStatus.SUCCESS, instance=item)
        fsync = self.settings.storage.fsync
        record = InstanceRecord(sop_uid, study_uid, item.series_uid, item.sop_class_uid, item.target,
                                candidate.sender if candidate.source in _AE_SOURCES else candidate.source.value.upper(),
                                item.series_size, reopens_study(item.sop_class_uid), item.digest)
        try:
            if isinstance(candidate.body, Path):
                staged = _synced_staged(candidate.body, item.target, fsync)
            else:
                staged = write_beside(item.head + candidate.body, item.target, fsync)
            # renamed into place, its folder fsynced and recorded in a round shared with the instances
            # other associations file meanwhile: returns once that round's ledger commit is done
            recorded = self.commits.file(staged, record)
        except OSError as exc:
            log.error("could not store an instance", sop_instance_uid=sop_uid, error=str(exc))
            status = StoreStatus.OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else StoreStatus.PROCESSING_FAILURE
            return Verdict(Outcome.FAILED, status, detail=f"could not store it: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - the service keeps running
            log.error("could not record an instance", sop_instance_uid=sop_uid, error=f"{type(exc).__name__}: {exc}")
            return Verdict(Outcome.FAILED, StoreStatus.PROCESSING_FAILURE, detail="could not record it")
        if recorded is Recorded.OTHER_STUDY:  # filed under another study between our check and now
            item.target.unlink(missing_ok=True)
            detail = f"SOP Instance UID {sop_uid} of series {item.series_uid} is already filed under another study"
            return Verdict(Outcome.REFUSED, StoreStatus.CANNOT_UNDERSTAND, Reason.OTHER_STUDY, detail, item)
        if recorded is Recorded.RESENT:
            return Verdict(Outcome.RESENT, StoreStatus.SUCCESS, instance=item)
        if recorded is Recorded.REPLACED:
            log.info("instance re-sent with new content: replaced, study re-opened", sop_instance_uid=sop_uid,
                     series_uid=item.series_uid, study_uid=study_uid)
        if recorded is Recorded.NEW and study_uid not in self._repeats_logged \
                and self.ledger.sop_uid_repeats(study_uid, sop_uid):
            self._repeats_logged.add(study_uid)
            log.info("SOP Instance UIDs repeat across the series of a study: every instance kept, "
                     "keyed by series and SOP Instance UID", study_uid=study_uid, sop_instance_uid=sop_uid)
        log.debug("stored", sop_instance_uid=sop_uid, study_uid=study_uid, recorded=recorded.value)
        self._count(candidate.source, study_uid, item.size, batch)
        return Verdict(Outcome(recorded.value), StoreStatus.SUCCESS, instance=item)

    def _count(self, source: Source, study_uid: str, size: int, batch: Batch | None) -> None:
        """Metrics and the batch's tally for one stored instance (never raises)."""
        try:
            self.metrics.instances_received.labels(source.value).inc()
            self.metrics.received_bytes.labels(source.value).inc(size)
            if batch is not None:
                batch.count(study_uid, size)
        except Exception as exc:  # noqa: BLE001 - accounting never fails an admission
            log.error("could not count an instance", error=f"{type(exc).__name__}: {exc}")


#: Sources whose sender is a DICOM peer (its AE title, or a DICOMweb source's name): the ledger's calling AE.
_AE_SOURCES = frozenset({Source.DICOM, Source.RETRIEVE})


def _sender_key(source: Source) -> str:
    return "calling_aet" if source in _AE_SOURCES else "sender"


def _digest(body: bytes | Path, head: bytes) -> tuple[int, str]:
    """Size and digest of the Part 10 bytes that would be filed: ``head`` then ``body``."""
    digest = hashlib.blake2b(head, digest_size=16)
    if isinstance(body, bytes):
        digest.update(body)
        return len(head) + len(body), digest.hexdigest()
    size = len(head)
    with open(body, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip("\0 ")


@contextmanager
def _opened(body: bytes | Path) -> Iterator[tuple[BinaryIO, int]]:
    """A candidate's bytes as a stream from their start, and their size."""
    if isinstance(body, bytes):
        yield io.BytesIO(body), len(body)
        return
    with open(body, "rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def _synced_staged(staged: Path, target: Path, fsync: bool) -> Path:
    """A staged file (under the spool: the same file system) fsynced, and the target's folder made,
    for ``GroupCommit.file`` to rename into place."""
    if fsync:
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    target.parent.mkdir(parents=True, exist_ok=True)
    return staged
