"""The ledger's audit trail, uploads and the dashboard's page of studies (a real SQLite file)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_node.states import DeliveryState, EventKind, StudyState
from dicom_node.store.ledger import Ledger, Report

MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def _study(ledger: Ledger, study: str, images: int = 2, series: int = 1) -> None:
    for i in range(images):
        ledger.record_instance(f"{study}.{i + 1}", study, f"{study}.0.{i % series + 1}", MR,
                               Path(f"/spool/{study}/{i}.dcm"), "PACS", None, digest=str(i))


def test_a_study_trail_is_in_order_and_other_studies_apart(ledger: Ledger) -> None:
    ledger.add_event(EventKind.RECEIVED, "ORTHANC", "1.2", "3 instances", {"instances": 3})
    ledger.add_event(EventKind.RELEASED, "node", "1.2", "run 1: complete")
    ledger.add_event(EventKind.RECEIVED, "ORTHANC", "1.3", "1 instance")
    ledger.add_event(EventKind.SIGNED_IN, "ada", None, "ada (admin)")
    trail = ledger.events("1.2")
    assert [e.kind for e in trail] == [EventKind.RECEIVED, EventKind.RELEASED]
    assert trail[0].actor == "ORTHANC" and trail[0].data == {"instances": 3} and trail[1].data is None
    assert trail[0].at <= trail[1].at
    newest = ledger.events(limit=2)
    assert [e.kind for e in newest] == [EventKind.SIGNED_IN, EventKind.RECEIVED]


def test_dashboard_newest_first_paged_searched_and_filtered(ledger: Ledger) -> None:
    for n in range(1, 8):
        _study(ledger, f"1.2.{n}", images=n, series=min(n, 3))
    ledger.set_state("1.2.3", StudyState.DONE)
    ledger.add_event(EventKind.GRADED, "node", "1.2.3", "run 1", {"series_roles": {"Axial T2": ["1.2.3.0.1"]}})
    rows, total = ledger.dashboard(limit=3)
    assert total == 7 and [r.study_uid for r in rows] == ["1.2.7", "1.2.6", "1.2.5"]
    assert (rows[0].instances, rows[0].series) == (7, 3)
    rows, total = ledger.dashboard(offset=6, limit=3)
    assert total == 7 and [r.study_uid for r in rows] == ["1.2.1"]
    rows, total = ledger.dashboard(state=StudyState.DONE)
    assert total == 1 and rows[0].study_uid == "1.2.3" and rows[0].graded_at is not None
    assert rows[0].series_roles == {"Axial T2": ["1.2.3.0.1"]} and rows[0].released_at is None
    rows, total = ledger.dashboard(search="2.4")
    assert [r.study_uid for r in rows] == ["1.2.4"]
    assert ledger.dashboard(search="%")[1] == 0 and ledger.dashboard(search="_")[1] == 0  # no wildcards
    counts = ledger.state_counts()
    assert counts[StudyState.DONE] == 1 and counts[StudyState.RECEIVING] == 6 and counts[StudyState.FAILED] == 0


def test_an_upload_is_marked_and_sent_only_when_asked(ledger: Ledger) -> None:
    _study(ledger, "1.5")
    assert ledger.upload("1.5") is None and not ledger.set_upload_send("1.5", True)
    ledger.add_upload("1.5", "vic")
    upload = ledger.upload("1.5")
    assert upload is not None and upload.uploaded_by == "vic" and not upload.send
    assert ledger.dashboard()[0][0].uploaded_by == "vic"
    study = ledger.study("1.5")
    ledger.set_state("1.5", StudyState.ANALYSING, generation=study.generation)
    ledger.add_report(Report("1.5", 1, "/r/SR.dcm", "9.1", None), study.generation, [], ["/r/SR.dcm"])
    assert ledger.study("1.5").state == StudyState.DONE and ledger.deliveries("1.5") == []
    assert ledger.set_upload_send("1.5", True) and ledger.upload("1.5").send
    ids = ledger.add_deliveries("1.5", 1, ["pacs"], ["/r/SR.dcm"])
    assert len(ids) == 1 and ledger.delivery(ids[0]).state is DeliveryState.PENDING
    assert ledger.study("1.5").state == StudyState.SENDING
    again = ledger.add_deliveries("1.5", 1, ["pacs"], ["/r/SR.dcm"])  # send again: the pending one is superseded
    assert ledger.delivery(ids[0]).state is DeliveryState.SUPERSEDED
    assert ledger.delivery(again[0]).state is DeliveryState.PENDING


def test_an_older_ledger_gets_the_new_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE events")
        db.execute("DROP TABLE uploads")
        db.execute("PRAGMA user_version = 0")  # as the release before the web page left it: unversioned
    ledger = Ledger(path)
    try:
        ledger.add_event(EventKind.SIGNED_IN, "ada", None, "ada")
        assert len(ledger.events()) == 1 and ledger.upload("1.2") is None
    finally:
        ledger.close()
