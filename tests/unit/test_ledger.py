"""The ledger's state machine (unit tests on a real SQLite file)."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage

from dicom_node.config import DeliverySettings
from dicom_node.pipeline.delivery import backoff
from dicom_node.states import EventKind, StudyState
from dicom_node.store import ledger as ledger_module
from dicom_node.store.ledger import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Ledger,
    LedgerVersionError,
    Migration,
    Recorded,
    Report,
)


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
    done = ledger.study("1.2.3")
    assert done is not None and done.state is StudyState.DONE
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
    assert ledger.instance("7.10", "7.1.1") == ("7", "new")
    assert ledger.instance("7.20", "7.1.1") == ("7", "other pixels")
    assert _add(ledger, "7.1.1", study="8", series="7.20") is Recorded.OTHER_STUDY
    assert _add(ledger, "7.1.1", study="8", series="8.20") is Recorded.NEW  # its own series: not the other study's
    assert [(uid, n) for uid, n, *_ in ledger.series_counts("7")] == [("7.10", 1), ("7.20", 1)]


# -- the versioned schema -------------------------------------------------------------------------
# The schemas of the releases before versioning (user_version 0), as their ledger.py created them:
# each later one added to the one before at open (columns, then tables), without a version.
FIRST_RELEASE = """
CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, calling_aet TEXT NOT NULL, received_at REAL NOT NULL,
    series_size INTEGER);
CREATE INDEX instances_by_study ON instances (study_uid);
CREATE TABLE studies (study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT, first_received REAL NOT NULL,
    last_received REAL NOT NULL, updated_at REAL NOT NULL, generation INTEGER NOT NULL DEFAULT 0);
CREATE TABLE reports (study_uid TEXT NOT NULL, run INTEGER NOT NULL, sr_path TEXT NOT NULL,
    sr_series_uid TEXT NOT NULL, sc_series_uid TEXT, created_at REAL NOT NULL, PRIMARY KEY (study_uid, run));
CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL, run INTEGER NOT NULL,
    destination TEXT NOT NULL, paths TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, last_error TEXT, updated_at REAL NOT NULL);
"""
HOSTILE_INPUT = """
ALTER TABLE instances ADD COLUMN digest TEXT;
ALTER TABLE studies ADD COLUMN worker_deaths INTEGER NOT NULL DEFAULT 0;
"""
DATA_PROTECTION = """
ALTER TABLE studies ADD COLUMN purged_at REAL;
ALTER TABLE studies ADD COLUMN purged TEXT;
"""
WEB_PAGE = """
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT, at REAL NOT NULL, kind TEXT NOT NULL,
    actor TEXT NOT NULL, detail TEXT, data TEXT);
CREATE INDEX events_by_study ON events (study_uid, kind, at);
CREATE INDEX events_by_time ON events (at);
CREATE TABLE uploads (study_uid TEXT PRIMARY KEY, uploaded_by TEXT NOT NULL, uploaded_at REAL NOT NULL,
    send INTEGER NOT NULL DEFAULT 0);
"""
SERIES_KEY = """
CREATE TABLE instances_keyed (sop_instance_uid TEXT NOT NULL, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, calling_aet TEXT NOT NULL, received_at REAL NOT NULL,
    series_size INTEGER, digest TEXT, PRIMARY KEY (series_uid, sop_instance_uid));
INSERT INTO instances_keyed SELECT * FROM instances;
DROP TABLE instances;
ALTER TABLE instances_keyed RENAME TO instances;
CREATE INDEX instances_by_study ON instances (study_uid);
CREATE INDEX studies_newest_first ON studies (first_received, study_uid);
CREATE INDEX studies_by_state ON studies (state, first_received, study_uid);
"""
RELEASES = {"first release": [FIRST_RELEASE], "hostile input": [FIRST_RELEASE, HOSTILE_INPUT],
            "data protection": [FIRST_RELEASE, HOSTILE_INPUT, DATA_PROTECTION],
            "web page": [FIRST_RELEASE, HOSTILE_INPUT, DATA_PROTECTION, WEB_PAGE],
            "series key": [FIRST_RELEASE, HOSTILE_INPUT, DATA_PROTECTION, WEB_PAGE, SERIES_KEY]}


def _old_ledger(path: Path, scripts: list[str]) -> None:
    """A ledger as an earlier release left it, with a study of two series (the same SOP Instance UID
    in one: not possible before the series key), a report and its delivery."""
    db = sqlite3.connect(path)
    for script in scripts:
        db.executescript(script)
    db.execute("INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, path, calling_aet, "
               "received_at, series_size) VALUES ('5.1.1', '5', '5.10', ?, '/s/5/5.10/5.1.1.dcm', 'PACS', 1.0, 3)",
               (MRImageStorage,))
    db.execute("INSERT INTO studies (study_uid, state, reason, first_received, last_received, updated_at, generation) "
               "VALUES ('5', 'sending', NULL, 1.0, 2.0, 3.0, 4)")
    db.execute("INSERT INTO reports VALUES ('5', 1, '/r/5/run-1/SR_9.dcm', '9.1', '9.2', 5.0)")
    db.execute("INSERT INTO deliveries (study_uid, run, destination, paths, state, next_attempt_at, updated_at) "
               "VALUES ('5', 1, 'pacs', '[\"/r/5/run-1/SR_9.dcm\"]', 'pending', 6.0, 6.0)")
    db.commit()
    db.close()


def _schema(path: Path) -> dict[str, object]:
    """Every table's columns (name, type, not null, default, key) and the index names."""
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                           "WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        schema: dict[str, object] = {t: sorted(r[1:] for r in db.execute(f"PRAGMA table_info({t})")) for t in tables}
        schema["indexes"] = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                                            "AND name NOT LIKE 'sqlite_%'"))
        schema["version"] = db.execute("PRAGMA user_version").fetchone()[0]
    return schema


def test_a_new_ledger_is_at_the_latest_version(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    ledger = Ledger(path)
    ledger.close()
    assert ledger.migrated_from == 0 and _schema(path)["version"] == SCHEMA_VERSION == MIGRATIONS[-1].version
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    again = Ledger(path)
    again.close()
    assert again.migrated_from == SCHEMA_VERSION


@pytest.mark.parametrize("release", list(RELEASES))
def test_a_ledger_of_an_earlier_release_is_migrated_with_its_rows(tmp_path: Path, release: str) -> None:
    path = tmp_path / "old.sqlite"
    _old_ledger(path, RELEASES[release])
    ledger = Ledger(path)
    try:
        assert ledger.migrated_from == 0
        assert ledger.instance("5.10", "5.1.1") == ("5", None)
        assert ledger.instance_paths("5") == [Path("/s/5/5.10/5.1.1.dcm")]
        study = ledger.study("5")
        assert study is not None and (study.state, study.instances, study.generation) == (StudyState.SENDING, 1, 4)
        assert ledger.last_report("5") == Report("5", 1, "/r/5/run-1/SR_9.dcm", "9.1", "9.2")
        [delivery] = ledger.deliveries("5")
        assert (delivery.destination, delivery.paths, delivery.state) == ("pacs", ["/r/5/run-1/SR_9.dcm"], "pending")
        # and it works as a new one does: the SOP Instance UID again in another series, a new study, the audit trail
        assert ledger.record_instance("5.1.1", "5", "5.20", MRImageStorage, Path("/s/5/5.20/5.1.1.dcm"), "PACS",
                                      digest="d") is Recorded.NEW
        assert _add(ledger, "6.1.1", study="6", series="6.10") is Recorded.NEW
        new = ledger.study("6")
        assert len(ledger.instance_paths("5")) == 2 and new is not None and new.generation == 1
        ledger.add_event(EventKind.GRADED, "node", "5", "run 1")
        assert [e.kind for e in ledger.events("5")] == [EventKind.GRADED]
    finally:
        ledger.close()
    fresh = tmp_path / "fresh.sqlite"
    Ledger(fresh).close()
    assert _schema(path) == _schema(fresh)
    again = Ledger(path)  # opened again: nothing left to migrate
    try:
        assert again.migrated_from == SCHEMA_VERSION and len(again.instance_paths("5")) == 2
    finally:
        again.close()


def test_a_ledger_of_a_newer_version_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite"
    Ledger(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = _schema(path)
    with pytest.raises(LedgerVersionError, match=f"version {SCHEMA_VERSION + 1}, written by a newer lumbar-node"):
        Ledger(path)
    assert _schema(path) == before


def test_a_migration_that_fails_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps run in one transaction: a failing step leaves the earlier ones undone too."""
    path = tmp_path / "old.sqlite"
    _old_ledger(path, [FIRST_RELEASE])
    before = _schema(path)

    def fails(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk I/O error")

    broken = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "a step that fails", fails))
    monkeypatch.setattr(ledger_module, "MIGRATIONS", broken)
    monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        Ledger(path)
    assert _schema(path) == before
    monkeypatch.undo()
    ledger = Ledger(path)  # the working steps, once the failure is gone
    try:
        assert ledger.migrated_from == 0 and ledger.instance("5.10", "5.1.1") == ("5", None)
    finally:
        ledger.close()


def test_rows_come_back_with_named_fields(ledger: Ledger) -> None:
    _add(ledger, "1", digest="d1")
    _add(ledger, "2", digest="d2")
    known = ledger.instance("1.2.3.4", "1")
    assert known is not None and (known.study_uid, known.digest) == ("1.2.3", "d1") and known[0] == "1.2.3"
    [series] = ledger.series_counts("1.2.3")
    assert (series.series_uid, series.received, series.expected) == ("1.2.3.4", 2, 3)
    assert series.a_file == "/spool/1.2.3/1.2.3.4/1.dcm" and series[3] == series.a_file
    ledger.set_state("1.2.3", StudyState.DONE)
    [old] = ledger.purgeable(time.time() + 1)
    assert old.study_uid == "1.2.3" and sorted(old.files) == [Path("/spool/1.2.3/1.2.3.4/1.dcm"),
                                                              Path("/spool/1.2.3/1.2.3.4/2.dcm")]
    _study_uid, files = old
    assert files == old.files


def _ahead(ledger: Ledger, destinations: list[str]) -> tuple[int, list[int]]:
    """A study being graded whose run's report is recorded ahead of the rest: its generation, deliveries."""
    _add(ledger, "1")
    study = ledger.study("1.2.3")
    assert ledger.set_state("1.2.3", StudyState.ANALYSING, generation=study.generation)
    ids = ledger.add_report(Report("1.2.3", 1, "/r/SR.dcm", "9.9", "9.8"), study.generation, destinations,
                            ["/r/SR.dcm"], more=True)
    assert ids is not None
    return study.generation, ids


def test_a_report_ahead_of_its_run_is_sent_but_delivered_only_with_the_rest(ledger: Ledger) -> None:
    generation, [d] = _ahead(ledger, ["pacs"])
    assert ledger.study("1.2.3").state == "analysing" and ledger.delivery(d).open
    assert ledger.delivery_sent(d, 1) == "open"  # the SR is stored; the run is not complete
    assert ledger.delivery(d).state == "pending" and ledger.study("1.2.3").state == "analysing"
    assert ledger.last_report("1.2.3", published=True).run == 1  # the PACS has its SR: a re-run supersedes it
    files = ["/r/SR.dcm", "/r/SC/01.dcm", "/r/PDF.dcm"]
    assert ledger.complete_run("1.2.3", 1, generation, files) == [d]
    delivery = ledger.delivery(d)
    assert not delivery.open and delivery.paths == files and delivery.sent == 1
    assert ledger.study("1.2.3").state == "sending"
    assert ledger.delivery_sent(d, 3) == "delivered"
    assert ledger.delivery(d).state == "delivered" and ledger.study("1.2.3").state == "done"


def test_the_rest_recorded_while_the_report_is_sent_is_sent_next(ledger: Ledger) -> None:
    generation, [d] = _ahead(ledger, ["pacs"])
    ledger.complete_run("1.2.3", 1, generation, ["/r/SR.dcm", "/r/SC/01.dcm"])  # while the SR was on its way
    assert ledger.delivery_sent(d, 1) == "more" and ledger.delivery(d).state == "pending"


def test_an_open_delivery_that_failed_for_good_fails_the_study_when_the_run_completes(ledger: Ledger) -> None:
    generation, [d] = _ahead(ledger, ["pacs"])
    ledger.delivery_failed(d, "association rejected", None)
    assert ledger.study("1.2.3").state == "analysing"  # still grading
    assert ledger.complete_run("1.2.3", 1, generation, ["/r/SR.dcm", "/r/SC/01.dcm"]) == []
    study = ledger.study("1.2.3")
    assert study.state == "failed" and study.reason == "delivery to pacs failed after 1 attempts: association rejected"


def test_a_run_cut_off_after_its_report_is_superseded_at_restart_and_regraded(ledger: Ledger) -> None:
    _, [d] = _ahead(ledger, ["pacs"])
    assert ledger.resume() == 1 and ledger.study("1.2.3").state == "receiving"
    assert ledger.delivery(d).state == "superseded" and not ledger.delivery(d).open
    assert ledger.last_report("1.2.3", published=True) is None  # none of it reached the PACS


def test_a_failed_or_killed_grading_after_its_report_supersedes_the_open_deliveries(ledger: Ledger) -> None:
    _, [d] = _ahead(ledger, ["pacs"])
    ledger.abandon_run("1.2.3")
    assert ledger.delivery(d).state == "superseded"
    ledger.reopen("1.2.3")
    _, [e] = _ahead(ledger, ["pacs"])
    assert not ledger.worker_died("1.2.3", 3, "died") and ledger.delivery(e).state == "superseded"


def test_a_late_instance_while_the_rest_is_drawn_leaves_the_study_to_its_next_run(ledger: Ledger) -> None:
    generation, [d] = _ahead(ledger, ["pacs"])
    _add(ledger, "2")
    assert ledger.complete_run("1.2.3", 1, generation, ["/r/SR.dcm", "/r/SC/01.dcm"]) == [d]
    assert ledger.study("1.2.3").state == "receiving"  # graded again; the next run supersedes this one


def test_without_destinations_a_run_ahead_is_done_when_complete(ledger: Ledger) -> None:
    generation, ids = _ahead(ledger, [])
    assert ids == [] and ledger.study("1.2.3").state == "analysing"
    assert ledger.complete_run("1.2.3", 1, generation, ["/r/SR.dcm"]) == []
    assert ledger.study("1.2.3").state == "done"
