"""Query/retrieve for the pipeline: completing a study that arrived without a series it needs, and
fetching a whole study on request (``lumbar-node fetch``, the web page's fetch form).

A study about to be released that lacks Sagittal T1, Sagittal T2/STIR or Axial T2 (by its series'
headers, ``inference.series``) is asked about once (the ledger records it, so a restart does not ask
again): the source that sent it first (its calling AE title, or a DICOMweb source's name), else
each ``query_retrieve`` source in turn, is asked for the study's series (C-FIND / QIDO-RS), and
the MR series the node does not hold are retrieved (C-MOVE, C-GET or WADO-RS) within
``retrieve.wait_s``. What is still missing is then "not sent and not found on the PACS".
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import pydicom

from dicom_node.config import QueryRetrieveSource, RetrieveMethod, Settings
from dicom_node.dicom import (
    DimseSource,
    QRSource,
    RetrieveTally,
    RetrieveTimeout,
    SeriesMatch,
    SourceError,
    StudyQuery,
)
from dicom_node.dicomweb import DicomWebSource
from dicom_node.errors import NodeError
from dicom_node.ingest import Admission
from dicom_node.observability import get_logger
from dicom_node.pipeline.audit import audit
from dicom_node.pipeline.eligibility import LUMBAR_BODY_PARTS
from dicom_node.states import EventKind
from dicom_node.store import Ledger, PacsAnswer, PacsQuery
from inference.instances import is_mr
from inference.labels import SeriesRole
from inference.series import group_series, role_of

__all__ = ["NOT_ON_PACS", "FetchError", "FetchJob", "FetchJobs", "FetchState", "FetchedStudy", "Fetcher",
           "MissingAnswer", "missing_note"]

log = get_logger(__name__)

#: The reason a needed series the node asked for is still missing (appended to the label's reason).
NOT_ON_PACS = "not sent and not found on the PACS"
#: Modalities of the series worth retrieving: MR images (or a source that does not say).
RETRIEVED_MODALITIES = frozenset({"MR", ""})
MIN_SERIES_IMAGES = 3  # assign_roles' own minimum: a series of fewer images serves no role


class FetchError(NodeError, RuntimeError):
    """No source holds what was asked for, or none could be asked; the message says why."""


def missing_note(query: PacsQuery | None) -> str | None:
    """What a missing series' reason adds, once the node asked the PACS about the study (None: not asked)."""
    if query is None:
        return None
    if query.outcome is PacsAnswer.UNREACHABLE:
        return f"{NOT_ON_PACS} (no source could be asked)"
    if query.outcome is PacsAnswer.TIMED_OUT:
        return f"{NOT_ON_PACS} (the retrieve did not finish in time)"
    if query.outcome is PacsAnswer.FAILED:
        return f"{NOT_ON_PACS} (the retrieve failed)"
    if query.outcome is PacsAnswer.ASKING:
        return f"{NOT_ON_PACS} (the node stopped while asking)"
    return NOT_ON_PACS


@dataclass(frozen=True)
class MissingAnswer:
    """What asking the sources about a study's missing series came to (for the ledger and the audit trail)."""

    outcome: PacsAnswer
    source: str | None
    detail: str
    retrieved: int = 0


@dataclass
class FetchedStudy:
    """One study a fetch found, and what its retrieve came to."""

    study_uid: str
    source: str
    series: int = 0  # series retrieved
    tally: RetrieveTally = field(default_factory=RetrieveTally)
    error: str | None = None
    new: bool = True  # the node did not hold every instance before

    @property
    def retrieved(self) -> int:
        """Instances stored so far."""
        return self.tally.completed

    @property
    def expected(self) -> int | None:
        """Instances to come in all, when the source said."""
        return self.tally.expected


FetchProgress = Callable[[str, RetrieveTally], None]  # (study UID, its tally so far)


class Fetcher:
    """Opens the configured sources and runs queries and retrieves for the pipeline and the command line."""

    def __init__(self, settings: Settings, ledger: Ledger, admission: Admission | None):
        self.settings = settings
        self.ledger = ledger
        self.admission = admission
        self.sources = list(settings.query_retrieve)

    # -- sources -----------------------------------------------------------------------------------

    def open(self, source: QueryRetrieveSource) -> QRSource:
        """A client for one configured source."""
        timeout = self.settings.retrieve.timeout_s
        if source.dicomweb is not None:
            return DicomWebSource(source, timeout, self.admission)
        return DimseSource(source, self.settings.node.ae_title, timeout, self.admission)

    def in_order(self, senders: list[str]) -> list[QueryRetrieveSource]:
        """The sources to ask about a study: those that sent it (by AE title or name), then the others."""
        def sent(source: QueryRetrieveSource) -> bool:
            return source.ae_title in senders or source.name in senders
        return [s for s in self.sources if sent(s)] + [s for s in self.sources if not sent(s)]

    def named(self, name: str | None) -> list[QueryRetrieveSource]:
        """The source called ``name`` (FetchError if none is), or every source when None."""
        if name is None:
            return self.sources
        chosen = [s for s in self.sources if s.name == name]
        if not chosen:
            raise FetchError(f"no query_retrieve source is called {name!r} "
                             f"(configured: {', '.join(s.name for s in self.sources) or 'none'})")
        return chosen

    # -- a study's missing series ------------------------------------------------------------------

    def missing_roles(self, study_uid: str) -> set[SeriesRole]:
        """The needed roles a held study lacks, by one header of each of its series; empty when it
        lacks none, or when it is no candidate (not MR, not a lumbar spine, no needed series at all)."""
        headers: list[tuple[pydicom.Dataset, None]] = []
        for series in self.ledger.series_counts(study_uid):
            if series.received < MIN_SERIES_IMAGES:  # too few images to serve its role (inference.series)
                continue
            try:
                headers.append((pydicom.dcmread(series.a_file, stop_before_pixels=True), None))
            except Exception:  # noqa: BLE001 - an unreadable file: the grading says so, not this check
                continue
        mr = [(ds, p) for ds, p in headers if is_mr(ds)]
        parts = {str(ds.get("BodyPartExamined", "")).upper() for ds, _ in mr} - {""}
        if not mr or (parts and not LUMBAR_BODY_PARTS.intersection(parts)):
            return set()
        present = {role_of(s) for s in group_series(mr)} - {None}
        return set(SeriesRole) - present if present else set()

    def complete(self, study_uid: str, missing: set[SeriesRole]) -> MissingAnswer:
        """Ask the sources (the sender first) for the study's series and retrieve the MR series the
        node does not hold, within ``retrieve.wait_s``. Never raises."""
        deadline = time.monotonic() + self.settings.retrieve.wait_s
        errors: list[str] = []
        lacking = ", ".join(sorted(r.value for r in missing))
        for source in self.in_order(self.ledger.study_senders(study_uid)):
            if time.monotonic() > deadline:
                errors.append("no time left to ask the next source (retrieve.wait_s)")
                break
            try:
                client = self.open(source)
                series = client.find_series(study_uid)
                if not series:
                    errors.append(f"{source.name}: does not hold the study")
                    continue
                wanted = self._wanted(study_uid, series)
                if not wanted:
                    return MissingAnswer(PacsAnswer.NOTHING_MORE, source.name,
                                         f"lacked {lacking}; {source.name} holds {len(series)} series, none that "
                                         "the node lacks")
                tally = client.retrieve(study_uid, wanted, deadline)
                if tally.failed and not tally.completed:
                    hint = (" (a C-MOVE: does the PACS know the node as a move destination, and is it in "
                            "node.allowed_peers?)" if source.dicomweb is None and source.method is RetrieveMethod.C_MOVE
                            else "")
                    return MissingAnswer(PacsAnswer.FAILED, source.name,
                                         f"lacked {lacking}; {source.name} listed {len(wanted)} series, and none of "
                                         f"their {tally.failed} instances could be stored{hint}")
                return MissingAnswer(PacsAnswer.RETRIEVED, source.name,
                                     f"lacked {lacking}; retrieved {len(wanted)} series ({tally.completed} instances"
                                     f"{f', {tally.failed} failed' if tally.failed else ''}) from {source.name}",
                                     tally.completed)
            except RetrieveTimeout as exc:
                return MissingAnswer(PacsAnswer.TIMED_OUT, source.name, f"lacked {lacking}; {exc}")
            except SourceError as exc:
                errors.append(str(exc))
            except Exception as exc:  # a source that fails in any way is one that could not be asked
                log.exception("asking a query/retrieve source failed", source=source.name, study_uid=study_uid)
                errors.append(f"{source.name}: {type(exc).__name__}: {exc}")
        reached = [e for e in errors if "does not hold the study" in e]
        outcome = PacsAnswer.NOT_FOUND if reached else PacsAnswer.UNREACHABLE
        return MissingAnswer(outcome, None, f"lacked {lacking}; " + "; ".join(errors or ["no source configured"]))

    def _wanted(self, study_uid: str, series: list[SeriesMatch]) -> list[SeriesMatch]:
        """The MR series of a source's study that the node does not hold, or holds fewer instances
        of than the source says it has."""
        held = {c.series_uid: c.received for c in self.ledger.series_counts(study_uid)}

        def lacking(s: SeriesMatch) -> bool:
            return s.series_uid not in held or (s.instances is not None and held[s.series_uid] < s.instances)

        return [s for s in series if s.modality.upper() in RETRIEVED_MODALITIES and lacking(s)]

    # -- fetching whole studies --------------------------------------------------------------------

    def fetch(self, query: StudyQuery, actor: str, source_name: str | None = None,
              progress: FetchProgress | None = None,
              found: Callable[[list[FetchedStudy]], None] | None = None) -> list[FetchedStudy]:
        """Find the studies matching ``query`` (the first source that holds any), and retrieve the
        MR series of each that the node does not hold (C-MOVE: into the node's storage SCP, so a
        node must be listening; C-GET and WADO-RS: through this process's admission). Each study
        is recorded as asked (the node does not ask again for its missing series) and audited.
        FetchError when no source holds a match or none could be asked."""
        errors: list[str] = []
        for source in self.named(source_name):
            try:
                client = self.open(source)
                matches = client.find_studies(query)
            except SourceError as exc:
                errors.append(str(exc))
                continue
            if not matches:
                errors.append(f"{source.name}: no study matches")
                continue
            log.info("studies found on the PACS", source=source.name, studies=len(matches))
            studies = [FetchedStudy(m.study_uid, source.name) for m in matches]
            if found is not None:
                found(studies)
            for study in studies:
                self._fetch_study(client, study, actor, progress)
            return studies
        raise FetchError(f"{query.describe()} not found: " + "; ".join(errors or ["no query_retrieve source"]))

    def _fetch_study(self, client: QRSource, study: FetchedStudy, actor: str, progress: FetchProgress | None) -> None:
        uid = study.study_uid
        deadline = time.monotonic() + self.settings.retrieve.wait_s
        try:
            wanted = self._wanted(uid, client.find_series(uid))
            study.new = bool(wanted)
            study.series = len(wanted)
            self.ledger.ask_pacs(uid)
            study.tally = client.retrieve(uid, wanted, deadline,
                                          (lambda tally: progress(uid, tally)) if progress is not None else None)
            answer = PacsAnswer.RETRIEVED if wanted else PacsAnswer.NOTHING_MORE
            detail = (f"fetched {len(wanted)} series ({study.tally.completed} instances) from {client.name}, "
                      f"requested by {actor}" if wanted else
                      f"requested by {actor}: the node already holds every MR series {client.name} has")
            self.ledger.pacs_answered(uid, answer, client.name, detail)
            audit(self.ledger, EventKind.FETCHED, uid, detail,
                  {"source": client.name, "series": len(wanted), "instances": study.tally.completed,
                   "failed": study.tally.failed}, actor=actor)
        except SourceError as exc:
            study.error = str(exc)
            self.ledger.pacs_answered(uid, PacsAnswer.TIMED_OUT if isinstance(exc, RetrieveTimeout)
                                      else PacsAnswer.UNREACHABLE, client.name, str(exc))
            audit(self.ledger, EventKind.FETCHED, uid, f"requested by {actor}: {exc}",
                  {"source": client.name, "error": str(exc)}, actor=actor)
            log.warning("fetching a study failed", source=client.name, study_uid=uid, error=str(exc))


class FetchState(StrEnum):
    """Where a fetch requested on the web page stands."""

    FINDING = "finding"
    RETRIEVING = "retrieving"
    DONE = "done"
    FAILED = "failed"


@dataclass
class FetchJob:
    """A fetch requested on the web page, as it goes (read by the page while it runs)."""

    id: int
    query: str
    actor: str
    started_at: float
    state: FetchState = FetchState.FINDING
    detail: str = ""
    studies: list[FetchedStudy] = field(default_factory=list)
    finished_at: float | None = None


class FetchJobs:
    """Fetches requested on the web page, each in a thread of its own; the newest ``keep`` are
    remembered for the page. Each study retrieved is handed to ``fetched`` (the node releases it at
    once, without the quiet time)."""

    def __init__(self, fetcher: Fetcher, fetched: Callable[[str], None], keep: int = 20):
        self.fetcher = fetcher
        self.fetched = fetched
        self.keep = keep
        self._jobs: list[FetchJob] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def start(self, query: StudyQuery, actor: str) -> FetchJob:
        """Start fetching ``query`` for ``actor``; the job, updated as it goes."""
        job = FetchJob(next(self._ids), query.describe(), actor, time.time())
        with self._lock:
            self._jobs = [job, *self._jobs][: self.keep]
        threading.Thread(target=self._run, args=(job, query), name=f"fetch-{job.id}", daemon=True).start()
        return job

    def jobs(self) -> list[FetchJob]:
        """The remembered jobs, newest first."""
        with self._lock:
            return list(self._jobs)

    def _run(self, job: FetchJob, query: StudyQuery) -> None:
        def found(studies: list[FetchedStudy]) -> None:
            job.studies = studies
            job.state = FetchState.RETRIEVING

        try:
            studies = self.fetcher.fetch(query, job.actor, found=found)
            for study in studies:
                if study.error is None and study.tally.completed:
                    self.fetched(study.study_uid)  # graded now, without the quiet time
            failed = [s for s in studies if s.error is not None]
            job.state = FetchState.FAILED if len(failed) == len(studies) else FetchState.DONE
            job.detail = "; ".join(s.error or "" for s in failed) or (
                f"{len(studies)} {'study' if len(studies) == 1 else 'studies'} retrieved: graded by the node")
        except FetchError as exc:
            job.state, job.detail = FetchState.FAILED, str(exc)
        except Exception as exc:  # a failed fetch is shown on the page, the node goes on
            log.exception("a fetch failed", job=job.id)
            job.state, job.detail = FetchState.FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = time.time()
