"""DICOMweb end to end, as the node is run (`lumbar-node serve` in its own process) with a real
Orthanc and its DICOMweb plugin: Orthanc pushes a phantom study to the node by STOW-RS (its
``/dicom-web/servers/{id}/stow`` job, HTTP Basic with a ``sender`` account), the node grades it and
stores its results back on Orthanc by STOW-RS (a DICOMweb destination), retrieved by WADO-RS; and
hostile STOW-RS requests (no credentials, a viewer's, 2 GiB, a Deflate bomb, not DICOM, hostile
UIDs) refused with the node's peak RSS bounded and nothing filed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from demo.orthanc import Orthanc, free_port, running_orthanc, storescu
from dicom_node.dicomweb import STUDY_MISMATCH
from dicom_node.ingest import StoreStatus
from tests.support.procfs import proc_status
from tests.support.served_node import ServedNode, stop_all
from tests.support.stow import CONTENT_TYPE, MiB, headers, parts_of, related, streamed
from tests.support.tools import complete_study
from tests.support.uploads import deflate_bomb, image, part10

SENDER, SENDER_PASSWORD = "orthanc", "orthanc-password-1"
VIEWER, VIEWER_PASSWORD = "vic", "vic-password-1"
SMALL_MIB = 150  # a node's peak RSS may grow by less than this for any hostile request


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _orthanc(pacs: Orthanc, method: str, path: str, body: object | None = None, timeout: float = 300) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}{path}", data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


def _wado(pacs: Orthanc, study: str, series: str, sop: str) -> bytes:
    """One instance by WADO-RS in the transfer syntax it was stored in (``transfer-syntax=*``; without
    it, Orthanc answers in Explicit VR Little Endian, the WADO-RS default, re-encoding an Implicit VR one)."""
    answer = httpx.get(f"http://127.0.0.1:{pacs.http_port}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    [part] = parts_of(answer.content, answer.headers["content-type"])
    return part


def test_orthanc_pushes_a_study_by_stow_and_gets_the_results_back_by_stow(phantom_dir: Path, tmp_path: Path) -> None:
    files = complete_study(phantom_dir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running_orthanc(tmp_path / "pacs", dicomweb=True) as pacs:
        sent = storescu(files, pacs.dicom_port)
        assert sent.returncode == 0, sent.stderr[-2000:]
        [orthanc_study] = pacs.get("/studies")
        node = ServedNode(tmp_path / "node", free_port(), quiet_time_s=2,
                          destinations=[{"name": "pacs-web",
                                         "dicomweb": {"url": f"http://127.0.0.1:{pacs.http_port}/dicom-web"}}])
        node.add_user(SENDER, "sender", SENDER_PASSWORD)
        node.start()
        _orthanc(pacs, "PUT", "/dicom-web/servers/lumbar", {"Url": f"{node.web_url}/dicom-web/",
                                                            "Username": SENDER, "Password": SENDER_PASSWORD})
        _orthanc(pacs, "POST", "/dicom-web/servers/lumbar/stow", {"Resources": [orthanc_study]})
        study = node.wait_state(study_uid, ("done", "failed", "skipped"), timeout=180)
        assert study.state == "done", study.reason
        assert study.instances == len(files)
        log = node.log_text()
        assert '"STOW-RS request"' in log and '"user": "orthanc"' in log
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert str(header.PatientName) not in log and str(header.PatientID) not in log  # no patient data logged
        ledger = node.ledger()
        try:
            [delivery] = ledger.deliveries(study_uid)
            assert delivery.destination == "pacs-web" and str(delivery.state) == "delivered"
            received = [e for e in ledger.events(study_uid) if str(e.kind) == "instances received"]
            assert {e.actor for e in received} == {SENDER}
        finally:
            ledger.close()
        results = [Path(p) for p in delivery.paths]
        modalities = set()
        for path in results:  # every result, retrieved back by WADO-RS, is the node's file byte for byte
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            modalities.add(str(ds.Modality))
            assert ds.StudyInstanceUID == study_uid
            assert _wado(pacs, study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID) == path.read_bytes(), path.name
        assert {"SR", "OT", "DOC"} <= modalities
        held = sum(len(s["Instances"]) for s in pacs.study_series(study_uid))
        assert held == len(files) + len(results)


def test_a_dicomweb_destination_that_is_down_is_retried_and_reported(phantom_dir: Path, tmp_path: Path) -> None:
    files = complete_study(phantom_dir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = ServedNode(tmp_path / "node", free_port(), quiet_time_s=2,
                      destinations=[{"name": "pacs-web", "dicomweb": {"url": f"http://127.0.0.1:{free_port()}/dw"}}],
                      delivery={"backoff_initial_s": 0.5, "backoff_max_s": 1, "max_attempts": 3})
    node.add_user(SENDER, "sender", SENDER_PASSWORD)
    node.start()
    answer = httpx.post(f"{node.web_url}/dicom-web/studies",
                        content=related([p.read_bytes() for p in files]),
                        headers=headers(SENDER, SENDER_PASSWORD), timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    study = node.wait_state(study_uid, ("failed",), timeout=180)
    assert "unreachable" in (study.reason or "") or "unreachable" in node.log_text()
    ledger = node.ledger()
    try:
        failures = [e for e in ledger.events(study_uid) if str(e.kind) == "delivery attempt failed"]
        assert len(failures) == 3 and all("(STOW-RS): unreachable" in e.detail for e in failures)
    finally:
        ledger.close()


def _peak_mib(node: ServedNode) -> int:
    assert node.process is not None
    return proc_status(node.process.pid)["VmHWM"] // 1024


def test_hostile_stow_requests_are_refused_in_bounded_memory(tmp_path: Path) -> None:
    node = ServedNode(tmp_path / "node", free_port(), web={"upload_max_mb": 64})
    node.add_user(SENDER, "sender", SENDER_PASSWORD)
    node.add_user(VIEWER, "viewer", VIEWER_PASSWORD)
    node.start()
    client = httpx.Client(base_url=node.web_url, timeout=300)
    before = _peak_mib(node)
    url, sender = "/dicom-web/studies", headers(SENDER, SENDER_PASSWORD)
    one = related([part10(image(16))])
    assert client.post(url, content=one, headers={"Content-Type": CONTENT_TYPE}).status_code == 401
    assert client.post(url, content=one, headers=headers(VIEWER, VIEWER_PASSWORD)).status_code == 403
    assert client.post(url, content=one, headers={**sender, "Content-Type": "application/zip"}).status_code == 415
    bomb = client.post(url, content=related([deflate_bomb(1024)]), headers=sender)  # 1 GiB inflated from 1 MiB
    assert bomb.status_code == 409, bomb.text
    [failed] = Dataset.from_json(bomb.json()).FailedSOPSequence
    assert failed.FailureReason == StoreStatus.OUT_OF_RESOURCES
    garbage = client.post(url, content=related([b"MZ not a DICOM file" * 1000]), headers=sender)
    assert garbage.status_code == 409
    assert Dataset.from_json(garbage.json()).FailedSOPSequence[0].FailureReason == StoreStatus.CANNOT_UNDERSTAND
    hostile = image(16, study="1.2.3.4")
    hostile.SeriesInstanceUID, hostile.SOPInstanceUID = "../../../../tmp/x", "1." + "9" * 80
    answer = client.post(url, content=related([part10(hostile)]), headers=sender)
    assert answer.status_code == 409 and "9" * 80 not in answer.text
    study = generate_uid()
    mismatch = client.post(f"{url}/{study}", content=related([part10(image(16))]), headers=sender)
    assert Dataset.from_json(mismatch.json()).FailedSOPSequence[0].FailureReason == STUDY_MISMATCH
    for declared in (True, False):  # 2 GiB with a Content-Length (refused before it is read), then chunked
        extra = {"Content-Length": str(len(b"".join(streamed(0))) + 2048 * MiB)} if declared else {}
        try:  # the node may close the connection before the client has sent it all
            answer = client.post(url, content=streamed(2048 * MiB), headers={**sender, **extra})
            assert answer.status_code == 413 and "web.upload_max_mb" in answer.text
        except httpx.HTTPError:
            pass
    assert node.process is not None and node.process.poll() is None
    assert _peak_mib(node) - before < SMALL_MIB, (before, _peak_mib(node))
    assert not [p for p in (node.root / "spool").rglob("*") if p.is_file()]
    assert '"STOW-RS: refused an instance"' in node.log_text()
