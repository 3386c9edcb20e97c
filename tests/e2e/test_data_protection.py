"""Data protection on the node as it is served: no patient value in the log, the ledger or
`status`; files at rest private; one patient per report; results never silently undelivered;
retention purges finished studies only."""

from __future__ import annotations

import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.config import IGNORE, settings
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification

from demo.orthanc import free_port, storescu
from tests.support.served_node import (
    NODE_AET,
    SENDER_AET,
    ServedNode,
    stop_all,
    wait_for,
)

NAME, PATIENT_ID, BIRTH_DATE, AGE = "QXZFAMILY^QXZGIVEN", "PIDQXZ4711", "1931-07-04", "045Y"
SECRETS = ("QXZFAMILY", "QXZGIVEN", PATIENT_ID, BIRTH_DATE, "19310704", "45 years", AGE)


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _study(phantom_dir: Path, out: Path, index: int = 0, **values: str) -> tuple[str, list[Path]]:
    """A phantom study rewritten with these attribute values (written as given, valid or not)."""
    folder = sorted((phantom_dir / "train_images").iterdir())[index]
    out.mkdir(parents=True, exist_ok=True)
    before = settings.writing_validation_mode
    settings.writing_validation_mode = IGNORE  # a careless exporter writes a birth date as 1931-07-04
    try:
        files = []
        for i, path in enumerate(sorted(folder.rglob("*.dcm"))):
            ds = pydicom.dcmread(path)
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            files.append(out / f"{i:03d}.dcm")
            ds.save_as(files[-1])
    finally:
        settings.writing_validation_mode = before
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def test_patient_values_reach_neither_log_nor_ledger_nor_status(tmp_path: Path, phantom_dir: Path) -> None:
    node = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=1.0, destinations=[]).start()
    study_uid, files = _study(phantom_dir, tmp_path / "study", PatientName=NAME, PatientID=PATIENT_ID,
                              PatientBirthDate=BIRTH_DATE, PatientAge=AGE)
    _, broken = _study(phantom_dir, tmp_path / "broken", index=1, PatientName=NAME, PatientID=PATIENT_ID,
                       PatientBirthDate=BIRTH_DATE, PatientAge=AGE, SpecificCharacterSet="FOO_BAR",
                       ImagesInAcquisition="9" * 20)
    assert storescu(files, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    storescu(broken, node.port, called=NODE_AET, calling=SENDER_AET)
    node.wait_state(study_uid, ("done", "failed"), timeout=180)
    wait_for("every study to end", lambda: all(s.state in ("done", "failed", "skipped") for s in _studies(node)), 180)
    status, status_json = node.command("status").stdout, node.command("status", "--json").stdout
    assert node.stop() == 0
    ledger_bytes = b"".join(p.read_bytes() for p in (node.root).glob("ledger.sqlite*"))
    log = node.log_text()
    for secret in SECRETS:
        assert secret not in log, f"{secret!r} in the log"
        assert secret not in status and secret not in status_json, f"{secret!r} in status"
        assert secret.encode() not in ledger_bytes, f"{secret!r} in the ledger"
    assert all(line.startswith("{") for line in log.splitlines() if line), "a log line outside the JSON chain"


def _studies(node: ServedNode) -> list:
    ledger = node.ledger()
    try:
        return ledger.studies()
    finally:
        ledger.close()


def test_files_at_rest_are_private_and_a_study_of_two_patients_is_not_graded(tmp_path: Path, phantom_dir: Path) -> None:
    node = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=1.0, destinations=[]).start()
    study_uid, files = _study(phantom_dir, tmp_path / "one", index=0)
    mixed_uid, mixed = _study(phantom_dir, tmp_path / "two", index=1)
    other = pydicom.dcmread(mixed[0])
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(mixed[0])
    assert storescu(files + mixed, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    assert node.wait_state(study_uid, ("done",), timeout=180).state == "done"
    failed = node.wait_state(mixed_uid, ("failed",), timeout=180)
    assert failed.reason is not None and "more than one patient" in failed.reason
    ledger = node.ledger()
    try:
        assert ledger.last_report(mixed_uid) is None  # no report, nothing to send
    finally:
        ledger.close()
    made = [p for p in node.root.rglob("*") if p.name not in ("node.yaml", "node.log")]
    assert any(p.suffix == ".dcm" and "results" in p.parts for p in made)
    loose = [f"{p.relative_to(node.root)} {stat.filemode(p.stat().st_mode)}" for p in made
             if p.stat().st_mode & 0o077]
    assert loose == [], loose[:10]


def test_a_destination_that_refuses_secondary_captures_ends_failed_with_the_reason(tmp_path: Path,
                                                                                    phantom_dir: Path) -> None:
    only_sr = AE("ONLY_SR")
    only_sr.add_supported_context(ComprehensiveSRStorage)
    only_sr.add_supported_context(Verification)
    port = free_port()
    server = only_sr.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        node = ServedNode(tmp_path / "node", destination_port=port, quiet_time_s=1.0,
                          destinations=[{"name": "picky", "ae_title": "ONLY_SR", "host": "127.0.0.1", "port": port}],
                          delivery={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5}).start()
        study_uid, files = _study(phantom_dir, tmp_path / "study")
        assert storescu(files, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
        failed = node.wait_state(study_uid, ("failed",), timeout=180)
        assert failed.reason is not None and "delivery to picky failed after 2 attempts" in failed.reason
        assert "Secondary Capture" in failed.reason or "presentation context" in failed.reason.lower()
    finally:
        server.shutdown()


def test_a_destination_that_hangs_is_a_failed_attempt_not_a_stuck_study(tmp_path: Path, phantom_dir: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        node = ServedNode(tmp_path / "node", destination_port=port, quiet_time_s=1.0,
                          destinations=[{"name": "silent", "ae_title": "SILENT", "host": "127.0.0.1", "port": port}],
                          delivery={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5,
                                    "timeout_s": 2}).start()
        study_uid, files = _study(phantom_dir, tmp_path / "study")
        assert storescu(files, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
        failed = node.wait_state(study_uid, ("failed",), timeout=180)
        assert failed.reason is not None and "delivery to silent failed after 2 attempts" in failed.reason
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()


def test_retention_purges_finished_studies_and_keeps_their_line(tmp_path: Path, phantom_dir: Path) -> None:
    node = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=1.0, destinations=[],
                      storage={"retention_days": 2 / 86400}).start()  # two seconds
    study_uid, files = _study(phantom_dir, tmp_path / "study")
    assert storescu(files, node.port, called=NODE_AET, calling=SENDER_AET).returncode == 0
    node.wait_state(study_uid, ("done",), timeout=180)
    spool = node.root / "spool" / study_uid
    wait_for("the study to be purged", lambda: not spool.exists() and not (node.root / "results" / study_uid).exists(),
             timeout=60)
    ledger = node.ledger()
    try:
        row = ledger._query("SELECT state, purged_at, purged FROM studies WHERE study_uid=?", (study_uid,))
    finally:
        ledger.close()
    assert row and row[0][0] == "done" and row[0][1] is not None and "spooled instances" in row[0][2]
    assert '"study purged"' in node.log_text()
