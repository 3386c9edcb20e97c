"""dicom_node.dicom.responses: a plain C-STORE response encoded directly is byte for byte what
pynetdicom encodes; anything else is left to pynetdicom."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.dicom.responses import encode_store_response


def _response(message_id: int, status: int, sop_class: str, sop_instance: str) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def _pynetdicom(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    [pdata] = list(message.encode_msg(1, 0))
    [(_, pdv)] = pdata.presentation_data_value_list
    assert pdv[:1] == b"\x03"  # one command fragment, the last
    return pdv[1:]


@pytest.mark.parametrize(("message_id", "status", "sop_class", "sop_instance"), [
    (1, 0x0000, "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1"),  # MR, odd-length UID
    (65535, 0xA700, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5.6.7.8.9.10"),  # even-length UIDs, a refusal
    (0, 0xB000, "1.2.840.10008.5.1.4.1.1.4.1", "2.25.3391845843287546823498125472987" + "1" * 28),  # 64 characters
    (4242, 0xC000, "1.2.840.10008.5.1.4.1.1.88.22", "1.2"),
])
def test_plain_responses_are_pynetdicoms_bytes(message_id: int, status: int, sop_class: str,
                                               sop_instance: str) -> None:
    rsp = _response(message_id, status, sop_class, sop_instance)
    assert encode_store_response(rsp) == _pynetdicom(rsp)


def test_responses_with_more_are_left_to_pynetdicom() -> None:
    rsp = _response(1, 0xC000, "1.2.840.10008.5.1.4.1.1.4", "1.2.3")
    rsp.ErrorComment = "cannot be parsed"
    assert encode_store_response(rsp) is None
    no_uid = C_STORE()
    no_uid.MessageIDBeingRespondedTo, no_uid.Status = 3, 0xC000
    assert encode_store_response(no_uid) is None
