"""The C-STORE response's command set encoded directly (``encode_store_response``), as pynetdicom's
``C_STORE_RSP`` encodes it byte for byte.

pynetdicom builds each response as a pydicom data set and encodes it twice (once for the group
length): about 0.3 ms of the receiving thread per image, under the interpreter lock. A plain
response (Message ID Being Responded To, the SOP Class and Instance UIDs, the status; no Offending
Element or Error Comment) is seven fixed elements in Implicit VR Little Endian (PS3.7 9.3.1.2,
E.1). Anything else is left to pynetdicom (``None``).
"""

from __future__ import annotations

import struct

from pynetdicom.dimse_primitives import C_STORE

__all__ = ["C_STORE_RSP_FIELD", "NO_DATA_SET", "encode_store_response"]

C_STORE_RSP_FIELD = 0x8001  # Command Field of a C-STORE response (PS3.7 E.1)
NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows


def _element(element: int, value: bytes) -> bytes:
    """One element of group 0000, Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_store_response(primitive: C_STORE) -> bytes | None:
    """The encoded command set of a plain C-STORE response, or None when it is not plain (pynetdicom
    encodes it then)."""
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if (message_id is None or status is None or not sop_class or not sop_instance
            or primitive.OffendingElement is not None or primitive.ErrorComment is not None):
        return None
    body = b"".join((
        _element(0x0002, _ui(str(sop_class))),
        _element(0x0100, _us(C_STORE_RSP_FIELD)),
        _element(0x0120, _us(int(message_id))),
        _element(0x0800, _us(NO_DATA_SET)),
        _element(0x0900, _us(int(status))),
        _element(0x1000, _ui(str(sop_instance))),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body
