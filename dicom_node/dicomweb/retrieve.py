"""A DICOMweb query/retrieve source: QIDO-RS to find studies and series, WADO-RS to retrieve a
series instance by instance (streamed), through ``dicomweb-client``. Each retrieved instance is
written to the spool's staging area and offered to the node's one admission as
``Source.RETRIEVE`` (sender: the source's name), like any other way in."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.config import QueryRetrieveSource
from dicom_node.dicom import (
    Progress,
    RetrieveTally,
    RetrieveTimeout,
    SeriesMatch,
    SourceError,
    StudyMatch,
    StudyQuery,
    series_match,
    study_match,
)
from dicom_node.dicomweb.client import session_for
from dicom_node.ingest import Admission, Candidate, Source
from dicom_node.observability import get_logger

__all__ = ["DicomWebSource"]

log = get_logger(__name__)

STUDY_FIELDS = ("StudyDate", "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")


def _dataset(item: dict[str, Any]) -> Dataset:
    return Dataset.from_json(item)


class DicomWebSource:
    """A ``query_retrieve`` entry with ``dicomweb: {url, ...}``; ``admission`` takes what it retrieves."""

    def __init__(self, source: QueryRetrieveSource, timeout_s: float, admission: Admission | None = None):
        if source.dicomweb is None:
            raise ValueError(f"query_retrieve source {source.name} is not a DICOMweb source")
        self.name = source.name
        self.url = source.dicomweb.url.rstrip("/")
        self.admission = admission
        self.client = DICOMwebClient(self.url, session=session_for(source.dicomweb), timeout=timeout_s)
        self.where = f"{source.name} ({self.url})"

    def _ask(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise SourceError(f"{self.where}: {what} answered HTTP {code}") from None
        except (requests.RequestException, OSError) as exc:
            raise SourceError(f"{self.where}: {what} failed ({type(exc).__name__})") from None
        except ValueError as exc:  # a body that is not DICOM JSON / multipart
            raise SourceError(f"{self.where}: {what} answered something unreadable ({exc})") from None

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        """QIDO-RS: search for studies."""
        filters = {key: value for key, value in (("StudyInstanceUID", query.study_uid),
                                                 ("AccessionNumber", query.accession),
                                                 ("PatientID", query.patient_id),
                                                 ("StudyDate", query.date_range or None)) if value}
        found = self._ask("QIDO-RS (studies)", self.client.search_for_studies, search_filters=filters,
                          fields=list(STUDY_FIELDS))
        return [m for m in (study_match(_dataset(item)) for item in found or []) if m.study_uid]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """QIDO-RS: search for the series of one study."""
        found = self._ask("QIDO-RS (series)", self.client.search_for_series, study_instance_uid=study_uid,
                          fields=list(SERIES_FIELDS))
        return [m for m in (series_match(_dataset(item)) for item in found or []) if m.series_uid]

    def retrieve(self, study_uid: str, series: Sequence[SeriesMatch], deadline: float,
                 progress: Progress | None = None) -> RetrieveTally:
        """WADO-RS, series by series, instance by instance (streamed), each admitted as it comes;
        past ``deadline`` the retrieve stops (SourceError)."""
        if self.admission is None:
            raise ValueError("a WADO-RS retrieve needs the node's admission to take the instances")
        admission = self.admission
        known = [s.instances for s in series]
        tally = RetrieveTally(expected=None if any(n is None for n in known) else sum(n or 0 for n in known))
        batch = admission.batch(Source.RETRIEVE, self.name)
        try:
            with admission.staging.area() as area:
                for one in series:
                    instances = self._ask("WADO-RS", self.client.iter_series, study_uid, one.series_uid)
                    while True:
                        ds = self._ask("WADO-RS", next, instances, None)
                        if ds is None:
                            break
                        path, fp = area.new_file("dcm")
                        with fp:
                            dcmwrite(fp, ds, enforce_file_format=True)
                        del ds
                        verdict = admission.admit(Candidate.staged(path, Source.RETRIEVE, self.name), batch)
                        path.unlink(missing_ok=True)  # left when refused
                        if verdict.admitted:
                            tally.completed += 1
                        else:
                            tally.failed += 1
                        if progress is not None:
                            progress(tally)
                        if time.monotonic() > deadline:
                            raise RetrieveTimeout(f"{self.where}: the retrieve took longer than allowed "
                                              "(retrieve.wait_s): stopped")
                    log.info("series retrieved", source=self.name, method="wado-rs", study_uid=study_uid,
                             series_uid=one.series_uid)
        finally:
            batch.close()
        return tally
