"""The query/retrieve SCU: asks a PACS what it holds (C-FIND, Study Root, at study and series
level) and has it hand over series (C-MOVE to the node's own AE title, whose storage SCP admits
them as any C-STORE; or C-GET, whose C-STORE sub-operations come back on this association and go
through the node's one admission, ``ingest.Admission``, as ``Source.RETRIEVE``).

What a query asks and a match holds is common to every kind of source (``StudyQuery``,
``StudyMatch``, ``SeriesMatch``, ``RetrieveTally``, the ``QRSource`` protocol); the DICOMweb kind
(QIDO-RS and WADO-RS) is ``dicomweb.retrieve``. No patient data is logged: studies and series by UID.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pynetdicom import AE, Association, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import QueryRetrieveSource, RetrieveMethod
from dicom_node.dicom.scp import TRANSFER_SYNTAXES
from dicom_node.errors import NodeError
from dicom_node.ingest import Admission, Batch, Candidate, Source, StoreStatus
from dicom_node.observability import get_logger
from dicom_node.tls import client_context

__all__ = ["RETRIEVED_STORAGE_CLASSES", "DimseSource", "Progress", "QRSource", "RetrieveTally", "RetrieveTimeout",
           "SeriesMatch", "SourceError", "StudyMatch", "StudyQuery", "series_match", "study_match"]

log = get_logger(__name__)

#: The storage SOP classes a C-GET asks to receive (the images the node grades).
RETRIEVED_STORAGE_CLASSES = (MRImageStorage, EnhancedMRImageStorage, EnhancedMRColorImageStorage,
                             LegacyConvertedEnhancedMRImageStorage)
PENDING = frozenset({0xFF00, 0xFF01})
CANCELLED = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801


class SourceError(NodeError, RuntimeError):
    """A source could not be asked, or refused or failed the request; the message says which and why."""


class RetrieveTimeout(SourceError):
    """A retrieve still running when its time (``retrieve.wait_s``) was up: cancelled or left."""


@dataclass(frozen=True)
class StudyQuery:
    """What to look for: a study by its UID, an accession number or a patient ID, optionally only
    studies from ``since`` on."""

    study_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    since: date | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.study_uid, self.accession, self.patient_id)) != 1:
            raise ValueError("a study query names exactly one of a study UID, an accession number, a patient ID")

    @property
    def date_range(self) -> str:
        """The StudyDate matching value: ``YYYYMMDD-`` from ``since`` on, or empty (any)."""
        return f"{self.since:%Y%m%d}-" if self.since is not None else ""

    def describe(self) -> str:
        """The query in words, for logs and the command's output (a patient ID is not repeated)."""
        what = (f"study {self.study_uid}" if self.study_uid else f"accession number {self.accession}"
                if self.accession else "a patient ID")
        return what + (f" since {self.since:%Y-%m-%d}" if self.since else "")


@dataclass(frozen=True)
class StudyMatch:
    """A study a source holds (no patient data kept)."""

    study_uid: str
    study_date: str
    accession: str
    modalities: tuple[str, ...]
    instances: int | None  # NumberOfStudyRelatedInstances, when the source says


@dataclass(frozen=True)
class SeriesMatch:
    """A series of a study a source holds."""

    series_uid: str
    modality: str
    description: str
    number: str
    instances: int | None  # NumberOfSeriesRelatedInstances, when the source says


@dataclass
class RetrieveTally:
    """A retrieve as it goes: instances expected (when known), stored, failed and with warnings."""

    expected: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.warning


Progress = Callable[[RetrieveTally], None]


class QRSource(Protocol):
    """A query/retrieve source of any kind (DIMSE here, DICOMweb in ``dicomweb.retrieve``)."""

    name: str

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        """The studies that match (SourceError when the source cannot be asked)."""
        ...

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """The series of a study the source holds ([] when it does not hold the study)."""
        ...

    def retrieve(self, study_uid: str, series: Sequence[SeriesMatch], deadline: float,
                 progress: Progress | None = None) -> RetrieveTally:
        """Have the source hand over these series of the study (into the node's admission), until
        ``deadline`` (``time.monotonic()``) at the latest; how many instances came."""
        ...


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _count(ds: Dataset | None, keyword: str) -> int | None:
    try:
        value = ds.get(keyword) if ds is not None else None
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def study_identifier(query: StudyQuery) -> Dataset:
    """A STUDY level C-FIND identifier for ``query`` with the return keys the node reads."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = query.study_uid or ""
    ds.AccessionNumber = query.accession or ""
    ds.PatientID = query.patient_id or ""
    ds.StudyDate = query.date_range
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def series_identifier(study_uid: str) -> Dataset:
    """A SERIES level C-FIND identifier for one study's series, with the return keys the node reads."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.SeriesNumber = ""
    ds.SeriesDescription = ""
    ds.NumberOfSeriesRelatedInstances = ""
    return ds


def study_match(ds: Dataset) -> StudyMatch:
    modalities = tuple(m for m in _text(ds, "ModalitiesInStudy").split("\\") if m)
    return StudyMatch(_text(ds, "StudyInstanceUID"), _text(ds, "StudyDate"), _text(ds, "AccessionNumber"),
                      modalities, _count(ds, "NumberOfStudyRelatedInstances"))


def series_match(ds: Dataset) -> SeriesMatch:
    return SeriesMatch(_text(ds, "SeriesInstanceUID"), _text(ds, "Modality"), _text(ds, "SeriesDescription"),
                       _text(ds, "SeriesNumber"), _count(ds, "NumberOfSeriesRelatedInstances"))


def _status(response: Dataset | None) -> int | None:
    code = getattr(response, "Status", None)
    return int(code) if code is not None else None


class DimseSource:
    """A DIMSE query/retrieve SCP (``query_retrieve`` entry with ``ae_title``, ``host``, ``port``).
    ``admission`` takes what a C-GET brings (C-MOVE sends it to the node's storage SCP instead)."""

    def __init__(self, source: QueryRetrieveSource, calling_aet: str, timeout_s: float,
                 admission: Admission | None = None):
        if source.ae_title is None or source.host is None or source.port is None:
            raise ValueError(f"query_retrieve source {source.name} is not a DIMSE source")
        self.name = source.name
        self.settings = source
        self.ae_title, self.host, self.port = source.ae_title, source.host, source.port
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.admission = admission
        self.where = f"{source.name} ({self.ae_title}@{self.host}:{self.port})"

    # -- associations ------------------------------------------------------------------------------

    @contextmanager
    def _association(self, contexts: Sequence[str], retrieve_storage: bool = False,
                     handlers: Sequence[EventHandlerType] = ()) -> Iterator[Association]:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        for context in contexts:
            ae.add_requested_context(context)
        roles: list[SCP_SCU_RoleSelectionNegotiation] = []
        if retrieve_storage:  # C-GET: we are the storage SCP of its sub-operations
            for sop_class in RETRIEVED_STORAGE_CLASSES:
                ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
                roles.append(build_role(sop_class, scp_role=True))
        tls = self.settings.tls
        tls_args = (client_context(tls), self.host) if tls is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, ext_neg=[*roles], tls_args=tls_args,
                             evt_handlers=list(handlers))
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "no association (unreachable, or aborted)"
            raise SourceError(f"{self.where}: {why}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()

    # -- C-FIND ------------------------------------------------------------------------------------

    def _find(self, identifier: Dataset) -> list[Dataset]:
        found: list[Dataset] = []
        with self._association([StudyRootQueryRetrieveInformationModelFind]) as assoc:
            for status, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                code = _status(status)
                if code is None:
                    raise SourceError(f"{self.where}: C-FIND got no response (timed out or aborted)")
                if code in PENDING:
                    if match is not None:
                        found.append(match)
                    continue
                if code != 0x0000:
                    raise SourceError(f"{self.where}: C-FIND failed (status 0x{code:04X})")
        return found

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        """C-FIND at STUDY level (Study Root)."""
        return [m for m in (study_match(ds) for ds in self._find(study_identifier(query))) if m.study_uid]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """C-FIND at SERIES level (Study Root) for one study."""
        return [m for m in (series_match(ds) for ds in self._find(series_identifier(study_uid))) if m.series_uid]

    # -- C-MOVE / C-GET ----------------------------------------------------------------------------

    def retrieve(self, study_uid: str, series: Sequence[SeriesMatch], deadline: float,
                 progress: Progress | None = None) -> RetrieveTally:
        """One C-MOVE (to the node's own AE title) or C-GET per series, at SERIES level, on one
        association. A source still sending at ``deadline`` is asked to cancel (C-CANCEL) and left."""
        tally = RetrieveTally(expected=_sum([s.instances for s in series]))
        if not series:
            return tally
        get = self.settings.method is RetrieveMethod.C_GET
        if get and self.admission is None:
            raise ValueError("a C-GET needs the node's admission to take the instances")
        model = StudyRootQueryRetrieveInformationModelGet if get else StudyRootQueryRetrieveInformationModelMove
        batch = self.admission.batch(Source.RETRIEVE, self.ae_title) if get and self.admission is not None else None
        handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._store_handler(batch))] if get else []
        try:
            with self._association([model], retrieve_storage=get, handlers=handlers) as assoc:
                for number, one in enumerate(series, start=1):
                    done_before = tally.done
                    self._retrieve_series(assoc, model, number, study_uid, one.series_uid, deadline, tally, progress)
                    log.info("series retrieved", source=self.name, method=self.settings.method.value,
                             study_uid=study_uid, series_uid=one.series_uid, instances=tally.done - done_before)
        finally:
            if batch is not None:
                batch.close()
        return tally

    def _retrieve_series(self, assoc: Association, model: str, msg_id: int, study_uid: str, series_uid: str,
                         deadline: float, tally: RetrieveTally, progress: Progress | None) -> None:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = series_uid
        get = model == StudyRootQueryRetrieveInformationModelGet
        responses = (assoc.send_c_get(identifier, model, msg_id=msg_id) if get
                     else assoc.send_c_move(identifier, self.calling_aet, model, msg_id=msg_id))
        base = (tally.completed, tally.failed, tally.warning)
        cancelled = False
        for status, _ in responses:
            code = _status(status)
            if code is None:
                raise SourceError(f"{self.where}: {'C-GET' if get else 'C-MOVE'} got no response (timed out or "
                                  "aborted)")
            counts = [_count(status, f"NumberOf{kind}Suboperations") for kind in ("Completed", "Failed", "Warning")]
            tally.completed, tally.failed, tally.warning = (b + (c or 0) for b, c in zip(base, counts, strict=True))
            remaining = _count(status, "NumberOfRemainingSuboperations")
            if remaining is not None and code in PENDING:
                tally.expected = max(tally.expected or 0, tally.done + remaining)
            if progress is not None:
                progress(tally)
            if code in PENDING:
                if time.monotonic() > deadline and not cancelled:
                    assoc.send_c_cancel(msg_id, query_model=model)
                    cancelled = True
                continue
            if code == MOVE_DESTINATION_UNKNOWN:
                raise SourceError(f"{self.where}: C-MOVE refused: it does not know the move destination "
                                  f"{self.calling_aet} (add the node to the PACS's modalities)")
            if code == CANCELLED or cancelled:
                raise RetrieveTimeout(f"{self.where}: the retrieve took longer than allowed (retrieve.wait_s): "
                                      "cancelled")
            if code not in (0x0000, 0xB000):
                raise SourceError(f"{self.where}: {'C-GET' if get else 'C-MOVE'} failed (status 0x{code:04X})")

    def _store_handler(self, batch: Batch | None) -> Callable[[evt.Event], int]:
        """EVT_C_STORE of a C-GET's sub-operations: the node's one admission, as ``Source.RETRIEVE``."""
        admission = self.admission
        sender = self.ae_title

        def handle(event: evt.Event) -> int:
            if admission is None:
                return int(StoreStatus.PROCESSING_FAILURE)
            try:
                request = cast(C_STORE, event.request)  # EVT_C_STORE's request, as pynetdicom's own handlers cast it
                dataset = request.DataSet.getvalue() if request.DataSet is not None else b""
                candidate = Candidate.received(
                    dataset, event.context.transfer_syntax, str(request.AffectedSOPClassUID or ""),
                    str(request.AffectedSOPInstanceUID or ""), sender,
                    lambda: b"\0" * 128 + b"DICM" + encode_file_meta(event.file_meta), source=Source.RETRIEVE)
                return int(admission.admit(candidate, batch).status)
            except Exception as exc:  # noqa: BLE001 - a sub-operation that cannot be stored fails, not the node
                log.error("could not store a retrieved instance", source=self.name,
                          error=f"{type(exc).__name__}: {exc}")
                return int(StoreStatus.PROCESSING_FAILURE)

        return handle


def _sum(values: Sequence[int | None]) -> int | None:
    """The sum when every value is known, else None."""
    return None if any(v is None for v in values) else sum(v or 0 for v in values)
