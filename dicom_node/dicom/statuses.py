"""DICOM status codes and association reject reasons by name (PS3.4 Annex B, PS3.8 9.3.4): the
C-STORE statuses are the admission's (``dicom_node.ingest.StoreStatus``, every way in answers
with them), the association's reject reasons are here. Which statuses mean "stored" is
pynetdicom's call (``code_to_category``)."""

from __future__ import annotations

from collections.abc import Container
from enum import IntEnum

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_node.ingest import StoreStatus

__all__ = ["STORED", "AbortReason", "ProviderRejectReason", "RejectReason", "RejectResult", "RejectSource",
           "StoreStatus"]


def is_stored(status: int) -> bool:
    """Whether a C-STORE response status means "stored" to a sender: success, or a warning
    (PS3.7 C.4: the instance was stored, maybe coerced); pynetdicom's categories."""
    return isinstance(status, int) and status >= 0 and code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


class _Stored(Container[int]):
    """``status in STORED``: ``is_stored`` as a container."""

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and is_stored(status)


#: The statuses that mean "stored" to a sender (``is_stored``): success, and the warnings.
STORED: Container[int] = _Stored()


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service user."""

    NO_REASON = 0x01
    APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
    CALLING_AE_NOT_RECOGNISED = 0x03
    CALLED_AE_NOT_RECOGNISED = 0x07


class ProviderRejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service provider (presentation)."""

    TEMPORARY_CONGESTION = 0x01
    LOCAL_LIMIT_EXCEEDED = 0x02


class AbortReason(IntEnum):
    """A-ABORT Reason/Diag. when the source is the service provider (PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER_VALUE = 0x06
