"""Query/retrieve with the node as a process and Orthanc as the PACS: a study routed without its
sagittal series is completed from the PACS (C-MOVE from the sender, C-GET after a source that is
down, WADO-RS) and graded 25/25; a study whose missing series no source can give is graded with
the reason, not held; ``lumbar-node fetch --accession`` (C-MOVE) and the web page's fetch form
(WADO-RS, in the node's process) retrieve, grade and deliver a study end to end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from demo.orthanc import ORTHANC_AET, Orthanc, free_port, running_orthanc, storescu
from dicom_node.states import EventKind
from dicom_node.store import PacsAnswer
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode, stop_all, wait_for
from tests.support.tools import normal_study
from tests.support.uploads import sign_in

FINISHED = ("done", "failed", "skipped")
ADMIN, ADMIN_PASSWORD = "ada", "correct horse battery staple"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return normal_study(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _series(study: list[Path], description: str) -> list[Path]:
    return [p for p in study if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == description]


def _study_uid(study: list[Path]) -> str:
    return str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)


def _send(files: list[Path], port: int, calling: str, called: str) -> None:
    sent = storescu(files, port, called=called, calling=calling)
    assert sent.returncode == 0, sent.stdout[-1000:] + sent.stderr[-1000:]


def _results_json(node: ServedNode, study_uid: str) -> dict:
    ledger = node.ledger()
    try:
        report = ledger.last_report(study_uid)
    finally:
        ledger.close()
    assert report is not None, node.log_text()[-3000:]
    return json.loads((Path(report.sr_path).parent / "results.json").read_text())


def _assessed(node: ServedNode, study_uid: str) -> int:
    return sum(label["assessed"] for label in _results_json(node, study_uid)["labels"])


def _asked(node: ServedNode, study_uid: str) -> tuple[PacsAnswer | None, list[str]]:
    ledger = node.ledger()
    try:
        query = ledger.pacs_query(study_uid)
        events = [e.detail or "" for e in ledger.events(study_uid) if e.kind is EventKind.ASKED_PACS]
    finally:
        ledger.close()
    return (query.outcome if query else None), events


def _dimse(pacs_port: int, method: str = "c-move", name: str = "pacs") -> dict:
    return {"name": name, "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs_port, "method": method}


def _srs_in(pacs: Orthanc, study_uid: str) -> int:
    return sum(len(s["Instances"]) for s in pacs.study_series(study_uid) if s["MainDicomTags"]["Modality"] == "SR")


def test_a_study_routed_without_its_sagittals_is_completed_by_c_move_from_its_sender_and_graded_25_of_25(
        study: list[Path], tmp_path: Path) -> None:
    study_uid = _study_uid(study)
    pacs_port = free_port()
    node = ServedNode(tmp_path / "node", pacs_port, quiet_time_s=3, query_retrieve=[_dimse(pacs_port)]).start()
    with running_orthanc(tmp_path / "pacs", peers={"lumbar": (NODE_AET, node.port)}, dicom_port=pacs_port) as pacs:
        _send(study, pacs.dicom_port, "MODALITY", ORTHANC_AET)  # the PACS holds the whole study
        _send(_series(study, "Axial T2"), node.port, ORTHANC_AET, NODE_AET)  # and routes the axial series only
        assert node.wait_state(study_uid, FINISHED, 180).state == "done", node.log_text()[-3000:]
        assert _assessed(node, study_uid) == 25
        outcome, events = _asked(node, study_uid)
        assert outcome is PacsAnswer.RETRIEVED and len(events) == 1
        assert "retrieved 2 series" in events[0] and "from pacs" in events[0]
        ledger = node.ledger()
        try:
            assert len(ledger.instance_paths(study_uid)) == len(study)
        finally:
            ledger.close()
        wait_for("the SR in the PACS", lambda: _srs_in(pacs, study_uid) == 1, 60)
        assert node.stop() == 0


def test_c_get_after_a_source_that_is_down_and_wado_rs_complete_a_study(study: list[Path], tmp_path: Path) -> None:
    study_uid = _study_uid(study)
    pacs_port = free_port()
    down = {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}
    node = ServedNode(tmp_path / "node", pacs_port, quiet_time_s=3, query_retrieve=[down, _dimse(pacs_port, "c-get")])
    # Orthanc answers C-FIND and C-GET only from the modalities it knows
    with running_orthanc(tmp_path / "pacs", peers={"lumbar": (NODE_AET, node.port)}, dicom_port=pacs_port,
                         dicomweb=True) as pacs:
        _send(study, pacs.dicom_port, "MODALITY", ORTHANC_AET)
        node.start()
        _send(_series(study, "Axial T2"), node.port, SENDER_AET, NODE_AET)  # a sender that is no source
        assert node.wait_state(study_uid, FINISHED, 180).state == "done", node.log_text()[-3000:]
        assert _assessed(node, study_uid) == 25
        outcome, [event] = _asked(node, study_uid)
        assert outcome is PacsAnswer.RETRIEVED and "from pacs" in event
        assert node.stop() == 0

        web = {"name": "archive", "dicomweb": {"url": f"http://127.0.0.1:{pacs.http_port}/dicom-web"}}
        node = ServedNode(tmp_path / "node-web", pacs.dicom_port, quiet_time_s=3, query_retrieve=[web]).start()
        _send(_series(study, "Axial T2"), node.port, SENDER_AET, NODE_AET)
        assert node.wait_state(study_uid, FINISHED, 180).state == "done", node.log_text()[-3000:]
        assert _assessed(node, study_uid) == 25
        outcome, [event] = _asked(node, study_uid)
        assert outcome is PacsAnswer.RETRIEVED and "from archive" in event
        assert node.stop() == 0

        # the web page's fetch form, in the node's own process: the whole study by WADO-RS, graded at once
        accession = str(pydicom.dcmread(study[0], stop_before_pixels=True).AccessionNumber)
        node = ServedNode(tmp_path / "node-form", pacs.dicom_port, quiet_time_s=60, query_retrieve=[web])
        node.add_user(ADMIN, "admin", ADMIN_PASSWORD)
        node.start()
        client, token = sign_in(node.web_url, ADMIN, ADMIN_PASSWORD)
        started = time.monotonic()
        assert client.post("/fetch", data={"accession": accession, "csrf": token}).status_code == 303
        assert node.wait_state(study_uid, FINISHED, 120).state == "done", node.log_text()[-3000:]
        assert time.monotonic() - started < 60  # released when fetched, not after the quiet time
        assert _assessed(node, study_uid) == 25
        page = client.get("/fetch").text
        assert "st-done" in page and f"3 series, {len(study)}/{len(study)} instances" in page
        assert node.stop() == 0


def test_a_source_that_is_down_leaves_the_missing_series_not_assessed_with_the_reason(
        study: list[Path], tmp_path: Path) -> None:
    study_uid = _study_uid(study)
    down = {"name": "down", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": free_port()}
    node = ServedNode(tmp_path / "node", free_port(), quiet_time_s=3, query_retrieve=[down]).start()
    started = time.monotonic()
    _send(_series(study, "Axial T2") + _series(study, "Sagittal T2/STIR"), node.port, ORTHANC_AET, NODE_AET)
    assert node.wait_state(study_uid, ("sending", *FINISHED), 180).state in ("sending", "done")
    assert time.monotonic() - started < 120  # not held for the source
    labels = _results_json(node, study_uid)["labels"]
    missing = [label for label in labels if not label["assessed"]]
    assert len(missing) == 10 and all(label["condition"].endswith("Neural Foraminal Narrowing") for label in missing)
    assert all("not sent and not found on the PACS" in label["reason"] for label in missing), missing[0]
    assert sum(label["assessed"] for label in labels) == 15
    assert _asked(node, study_uid)[0] is PacsAnswer.UNREACHABLE


def test_fetch_by_accession_retrieves_grades_and_delivers_and_so_does_the_web_form(
        study: list[Path], tmp_path: Path) -> None:
    study_uid = _study_uid(study)
    accession = str(pydicom.dcmread(study[0], stop_before_pixels=True).AccessionNumber)
    pacs_port = free_port()
    node = ServedNode(tmp_path / "node", pacs_port, quiet_time_s=3, query_retrieve=[_dimse(pacs_port)])
    not_running = node.command("fetch", "--accession", accession)
    assert not_running.returncode == 1 and "not running" in not_running.stderr
    node.start()
    with running_orthanc(tmp_path / "pacs", peers={"lumbar": (NODE_AET, node.port)}, dicom_port=pacs_port) as pacs:
        _send(study, pacs.dicom_port, "MODALITY", ORTHANC_AET)
        fetched = node.command("fetch", "--accession", accession, "--timeout", "110")
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr + node.log_text()[-2000:]
        assert f"{study_uid}: 3 series, {len(study)} instances retrieved" in fetched.stdout
        assert "instances retrieved" in fetched.stderr and f"{study_uid}: done" in fetched.stderr
        assert _assessed(node, study_uid) == 25
        wait_for("the SR in the PACS", lambda: _srs_in(pacs, study_uid) == 1, 60)
        missing = node.command("fetch", "--accession", "NO-SUCH-ONE")
        assert missing.returncode == 1 and "not found" in missing.stderr

        # the web page's form, for an administrator: the node fetches the study again (nothing new)
        node.add_user(ADMIN, "admin", ADMIN_PASSWORD)
        client, token = sign_in(node.web_url, ADMIN, ADMIN_PASSWORD)
        refused = client.post("/fetch", data={"accession": accession})
        assert refused.status_code == 403  # no CSRF token
        bad = client.post("/fetch", data={"accession": "A\\B", "csrf": token})
        assert bad.status_code == 400
        answer = client.post("/fetch", data={"accession": accession, "csrf": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/fetch"
        page = wait_for("the fetch to finish", lambda: (text := client.get("/fetch").text) and "st-done" in text
                        and text, 60)
        assert study_uid in page and "already holds every MR series" not in page
        ledger = node.ledger()
        try:
            actors = [e.actor for e in ledger.events(study_uid) if e.kind is EventKind.FETCHED]
        finally:
            ledger.close()
        assert actors == ["lumbar-node fetch", ADMIN]
