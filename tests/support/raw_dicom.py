"""A deliberately careless DICOM peer for the fuzz script and the hostile-input tests: C-STOREs
whose command set and data set bytes are whatever the caller says (pynetdicom checks neither
when they are set like this), and raw bytes on the port."""

from __future__ import annotations

import contextlib
import socket
import struct
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


# -- raw PDUs: an association spoken byte by byte, for requests pynetdicom would never send ---------

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07
A_RELEASE_RQ_PDU = struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(contexts: list[tuple[int, str, list[str]]], calling_aet: str = "FUZZ",
                 called_aet: str = "LUMBAR_AI") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing these (context ID, abstract syntax, transfer syntaxes), any
    IDs (0, even, repeated) as given."""
    body = struct.pack(">HH", 1, 0) + called_aet.encode().ljust(16) + calling_aet.encode().ljust(16) + b"\0" * 32
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433"))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV (control: 0x03 last command fragment, 0x02 last data set fragment)."""
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def command_set(**elements: object) -> bytes:
    """A command set (Implicit VR Little Endian, with its group length) of these elements by keyword."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, explicit=False)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def c_store_command(sop_class_uid: str, sop_instance_uid: str, omit: tuple[str, ...] = (),
                    message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set with the given elements left out (by keyword)."""
    elements = {"AffectedSOPClassUID": sop_class_uid, "CommandField": 0x0001, "MessageID": message_id,
                "Priority": 0, "CommandDataSetType": 0x0000, "AffectedSOPInstanceUID": sop_instance_uid}
    return command_set(**{k: v for k, v in elements.items() if k not in omit})


class RawAssociation:
    """A socket that speaks PDUs as given: associate, send P-DATA or anything, read what comes back."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send bytes; False if the connection is gone."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body); None when the connection closed or nothing came in time."""
        try:
            header = self._read(6)
            if header is None:
                return None
            kind, _, length = struct.unpack(">BBI", header)
            body = self._read(length)
            return None if body is None else (kind, body)
        except OSError:
            return None

    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def associate(self, contexts: list[tuple[int, str, list[str]]] | None = None, calling_aet: str = "FUZZ",
                  called_aet: str = "LUMBAR_AI") -> int | None:
        """Send an A-ASSOCIATE-RQ (by default Verification and MR storage); the answer's PDU type."""
        contexts = contexts or [(1, VERIFICATION, [IMPLICIT_LE]), (3, str(MRImageStorage), [EXPLICIT_LE])]
        self.send(associate_rq(contexts, calling_aet, called_aet))
        answer = self.read_pdu()
        return None if answer is None else answer[0]

    def response(self) -> tuple[int | None, str | None]:
        """Read PDUs until a DIMSE response: its Status (0000,0900) and Error Comment (0000,0902);
        (None, None) on an A-ABORT or a closed connection."""
        command = b""
        while (pdu := self.read_pdu()) is not None and pdu[0] == P_DATA_TF:
            body = pdu[1]
            while len(body) >= 6:
                length, control = struct.unpack(">I", body[:4])[0], body[5]
                command += body[6:4 + length] if control & 1 else b""
                body = body[4 + length:]
                if control & 3 == 3:
                    ds = dcmread_command(command)
                    comment = ds.get("ErrorComment")
                    return (int(ds.Status) if "Status" in ds else None), (None if comment is None else str(comment))
        return None, None


def dcmread_command(data: bytes) -> Dataset:
    """A command set's bytes as a data set (Implicit VR Little Endian)."""
    from pydicom.filereader import read_dataset

    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
