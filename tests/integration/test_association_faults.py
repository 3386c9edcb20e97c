"""The storage SCP against connections that end every way a fuzz run found (raw PDUs, careless
peers): each request answered (an association accept/reject/abort, a C-STORE response or an
A-ABORT), each association slot handed back, and then real DCMTK peers served."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from demo.orthanc import free_port, storescu
from dicom_node.config import load_settings
from dicom_node.dicom.scp import StorageSCP
from dicom_node.store.ledger import Ledger
from tests.support.raw_dicom import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_RELEASE_RQ_PDU,
    EXPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    associate_rq,
    c_store_command,
    command_set,
    encode,
    p_data,
)
from tests.support.served_node import wait_for

CALLING = "FUZZ"
MR = "1.2.840.10008.5.1.4.1.1.4"
STORE_CONTEXT = 3  # RawAssociation.associate() proposes Verification as 1, MR storage as 3


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    environ = {"LUMBAR_NODE__NODE__PORT": str(free_port()), "LUMBAR_NODE__NODE__BIND_ADDRESS": "127.0.0.1",
               "LUMBAR_NODE__NODE__ALLOWED_PEERS": f"[{{ae_title: {CALLING}}}]",
               "LUMBAR_NODE__LIMITS__ACSE_TIMEOUT_S": "5", "LUMBAR_NODE__LIMITS__SOCKET_TIMEOUT_S": "5",
               "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
               "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(tmp_path / "ledger.sqlite")}
    settings = load_settings(environ=environ)
    ledger = Ledger(settings.storage.ledger_path)
    node = StorageSCP(settings, ledger)
    node.start()
    yield node
    node.stop()
    ledger.close()


def _instance() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    return ds


# -- the ways a connection can end -------------------------------------------------------------------

def _unnegotiated_context(a: RawAssociation) -> int | None:
    a.send(p_data(77, 0x03, b"\x00\x00\x00\x00\x04\x00\x00\x00\x30\x00"))  # 10 bytes of a C-ECHO, context 77
    return _next(a)


def _garbage_command_set(a: RawAssociation) -> int | None:
    a.send(p_data(1, 0x03, b"\x01\x02 not a command set at all"))
    return _next(a)


def _two_release_requests(a: RawAssociation) -> int | None:
    a.send(A_RELEASE_RQ_PDU + A_RELEASE_RQ_PDU)
    return _next(a)


def _no_command_data_set_type(a: RawAssociation) -> int | None:
    ds = _instance()
    a.send(p_data(STORE_CONTEXT, 0x03, c_store_command(MR, ds.SOPInstanceUID, omit=("CommandDataSetType",))))
    a.send(p_data(STORE_CONTEXT, 0x02, encode(ds)))
    return _next(a)


def _unknown_command_field(a: RawAssociation) -> int | None:
    a.send(p_data(1, 0x03, command_set(CommandField=0x0ABC, MessageID=1, CommandDataSetType=0x0101)))
    return _next(a)


def _closed_mid_data_set(a: RawAssociation) -> int | None:
    ds = _instance()
    a.send(p_data(STORE_CONTEXT, 0x03, c_store_command(MR, ds.SOPInstanceUID)))
    data = p_data(STORE_CONTEXT, 0x02, encode(ds))
    a.send(data[: len(data) // 2])
    return None  # the socket is closed by the caller


def _half_a_pdu_header(a: RawAssociation) -> int | None:
    a.send(struct.pack(">BB", 0x04, 0))
    return None


def _abort_pdu(a: RawAssociation) -> int | None:
    a.send(struct.pack(">BBI", 0x07, 0, 4) + b"\x00\x00\x00\x00")
    return None


def _next(a: RawAssociation) -> int | None:
    pdu = a.read_pdu()
    return None if pdu is None else pdu[0]


# (what the peer does, the PDU the node must answer with: None = the peer closes first)
ENDINGS: dict[str, tuple[Callable[[RawAssociation], int | None], int | None]] = {
    "P-DATA on an unnegotiated context": (_unnegotiated_context, A_ABORT),
    "a command set that cannot be decoded": (_garbage_command_set, A_ABORT),
    "two A-RELEASE-RQ in a row": (_two_release_requests, None),  # A-RELEASE-RP or A-ABORT: either ends it
    "a C-STORE without CommandDataSetType": (_no_command_data_set_type, A_ABORT),
    "an unknown Command Field": (_unknown_command_field, A_ABORT),
    "closed half-way through a data set": (_closed_mid_data_set, None),
    "half a PDU header, then closed": (_half_a_pdu_header, None),
    "the peer's A-ABORT": (_abort_pdu, None),
}


def _echoscu(scp: StorageSCP) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/echoscu", "-aet", CALLING, "-aec", scp.settings.node.ae_title, "127.0.0.1",
                           str(scp.settings.node.port)], capture_output=True, text=True, timeout=60)


def _slots_free(scp: StorageSCP) -> bool:
    return sum(scp.peers.slots.counts().values()) == 0


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_way_a_connection_ends_hands_its_slot_back_and_a_real_peer_is_served(
        scp: StorageSCP, ending: str) -> None:
    act, answer = ENDINGS[ending]
    per_address = scp.settings.limits.max_associations_per_address
    for _ in range(per_address + 2):  # more than the per-address limit: a leak would lock the address out
        with RawAssociation(scp.settings.node.port) as a:
            assert a.associate(calling_aet=CALLING) == A_ASSOCIATE_AC
            got = act(a)
            if answer is not None:
                assert got == answer, f"{ending}: answered {got}"
    wait_for(lambda: f"the slots to be free: {scp.peers.slots.counts()}", lambda: _slots_free(scp), timeout=20)
    echo = _echoscu(scp)
    assert echo.returncode == 0, echo.stdout + echo.stderr


def test_after_every_kind_of_bad_connection_the_counts_are_zero_and_storescu_stores(
        scp: StorageSCP, tmp_path: Path) -> None:
    for act, _ in ENDINGS.values():
        with RawAssociation(scp.settings.node.port) as a:
            a.associate(calling_aet=CALLING)
            act(a)
    with RawAssociation(scp.settings.node.port) as a:  # associated, then nothing: the socket is just closed
        a.associate(calling_aet=CALLING)
    wait_for(lambda: f"the slots to be free: {scp.peers.slots.counts()}", lambda: _slots_free(scp), timeout=20)
    wait_for("the association threads to end", lambda: not scp.server.active_associations, timeout=20)
    ds = _instance()
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    sent = storescu([path], scp.settings.node.port, called=scp.settings.node.ae_title, calling=CALLING)
    assert sent.returncode == 0, sent.stderr[-1500:]
    assert scp.ledger.studies()[0].instances == 1


@pytest.mark.parametrize("contexts", [
    [(0, VERIFICATION, [EXPLICIT_LE])],  # context ID 0
    [(2, VERIFICATION, [EXPLICIT_LE])],  # an even ID
    [(1, VERIFICATION, [])],  # no transfer syntax
    [(1, "x" * 64, ["y" * 70])],  # UIDs that are not UIDs
    [],  # no presentation context at all
    [(1, VERIFICATION, [EXPLICIT_LE]), (1, VERIFICATION, [EXPLICIT_LE])],  # one ID twice
], ids=["id-0", "id-even", "no-syntax", "bad-uids", "none", "id-twice"])
def test_every_association_request_is_answered(scp: StorageSCP, contexts: list[tuple[int, str, list[str]]]) -> None:
    started = time.monotonic()
    with RawAssociation(scp.settings.node.port) as a:
        a.send(associate_rq(contexts, CALLING, scp.settings.node.ae_title))
        answer = a.read_pdu()
    assert answer is not None and answer[0] in (0x02, 0x03, 0x07), answer  # accept, reject or abort
    assert time.monotonic() - started < 5
    wait_for("the association threads to end", lambda: not scp.server.active_associations, timeout=10)
    assert _echoscu(scp).returncode == 0


@pytest.mark.parametrize("missing", ["MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                                     "CommandDataSetType", "CommandField", "Priority"])
def test_a_c_store_missing_a_command_element_gets_a_response_or_an_abort_and_a_log_line(
        scp: StorageSCP, missing: str, capfd: pytest.CaptureFixture[str]) -> None:
    ds = _instance()
    with RawAssociation(scp.settings.node.port) as a:
        assert a.associate(calling_aet=CALLING) == A_ASSOCIATE_AC
        a.send(p_data(STORE_CONTEXT, 0x03, c_store_command(MR, ds.SOPInstanceUID, omit=(missing,))))
        a.send(p_data(STORE_CONTEXT, 0x02, encode(ds)))
        status, comment = a.response()
    wait_for("the association threads to end", lambda: not scp.server.active_associations, timeout=10)
    log = capfd.readouterr()
    lines = log.out + log.err
    if missing == "Priority":  # optional for the node: pynetdicom takes it as MEDIUM
        assert status == 0x0000
    elif missing in ("CommandDataSetType", "CommandField"):  # the message cannot be read: A-ABORT
        assert status is None and "aborted an association: a protocol error" in lines
    else:
        assert status == 0xC000 and comment == f"missing {missing}", (status, comment)
        assert "refused a C-STORE request with a malformed command set" in lines and f"missing {missing}" in lines
    assert _slots_free(scp)
    assert _echoscu(scp).returncode == 0
