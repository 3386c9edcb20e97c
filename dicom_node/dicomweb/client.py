"""Storing result files (SR, SC, PDF, whatever the run folder delivers) on a DICOMweb origin server
by STOW-RS, with ``dicomweb-client`` (the highdicom authors' client): HTTP Basic or a bearer token,
TLS verified against the system's CAs or ``ca_certificates``, one timeout per request. dicomweb-client's own
retries are off: the retry schedule is the pipeline's (``pipeline.delivery``), the same as for C-STORE."""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.config import DicomWebDestination, DicomWebService
from dicom_node.errors import NodeError

__all__ = ["StowClientError", "store_files"]

_FAILURE = "FailedSOPSequence"


class StowClientError(NodeError, RuntimeError):
    """A DICOMweb destination did not store every file; the message says why (for the ledger and
    the log; it never holds the credentials)."""


def session_for(service: DicomWebService) -> requests.Session:
    """A requests session for a DICOMweb service as configured: its credentials and TLS checks,
    nothing from the environment (destinations and query/retrieve sources alike)."""
    session = requests.Session()
    session.trust_env = False  # no proxy or netrc from the environment: what the configuration says, only
    if service.username is not None and service.password is not None:
        session.auth = (service.username, service.password)
    elif service.token is not None:
        session.headers["Authorization"] = f"Bearer {service.token}"
    session.verify = str(service.ca_certificates) if service.ca_certificates is not None else service.verify
    return session


def store_files(destination: DicomWebDestination, paths: list[Path], timeout: float = 30.0) -> None:
    """STOW-RS every file to ``destination`` in one request; StowClientError unless the server
    stored them all (an HTTP error, a Failed SOP Sequence, or an instance its answer does not list)."""
    where = destination.where
    datasets = [pydicom.dcmread(p) for p in paths]
    with session_for(destination.dicomweb) as session:
        client = DICOMwebClient(destination.dicomweb.url, session=session, timeout=timeout)
        client.set_http_retry_params(retry=False)
        try:
            answer: Dataset = client.store_instances(datasets)
        except requests.exceptions.SSLError as exc:
            raise StowClientError(f"{where}: the TLS handshake failed (certificate not trusted?): "
                                  f"{_reason(exc)}") from None
        except requests.exceptions.Timeout:
            raise StowClientError(f"{where}: no answer within {timeout:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            raise StowClientError(f"{where}: unreachable: {_reason(exc)}") from None
        except requests.exceptions.HTTPError as exc:
            response = exc.response
            status = f"HTTP {response.status_code} {response.reason}" if response is not None else str(exc)
            raise StowClientError(f"{where}: {status}{_failures(response)}") from None
        except (requests.exceptions.RequestException, ValueError) as exc:  # a malformed answer
            raise StowClientError(f"{where}: {type(exc).__name__}: {_reason(exc)}") from None
    failed = [str(item.get("ReferencedSOPInstanceUID", "?")) + f" (0x{int(item.get('FailureReason', 0)):04X})"
              for item in answer.get(_FAILURE, [])]
    if failed:
        raise StowClientError(f"{where}: {len(failed)} of {len(paths)} not stored: {', '.join(failed[:5])}")
    if "ReferencedSOPSequence" in answer:  # an answer that lists what it stored must list them all
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.ReferencedSOPSequence}
        missing = [str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) not in stored]
        if missing:
            raise StowClientError(f"{where}: {len(missing)} of {len(paths)} not listed as stored")


def _reason(exc: BaseException) -> str:
    """The innermost reason of a requests error, short (never the request's headers)."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    return (str(inner) or type(inner).__name__)[:300]


def _failures(response: requests.Response | None) -> str:
    """The Failed SOP Sequence of an error answer, as '; N failed (0xCODE, ...)', or ''."""
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return ""
    try:
        answer = Dataset.from_json(response.content)
        codes = sorted({f"0x{int(item.FailureReason):04X}" for item in answer.get(_FAILURE, [])})
        count = len(answer.get(_FAILURE, []))
    except Exception:  # noqa: BLE001 - an unreadable body adds nothing to the message
        return ""
    return f"; {count} failed ({', '.join(codes)})" if count else ""
