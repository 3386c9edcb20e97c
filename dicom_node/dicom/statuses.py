"""DICOM status codes and association reject reasons by name (PS3.4 Annex B, PS3.8 9.3.4): the
C-STORE statuses are the admission's (``dicom_node.ingest.StoreStatus``, every way in answers
with them), the association's reject reasons are here."""

from __future__ import annotations

from enum import IntEnum

from dicom_node.ingest import StoreStatus

__all__ = ["STORED", "ProviderRejectReason", "RejectReason", "RejectResult", "RejectSource", "StoreStatus"]


#: The statuses that mean "stored" to a sender: success, and the warnings.
STORED = frozenset({StoreStatus.SUCCESS, StoreStatus.COERCION_OF_DATA_ELEMENTS, StoreStatus.ELEMENTS_DISCARDED,
                    StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS})


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
