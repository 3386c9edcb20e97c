"""The ledger's state machine (unit tests on a real SQLite file)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.config import DeliverySettings
from dicom_node.pipeline.delivery import backoff
from dicom_node.states import StudyState
from dicom_node.store.ledger import Ledger, Recorded, Report


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def _add(ledger: Ledger, sop: str, study: str = "1.2.3", sop_class: str = "1.2.840.10008.5.1.4.1.1.4",
         digest: str = "d1", series: str = "1.2.3.4") -> Recorded:
    return ledger.record_instance(sop, study, series, sop_class, Path(f"/spool/{study}/{series}/{sop}.dcm"), "PACS", 3,
                                  digest=digest)


def test_a_late_instance_makes_a_running_grading_stale(ledger: Ledger) -> None:
    assert _add(ledger, "1") is Recorded.NEW and _add(ledger, "1") is Recorded.RESENT  # a re-send is recorded once
    [study] = ledger.studies()
    assert ledger.set_state(study.study_uid, "analysing", generation=study.generation)
    _add(ledger, "2")  # arrives while grading
    assert ledger.study("1.2.3").state == "receiving"
    report = Report("1.2.3", 1, "/r/SR.dcm", "9.9", "9.8")
    assert ledger.add_report(report, study.generation, ["pacs"], ["/r/SR.dcm"]) is None
    assert ledger.last_report("1.2.3") is None and ledger.deliveries() == []


def test_our_own_results_coming_back_do_not_reopen_a_study(ledger: Ledger) -> None:
    _add(ledger, "1")
    study = ledger.study("1.2.3")
    ledger.add_report(Report("1.2.3", 1, "/r/SR.dcm", "9.9", None), study.generation, ["pacs"], ["/r/SR.dcm"])
    sr_class = "1.2.840.10008.5.1.4.1.1.88.33"
    assert ledger.record_instance("sr", "1.2.3", "9.9", sr_class, Path("/s/sr.dcm"), "PACS", None, reopens=False)
    assert ledger.study("1.2.3").state == "sending"


def test_a_new_report_supersedes_undelivered_results_and_delivery_ends_the_study(ledger: Ledger) -> None:
    _add(ledger, "1")
    g = ledger.study("1.2.3").generation
    [first] = ledger.add_report(Report("1.2.3", 1, "/r1/SR.dcm", "9.9", None), g, ["pacs"], ["/r1/SR.dcm"])
    ledger.reopen("1.2.3")
    g = ledger.study("1.2.3").generation
    [second] = ledger.add_report(Report("1.2.3", 2, "/r2/SR.dcm", "9.9", None), g, ["pacs"], ["/r2/SR.dcm"])
    assert ledger.delivery(first).state == "superseded" and ledger.delivery(second).state == "pending"
    ledger.delivery_failed(second, "peer down", time.time() + 5)
    state = ledger.study("1.2.3")
    assert state.state == "sending" and "attempt 1 failed (peer down)" in state.reason
    ledger.delivery_done(second)
    assert ledger.study("1.2.3").state == "done" and ledger.delivery(second).attempts == 2


def test_giving_up_on_a_delivery_fails_the_study_with_the_reason(ledger: Ledger) -> None:
    _add(ledger, "1")
    [d] = ledger.add_report(Report("1.2.3", 1, "/r/SR.dcm", "9.9", None), ledger.study("1.2.3").generation,
                            ["pacs"], ["/r/SR.dcm"])
    ledger.delivery_failed(d, "association rejected", None)
    state = ledger.study("1.2.3")
    assert state.state == "failed" and state.reason == "delivery to pacs failed after 1 attempts: association rejected"


def test_resume_regrades_what_was_being_graded(ledger: Ledger) -> None:
    _add(ledger, "1")
    ledger.set_state("1.2.3", "analysing")
    assert ledger.resume() == 1 and ledger.study("1.2.3").state == "receiving"


def test_backoff_doubles_and_is_capped() -> None:
    settings = DeliverySettings(max_attempts=5, backoff_initial_s=10, backoff_max_s=60)
    assert [backoff(n, settings) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_a_new_report_supersedes_the_newest_one_a_destination_has(ledger: Ledger) -> None:
    _add(ledger, "1")

    def run(n: int) -> int:
        ledger.reopen("1.2.3")
        report = Report("1.2.3", n, f"/r{n}/SR.dcm", "9.9", None)
        [delivery] = ledger.add_report(report, ledger.study("1.2.3").generation, ["pacs"], [report.sr_path])
        return delivery

    first = run(1)
    assert ledger.last_report("1.2.3", published=True) is None  # not delivered yet
    ledger.delivery_done(first)
    second = run(2)  # pending: the PACS still has run 1 only
    assert ledger.last_report("1.2.3").run == 2 and ledger.last_report("1.2.3", published=True).run == 1
    run(3)  # supersedes run 2 before it was ever sent
    assert ledger.delivery(second).state == "superseded"
    assert ledger.last_report("1.2.3", published=True).run == 1


def test_without_destinations_every_report_counts_as_published(ledger: Ledger) -> None:
    _add(ledger, "1")
    ledger.add_report(Report("1.2.3", 1, "/r1/SR.dcm", "9.9", None), ledger.study("1.2.3").generation, [], [])
    assert ledger.study("1.2.3").state == "done" and ledger.last_report("1.2.3", published=True).run == 1


def test_new_content_under_a_known_uid_reopens_the_study_and_another_study_is_refused(ledger: Ledger) -> None:
    _add(ledger, "1")
    study = ledger.study("1.2.3")
    assert study is not None
    ledger.set_state("1.2.3", StudyState.DONE)
    assert _add(ledger, "1", digest="d1") is Recorded.RESENT
    assert ledger.study("1.2.3").state is StudyState.DONE  # type: ignore[union-attr]
    assert _add(ledger, "1", digest="d2") is Recorded.REPLACED
    again = ledger.study("1.2.3")
    assert again is not None and again.state is StudyState.RECEIVING and again.generation == study.generation + 1
    assert _add(ledger, "1", study="9.8.7") is Recorded.OTHER_STUDY
    assert ledger.study("9.8.7") is None and ledger.instance("1.2.3.4", "1") == ("1.2.3", "d2")


def test_a_sop_instance_uid_repeated_in_another_series_is_another_instance(ledger: Ledger) -> None:
    """As in the RSNA Kaggle files: the same SOP Instance UID in every series of a study. Each is
    kept; re-send, replace and other-study hold per (series, SOP instance)."""
    assert _add(ledger, "7.1.1", study="7", series="7.10") is Recorded.NEW
    assert not ledger.sop_uid_repeats("7", "7.1.1")
    assert _add(ledger, "7.1.1", study="7", series="7.20", digest="other pixels") is Recorded.NEW
    assert ledger.sop_uid_repeats("7", "7.1.1")
    assert ledger.study("7").instances == 2 and len(ledger.instance_paths("7")) == 2
    assert _add(ledger, "7.1.1", study="7", series="7.20", digest="other pixels") is Recorded.RESENT
    assert _add(ledger, "7.1.1", study="7", series="7.10", digest="new") is Recorded.REPLACED
    assert ledger.instance("7.10", "7.1.1") == ("7", "new") and ledger.instance("7.20", "7.1.1") == ("7", "other pixels")
    assert _add(ledger, "7.1.1", study="8", series="7.20") is Recorded.OTHER_STUDY
    assert _add(ledger, "7.1.1", study="8", series="8.20") is Recorded.NEW  # its own series: not the other study's
    assert [(uid, n) for uid, n, *_ in ledger.series_counts("7")] == [("7.10", 1), ("7.20", 1)]


OLD_INSTANCES = """CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL, series_size INTEGER)"""


def test_an_older_ledger_keyed_by_sop_instance_uid_is_migrated_with_its_rows(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(OLD_INSTANCES)  # before the digest column and the (series, SOP instance) key
    db.execute("INSERT INTO instances VALUES ('5.1.1', '5', '5.10', '1.2.840.10008.5.1.4.1.1.4', '/s/5/5.1.1.dcm', "
               "'PACS', 1.0, 3)")
    db.commit()
    db.close()
    ledger = Ledger(path)
    try:
        assert ledger.migrated_instance_key
        assert ledger.instance("5.10", "5.1.1") == ("5", None)
        assert ledger.instance_paths("5") == [Path("/s/5/5.1.1.dcm")]
        assert ledger.record_instance("5.1.1", "5", "5.20", "1.2.840.10008.5.1.4.1.1.4", Path("/s/5/5.20/5.1.1.dcm"),
                                      "PACS", digest="d") is Recorded.NEW
        assert len(ledger.instance_paths("5")) == 2
    finally:
        ledger.close()
    again = Ledger(path)  # opened again: nothing left to migrate
    try:
        assert not again.migrated_instance_key and len(again.instance_paths("5")) == 2
    finally:
        again.close()
