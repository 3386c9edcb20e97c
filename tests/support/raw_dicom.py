"""A deliberately careless DICOM peer for the fuzz script and the hostile-input tests: C-STOREs
whose command set and data set bytes are whatever the caller says (pynetdicom checks neither
when they are set like this), and raw bytes on the port."""

from __future__ import annotations

import socket
import time
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification


def encode(ds: Dataset, explicit: bool = True) -> bytes:
    """A data set as the bytes of a C-STORE (no file meta), Explicit VR Little Endian."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, not explicit
    write_dataset(buf, ds)
    return buf.getvalue()


def raw_store(port: int, data: bytes, sop_instance_uid: str, sop_class_uid: str = MRImageStorage,
              transfer_syntax: str = ExplicitVRLittleEndian, calling_aet: str = "FUZZ",
              called_aet: str = "LUMBAR_AI", timeout: float = 20.0) -> int | None:
    """One C-STORE of ``data`` (an encoded data set, any bytes) with this Affected SOP Instance UID
    (any string); the response status, or None when none came."""
    ae = AE(calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class_uid, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return None
    try:
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = sop_class_uid
        request._affected_sop_instance_uid = UID(sop_instance_uid)  # as given: no validation on the way out
        request.Priority = 2
        request.DataSet = BytesIO(data)
        assoc._reactor_checkpoint.clear()  # as send_c_store does: the response is ours to read
        try:
            assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        return None if response is None or response.Status is None else int(response.Status)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def echo(port: int, calling_aet: str = "FUZZ", called_aet: str = "LUMBAR_AI", timeout: float = 20.0) -> bool:
    """Whether the node answers a C-ECHO with Success."""
    ae = AE(calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def raw_bytes(port: int, chunks: list[bytes], hold_s: float = 0.0, timeout: float = 5.0) -> bytes:
    """Connect, send these chunks, keep the connection ``hold_s``, read what comes back, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        time.sleep(hold_s)
        try:
            return sock.recv(65536)
        except OSError:
            return b""
