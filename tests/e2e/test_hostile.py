"""Hostile and careless peers against the node as it is served: UIDs that would leave the spool,
sockets that hold slots, memory bombs, garbage on the port, a worker that dies, content re-sent.

The real peers are DCMTK's echoscu/storescu; the careless one is tests/support/raw_dicom.py
(pynetdicom with the command set and data set bytes as given)."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from demo.orthanc import storescu
from dicom_node.dicom.statuses import StoreStatus
from tests.support.procfs import children, proc_status
from tests.support.raw_dicom import (
    A_ABORT,
    A_ASSOCIATE_AC,
    EXPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    associate_rq,
    c_store_command,
    encode,
    p_data,
    raw_bytes,
    raw_store,
)
from tests.support.served_node import (
    NODE_AET,
    SENDER_AET,
    ServedNode,
    stop_all,
    wait_for,
)
from tests.support.tools import require_tool

GIB_KB = 2**20


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ServedNode]:
    served = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=1.0, destinations=[],
                        limits={"socket_timeout_s": 3, "acse_timeout_s": 5})
    yield served.start()


def _study(phantom_dir: Path) -> list[Path]:
    folder = sorted((phantom_dir / "train_images").iterdir())[0]
    return sorted(folder.rglob("*.dcm"))


def _echoscu(port: int) -> bool:
    out = subprocess.run([require_tool("echoscu"), "-aet", SENDER_AET, "-aec", NODE_AET, "-to", "10",
                          "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
    return out.returncode == 0


def test_hostile_uids_are_refused_and_nothing_lands_outside(node: ServedNode, phantom_dir: Path,
                                                            tmp_path: Path) -> None:
    source = pydicom.dcmread(_study(phantom_dir)[0])
    victim = tmp_path / "victim" / "run-1"
    victim.mkdir(parents=True)
    cases = {"StudyInstanceUID": ["../../x", f"{tmp_path}/abs", "", ".", "../../victim", "1.02.3"],
             "SOPInstanceUID": ["../../../x", "", "1.2.3.4/../../y"]}
    for name, values in cases.items():
        for value in values:
            ds = copy.deepcopy(source)
            ds.SOPInstanceUID = generate_uid()
            setattr(ds, name, value)
            status = raw_store(node.port, encode(ds), str(ds.SOPInstanceUID), calling_aet=SENDER_AET)
            assert status == StoreStatus.CANNOT_UNDERSTAND, (name, value, status)
    ds = copy.deepcopy(source)  # the command's UID differs from the data set's
    assert raw_store(node.port, encode(ds), generate_uid(), calling_aet=SENDER_AET) == StoreStatus.CANNOT_UNDERSTAND
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node", "victim"] and victim.is_dir()
    assert not list((node.root / "spool").rglob("*.dcm")) and not (node.root / "spool" / "x").exists()
    log = node.log_text()
    assert log.count('"refused an instance"') + log.count('"refused a C-STORE request') >= 10
    assert _echoscu(node.port)


def test_a_real_peer_is_served_while_silent_sockets_hold_connections(node: ServedNode) -> None:
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(20)]
    one_byte = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(11)]
    for s in one_byte:
        s.sendall(b"\x01")
    try:
        assert _echoscu(node.port), "refused while 31 silent or half-open connections were held"
    finally:
        for s in silent + one_byte:
            s.close()
    assert _echoscu(node.port), "refused right after the silent connections closed"
    stop = time.monotonic() + 3
    answered = []
    while time.monotonic() < stop:  # bursts of bare connect-and-close, with a real peer in between
        for _ in range(10):
            socket.create_connection(("127.0.0.1", node.port)).close()
        answered.append(_echoscu(node.port))
    assert answered and all(answered)


def test_memory_bombs_are_refused_before_they_inflate_or_decode(node: ServedNode, phantom_dir: Path) -> None:
    source = pydicom.dcmread(_study(phantom_dir)[0])
    bomb = copy.deepcopy(source)
    bomb.SOPInstanceUID = generate_uid()
    bomb.Rows = bomb.Columns = 10240
    bomb.PixelData = bytes(10240 * 10240 * 2)  # 200 MiB of zeros -> about 200 kB deflated
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(encode(bomb)) + packer.flush()
    assert len(deflated) < 400 * 2**10
    status = raw_store(node.port, deflated, str(bomb.SOPInstanceUID), transfer_syntax=DeflatedExplicitVRLittleEndian,
                       calling_aet=SENDER_AET)
    assert status == StoreStatus.OUT_OF_RESOURCES
    rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    rle.Rows = rle.Columns = 65535  # 4 Gi pixels declared in a 2 kB file
    status = raw_store(node.port, encode(rle), str(rle.SOPInstanceUID), transfer_syntax=RLELossless,
                       calling_aet=SENDER_AET)
    assert status == StoreStatus.OUT_OF_RESOURCES
    assert node.process is not None
    assert proc_status(node.process.pid)["VmHWM"] < GIB_KB
    assert not list((node.root / "spool").rglob("*.dcm"))
    assert "inflates beyond" in node.log_text() and "pixels" in node.log_text()


def test_eight_p_data_on_an_unnegotiated_context_do_not_lock_the_address_out(node: ServedNode) -> None:
    for _ in range(8):  # the per-address limit: each leaked slot used to stay taken for good
        with RawAssociation(node.port) as a:
            assert a.associate(calling_aet=SENDER_AET, called_aet=NODE_AET) == A_ASSOCIATE_AC
            a.send(p_data(77, 0x03, b"\x00\x00\x00\x00\x04\x00\x00\x00\x30\x00"))  # 10 bytes of a C-ECHO
            pdu = a.read_pdu()
            assert pdu is not None and pdu[0] == A_ABORT
    assert _echoscu(node.port)
    assert node.log_text().count("presentation context 77, which was not accepted") == 8


def test_a_c_store_without_a_message_id_is_answered_and_logged(node: ServedNode) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    with RawAssociation(node.port) as a:
        assert a.associate(calling_aet=SENDER_AET, called_aet=NODE_AET) == A_ASSOCIATE_AC
        a.send(p_data(3, 0x03, c_store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID), omit=("MessageID",))))
        a.send(p_data(3, 0x02, encode(ds)))
        assert a.response() == (StoreStatus.CANNOT_UNDERSTAND, "missing MessageID")
    assert "refused a C-STORE request with a malformed command set" in node.log_text()
    assert _echoscu(node.port)


def test_sigterm_stops_the_node_after_a_request_with_context_id_zero(node: ServedNode) -> None:
    with RawAssociation(node.port) as a:
        a.send(associate_rq([(0, VERIFICATION, [EXPLICIT_LE])], SENDER_AET, NODE_AET))
        answer = a.read_pdu()
        assert answer is not None and answer[0] in (0x03, A_ABORT), answer  # answered: rejected or aborted
        started = time.monotonic()
        assert node.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 15, "SIGTERM took longer than its grace period"


def test_sigterm_stops_the_node_while_a_peer_holds_an_association_open(node: ServedNode) -> None:
    with RawAssociation(node.port) as a:
        assert a.associate(calling_aet=SENDER_AET, called_aet=NODE_AET) == A_ASSOCIATE_AC
        a.send(p_data(3, 0x03, c_store_command("1.2.840.10008.5.1.4.1.1.4", generate_uid())))  # then nothing
        started = time.monotonic()
        assert node.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 15, "SIGTERM took longer than its grace period"


def test_garbage_on_the_port_costs_a_bounded_number_of_log_lines(node: ServedNode) -> None:
    before = len(node.log_text().splitlines())
    for _ in range(5):
        raw_bytes(node.port, [os.urandom(100_000)])
        raw_bytes(node.port, [b"\x01\x00\xff\xff\xff\xf0" + os.urandom(64)])
    time.sleep(1.0)
    added = len(node.log_text().splitlines()) - before
    assert added <= 10 * 4, f"{added} log lines for 10 garbage connections"
    assert _echoscu(node.port)


def test_a_worker_that_dies_fails_only_its_study_and_twice_is_given_up(tmp_path: Path, phantom_dir: Path) -> None:
    served = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=1.0, destinations=[],
                        study={"release_when_complete": False}).start()
    studies = sorted((phantom_dir / "train_images").iterdir())[:2]
    files = {folder: sorted(folder.rglob("*.dcm")) for folder in studies}
    uids = {folder: str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID) for folder, f in files.items()}
    victim, other = (uids[f] for f in studies)
    assert storescu(files[studies[0]], served.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    assert storescu(files[studies[1]], served.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    marker = served.root / "results" / victim / "run-1" / ".grading"
    assert served.process is not None
    seen: set[tuple[int, int]] = set()
    for _ in range(2):  # the victim's grading kills its worker twice (as the OOM killer would)
        wait_for("the victim's grading to start", lambda: _stamp(marker) not in (None, *seen), timeout=90, every=0.01)
        stamp = _stamp(marker)
        assert stamp is not None, "the victim's grading marker went away"
        seen.add(stamp)
        for pid in _workers(served):
            os.kill(pid, signal.SIGKILL)
    failed = served.wait_state(victim, ("failed",), timeout=120)
    assert failed.reason is not None and "died on this study 2 times" in failed.reason
    assert served.wait_state(other, ("done",), timeout=120).state == "done"
    assert served.stop() == 0
    served.start()  # a restart does not grade it again
    time.sleep(3)
    study = served.study(victim)
    assert study is not None and study.state == "failed"


def _workers(served: ServedNode) -> list[int]:
    """The node's grading worker processes (spawned by multiprocessing; not its resource tracker)."""
    assert served.process is not None
    found = []
    for pid in children(served.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            found.append(pid)
    return found


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when it is absent: tells one run's marker from the next."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def test_new_content_under_a_known_uid_regrades_and_another_studys_uid_is_refused(node: ServedNode,
                                                                                   phantom_dir: Path,
                                                                                   tmp_path: Path) -> None:
    files = _study(phantom_dir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(files, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    node.wait_state(study_uid, ("done",), timeout=120)
    changed = pydicom.dcmread(files[0])
    changed.WindowCenter = 1234
    again = tmp_path / "changed.dcm"
    changed.save_as(again)
    assert storescu([again], node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    wait_for("the study to be graded again", lambda: _runs(node, study_uid) == 2, timeout=120)
    other = copy.deepcopy(changed)
    other.StudyInstanceUID = generate_uid()
    status = raw_store(node.port, encode(other), str(other.SOPInstanceUID), calling_aet=SENDER_AET,
                       transfer_syntax=ExplicitVRLittleEndian)
    assert status == StoreStatus.CANNOT_UNDERSTAND
    assert "already filed under another study" in node.log_text()


def _runs(node: ServedNode, study_uid: str) -> int:
    ledger = node.ledger()
    try:
        report = ledger.last_report(study_uid)
        study = ledger.study(study_uid)
        return report.run if report is not None and study is not None and study.state == "done" else 0
    finally:
        ledger.close()
