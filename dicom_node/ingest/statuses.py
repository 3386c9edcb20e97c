"""The C-STORE statuses an admission answers with, by name (PS3.4 Table B.2-1 and the general ones of
PS3.7 Annex C), whatever brought the instance: C-STORE sends them back as they are, the upload
turns them into its messages, STOW-RS into its failure reasons.

pynetdicom names only a few statuses (``pynetdicom.status.Status``: SUCCESS, PENDING, ...); the
Storage Service Class statuses the node answers and accepts are named here, with the meanings of
``pynetdicom.status.STORAGE_SERVICE_CLASS_STATUS`` (a unit test checks they agree).
"""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import Status

__all__ = ["StoreStatus"]


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1 and the general ones of PS3.7 Annex C)."""

    SUCCESS = Status.SUCCESS
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
