"""The web upload's defects of issue 18, against the node as its users run it (`lumbar-node serve`
in its own process, signed in over HTTP on loopback), each with the node's peak RSS or its ledger
and spool checked: a deflate bomb and zips that inflate a long way are refused without inflating;
an upload over the limit is refused while it is read (with a Content-Length, and chunked); a
refused upload records nothing, so the PACS's later C-STORE of that study is not taken for an
upload; a viewer's images added to a study an administrator sent send nothing; no file name in the log."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from demo.orthanc import storescu
from dicom_node.states import EventKind
from tests.support.procfs import proc_status
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode, stop_all, wait_for
from tests.support.tools import complete_study
from tests.support.uploads import CONTENT_TYPE, MiB, deflate_bomb, multipart, sign_in, streamed, zip_of_one_image

ADMIN, ADMIN_PASSWORD = "ada", "ada-password-1"
VIEWER, VIEWER_PASSWORD = "vic", "vic-password-1"
SMALL_MIB = 150  # a node's peak RSS may grow by less than this for any hostile upload (it had 2 GiB)


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def node(tmp_path: Path) -> ServedNode:
    served = ServedNode(tmp_path / "node", _free_port(), quiet_time_s=2.0, web={"upload_max_mb": 64})
    served.add_user(ADMIN, "admin", ADMIN_PASSWORD)
    served.add_user(VIEWER, "viewer", VIEWER_PASSWORD)
    return served.start()


def _peak_mib(node: ServedNode) -> int:
    assert node.process is not None
    return proc_status(node.process.pid)["VmHWM"] // 1024


def _spooled(node: ServedNode) -> list[Path]:
    return sorted(p for p in (node.root / "spool").rglob("*") if p.is_file())


def test_bombs_and_over_limit_uploads_cost_the_node_no_memory(node: ServedNode) -> None:
    client, token = sign_in(node.web_url, VIEWER, VIEWER_PASSWORD)
    before = _peak_mib(node)
    bomb = deflate_bomb(1024)  # 1 GiB of pixels in about 1 MiB
    assert len(bomb) < 2 * MiB
    answer = client.post("/upload", content=multipart(token, [("Jane_Roe_scan.dcm", bomb)]),
                         headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 413 and "inflates beyond" in answer.json()["error"], answer.text
    zips = [(f"{i}.zip", zip_of_one_image(60)) for i in range(6)]  # 6 x 60 kB, 60 MiB each once inflated
    answer = client.post("/upload", content=multipart(token, zips), headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 413, answer.text
    over = multipart(None, [("big.dcm", bytes(200 * MiB))])  # the token in the header, a Content-Length
    answer = client.post("/upload", content=over, headers={"Content-Type": CONTENT_TYPE, "X-CSRF-Token": token})
    assert answer.status_code == 413
    try:  # chunked: refused once 64 MiB have passed (the node may close before the client has sent it all)
        answer = client.post("/upload", content=streamed(token, 200 * MiB), headers={"Content-Type": CONTENT_TYPE})
        assert answer.status_code == 413
    except httpx.HTTPError:
        pass
    assert _peak_mib(node) - before < SMALL_MIB, (before, _peak_mib(node))
    assert node.process.poll() is None and _spooled(node) == []
    ledger = node.ledger()
    try:
        assert ledger.studies() == []
    finally:
        ledger.close()
    log = node.log_text()
    assert log.count('"upload refused"') >= 3 and "Jane_Roe" not in log  # kinds only, never a file name


def test_a_refused_upload_records_nothing_and_the_pacs_study_is_not_an_upload(node: ServedNode, phantom_dir: Path,
                                                                              tmp_path: Path) -> None:
    files = complete_study(phantom_dir)[:6]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    cut = files[0].read_bytes()[:-500]  # one file cut short: the whole upload is refused
    client, token = sign_in(node.web_url, VIEWER, VIEWER_PASSWORD)
    body = multipart(token, [(f.name, f.read_bytes()) for f in files[1:]] + [("cut.dcm", cut)])
    answer = client.post("/upload", content=body, headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 400 and answer.json()["error"].startswith("Not accepted: cut.dcm: truncated")
    ledger = node.ledger()
    try:
        assert ledger.study(study_uid) is None and ledger.upload(study_uid) is None and ledger.events(study_uid) == []
        assert _spooled(node) == []
        assert storescu(files, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0  # later, the PACS
        wait_for("the PACS's instances", lambda: (s := ledger.study(study_uid)) is not None and s.instances == 6)
        assert ledger.upload(study_uid) is None  # a study from the PACS: its results go to the PACS
    finally:
        ledger.close()


def test_a_viewer_adding_an_image_to_a_sent_upload_sends_nothing(node: ServedNode, phantom_dir: Path) -> None:
    files = complete_study(phantom_dir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    admin, admin_token = sign_in(node.web_url, ADMIN, ADMIN_PASSWORD)
    answer = admin.post("/upload", content=multipart(admin_token, [(f.name, f.read_bytes()) for f in files]),
                        headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 200, answer.text
    assert node.wait_state(study_uid, ("done", "skipped", "failed"), 300).state == "done"
    admin.post(f"/studies/{study_uid}/send-again", data={"csrf": admin_token})  # the administrator sends it
    ledger = node.ledger()
    try:
        assert ledger.upload(study_uid).send
        sent_before = len(ledger.deliveries(study_uid))
        extra = pydicom.dcmread(files[-1])
        extra.SOPInstanceUID = generate_uid()  # one more image of the same series
        viewer, viewer_token = sign_in(node.web_url, VIEWER, VIEWER_PASSWORD)
        out = BytesIO()
        extra.save_as(out, enforce_file_format=True)
        answer = viewer.post("/upload", content=multipart(viewer_token, [("extra.dcm", out.getvalue())]),
                             headers={"Content-Type": CONTENT_TYPE})
        assert answer.status_code == 200, answer.text
        upload = ledger.upload(study_uid)
        assert upload.uploaded_by == ADMIN and not upload.send
        # the viewer's line of the audit trail (the node may have released the study meanwhile: not the last line)
        added = [e for e in ledger.events(study_uid) if e.kind is EventKind.UPLOADED and e.actor == VIEWER]
        assert len(added) == 1 and "added by vic to the study uploaded by ada" in (added[0].detail or "")
        wait_for("the study graded again", lambda: (r := ledger.last_report(study_uid)) is not None and r.run >= 2
                 and ledger.study(study_uid).state in ("done", "skipped", "failed"), 300)
        assert len(ledger.deliveries(study_uid)) == sent_before  # nothing new for the PACS
    finally:
        ledger.close()
