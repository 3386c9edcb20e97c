"""The ledger: every received instance, every study's state, every report and every delivery, in
SQLite (WAL, synchronous=FULL), durable across restarts and kill -9.

A study goes receiving -> analysing -> sending -> done, or ends failed / skipped with a reason.
A new instance (re)opens its study as receiving and bumps its generation, so that a grading run
started before it arrived is recognised as stale and the study is graded again; the new report
then supersedes the previous one.

The schema is versioned (PRAGMA user_version) and brought up to date at open, in one
transaction, by the numbered steps of MIGRATIONS; a ledger of a newer version is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from dicom_node.errors import NodeError
from dicom_node.states import DeliveryState, EventKind, StudyState

#: The instances table, keyed by (series, SOP Instance UID): the RSNA Kaggle files repeat SOP
#: Instance UIDs across the series of a study.
INSTANCES_TABLE = """(
    sop_instance_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL,
    series_size INTEGER,
    digest TEXT,
    PRIMARY KEY (series_uid, sop_instance_uid)
)"""
INSTANCE_KEY = ("series_uid", "sop_instance_uid")
INSTANCE_COLUMNS = ("sop_instance_uid, study_uid, series_uid, sop_class_uid, path, calling_aet, received_at, "
                    "series_size, digest")
STUDY_COLUMNS = ("study_uid, state, reason, first_received, last_received, updated_at, generation, worker_deaths, "
                 "purged_at, purged")

# -- the schema, as numbered migrations ------------------------------------------------------------
# A ledger's version is its PRAGMA user_version: the number of the last migration applied. Ledgers
# of the releases before versioning are at 0, in whichever state their release left them (tables
# created, columns added and the key changed at open, without a record of it): so migrations 1-4
# check before they change. Later migrations start from a known version and need not.

_BASE_TABLES = f"""
CREATE TABLE IF NOT EXISTS instances {INSTANCES_TABLE};
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    updated_at REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    worker_deaths INTEGER NOT NULL DEFAULT 0,
    purged_at REAL,
    purged TEXT
);
CREATE TABLE IF NOT EXISTS reports (
    study_uid TEXT NOT NULL,
    run INTEGER NOT NULL,
    sr_path TEXT NOT NULL,
    sr_series_uid TEXT NOT NULL,
    sc_series_uid TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (study_uid, run)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    run INTEGER NOT NULL,
    destination TEXT NOT NULL,
    paths TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL
)
"""

# Columns that earlier ledgers lack, in the order they were added: (table, column, declaration).
_ADDED_COLUMNS = (("instances", "series_size", "INTEGER"), ("instances", "digest", "TEXT"),
                  ("studies", "generation", "INTEGER NOT NULL DEFAULT 0"),
                  ("studies", "worker_deaths", "INTEGER NOT NULL DEFAULT 0"),
                  ("studies", "purged_at", "REAL"), ("studies", "purged", "TEXT"))

_WEB_TABLES = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_study ON events (study_uid, kind, at);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS uploads (
    study_uid TEXT PRIMARY KEY,
    uploaded_by TEXT NOT NULL,
    uploaded_at REAL NOT NULL,
    send INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_newest_first ON studies (first_received, study_uid);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, first_received, study_uid)
"""


_PACS_QUERIES_TABLE = """
CREATE TABLE IF NOT EXISTS pacs_queries (
    study_uid TEXT PRIMARY KEY,
    asked_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    source TEXT,
    detail TEXT,
    finished_at REAL
)
"""


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Each statement of ``script`` in the open transaction (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _columns(db: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    return db.execute(f"PRAGMA table_info({table})").fetchall()


def _base_tables(db: sqlite3.Connection) -> None:
    _run_script(db, _BASE_TABLES)


def _added_columns(db: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        if column not in {row[1] for row in _columns(db, table)}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _instance_key(db: sqlite3.Connection) -> None:
    key = tuple(row[1] for row in sorted(_columns(db, "instances"), key=lambda r: r[5]) if row[5])
    if key == INSTANCE_KEY:
        return
    db.execute(f"CREATE TABLE instances_keyed {INSTANCES_TABLE}")
    db.execute(f"INSERT INTO instances_keyed ({INSTANCE_COLUMNS}) SELECT {INSTANCE_COLUMNS} FROM instances")
    db.execute("DROP TABLE instances")
    db.execute("ALTER TABLE instances_keyed RENAME TO instances")
    db.execute("CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid)")


def _web_tables(db: sqlite3.Connection) -> None:
    _run_script(db, _WEB_TABLES)


def _open_deliveries(db: sqlite3.Connection) -> None:
    present = {row[1] for row in _columns(db, "deliveries")}  # an unversioned ledger is migrated from step 1
    for column in ("sent", "open"):
        if column not in present:
            db.execute(f"ALTER TABLE deliveries ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


def _pacs_queries(db: sqlite3.Connection) -> None:
    _run_script(db, _PACS_QUERIES_TABLE)


@dataclass(frozen=True)
class Migration:
    """One step of the ledger's schema: applied to a ledger whose version is ``version`` - 1."""

    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


#: The ledger's schema, step by step; a ledger's version is the last one applied (PRAGMA user_version).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "instances, studies, reports and deliveries", _base_tables),
    Migration(2, "the columns added before versioning: series size, digest, generation, worker deaths, purge",
              _added_columns),
    Migration(3, "instances keyed by (series, SOP Instance UID)", _instance_key),
    Migration(4, "the audit trail, the web page's uploads and the dashboard's indexes", _web_tables),
    Migration(5, "the studies the node asked a query/retrieve source about (once each)", _pacs_queries),
    Migration(6, "deliveries in parts: the files sent so far, and whether more of the run's files follow",
              _open_deliveries),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class LedgerVersionError(NodeError, RuntimeError):
    """The ledger was written by a newer lumbar-node (its schema version is above this one's)."""


class Recorded(StrEnum):
    """What recording a received instance came to."""

    NEW = "new"
    RESENT = "resent"  # the same bytes again: nothing changes
    REPLACED = "replaced"  # the same (series, SOP Instance UID) with other bytes: the study is graded again
    OTHER_STUDY = "other study"  # the series' SOP Instance UID is already filed under another study: refused


class PacsAnswer(StrEnum):
    """What asking the query/retrieve sources about a study came to."""

    ASKING = "asking"  # asked, no answer recorded (the node stopped meanwhile)
    RETRIEVED = "retrieved"  # series retrieved (all the source had that the node lacked)
    NOTHING_MORE = "nothing more"  # the source holds the study but no series the node lacks
    NOT_FOUND = "not found"  # no source holds the study
    UNREACHABLE = "unreachable"  # no source could be asked (down, refused, failed)
    TIMED_OUT = "timed out"  # the retrieve did not finish within retrieve.wait_s
    FAILED = "retrieve failed"  # the source listed series the node lacks, and none of their instances came


class PacsQuery(NamedTuple):
    """A study the node asked its query/retrieve sources about: when, what came of it, from which
    source, and in words."""

    study_uid: str
    asked_at: float
    outcome: PacsAnswer
    source: str | None
    detail: str | None


class KnownInstance(NamedTuple):
    """A recorded instance: the study it is filed under and its content digest (None when recorded
    before digests were kept)."""

    study_uid: str
    digest: str | None


class InstanceRecord(NamedTuple):
    """A stored instance to record (``Ledger.record_instances``): keyed by (series, SOP Instance UID)."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    path: Path
    calling_aet: str
    series_size: int | None = None
    reopens: bool = True  # an image to grade: (re)opens its study; False: our own SR/SC coming back
    digest: str | None = None


class SeriesCount(NamedTuple):
    """A series of a study as received so far."""

    series_uid: str
    received: int  # instances received
    expected: int | None  # ImagesInAcquisition, when the sender gave it
    a_file: str  # one of its files (the first by path)


class Purgeable(NamedTuple):
    """A finished study old enough to purge, with the instance files the ledger holds."""

    study_uid: str
    files: list[Path]


@dataclass(frozen=True)
class Study:
    """A study as the ledger holds it."""

    study_uid: str
    state: StudyState
    reason: str | None
    instances: int
    last_received: float
    generation: int = 0


@dataclass(frozen=True)
class Report:
    """A finished grading run: its SR and the series of its results."""

    study_uid: str
    run: int
    sr_path: str
    sr_series_uid: str
    sc_series_uid: str | None


@dataclass(frozen=True)
class Delivery:
    """A run's results to one destination, with its attempts."""

    id: int
    study_uid: str
    run: int
    destination: str
    paths: list[str]
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    sent: int = 0  # the first ``sent`` paths are stored on the destination
    open: bool = False  # the run's report is recorded, its other files follow (``Ledger.complete_run``)


class DeliveryProgress(StrEnum):
    """Where a delivery stands after some of its files were stored (``Ledger.delivery_sent``)."""

    DELIVERED = "delivered"  # every file of the complete run
    OPEN = "open"  # all it holds, and the run's other files are not recorded yet
    MORE = "more"  # the run's other files were recorded meanwhile: send them
    GONE = "gone"  # no longer pending (superseded meanwhile)


class WriterLock:
    """The ledger's writers in turn across processes (the receiver processes, the node's own): an
    exclusive ``flock`` on a file beside the ledger, taken before ``BEGIN IMMEDIATE``. SQLite's own
    busy handler polls a held write lock with sleeps of 1, 2, 5, 10 ms and longer, so two processes
    committing often wait far longer than the commit takes; a blocked ``flock`` wakes the moment
    the lock is released. Without the file (a ledger folder the process may not write), SQLite's
    busy timeout alone serialises the writers, as before."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._tried = False

    def __enter__(self) -> WriterLock:
        if not self._tried:
            self._tried = True
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError:
                self._fd = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks without the interpreter lock
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Ledger:
    """Thread-safe SQLite ledger (one connection, serialised access, synchronous=FULL).
    ``migrated_from`` is the schema version the file had when opened (SCHEMA_VERSION: none to do)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # set once, by the first opener
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            self.migrated_from = self._migrate(path)
        except BaseException:
            self._db.close()
            raise
        # the look-ups of the receiving path (``instance``, ``sop_uid_repeats``) read on a connection of
        # their own: under WAL they see the last commit and wait neither for a writer nor its sync
        self._writers = WriterLock(path.with_name(path.name + "-writer.lock"))
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)

    def _migrate(self, path: Path) -> int:
        """Bring the ledger to SCHEMA_VERSION in one transaction (all steps or none); the version
        it had. LedgerVersionError, nothing changed, if a newer lumbar-node wrote it."""
        db = self._db
        version = self._version(path)
        if version == SCHEMA_VERSION:
            return version
        db.execute("BEGIN IMMEDIATE")  # one process migrates; another opening meanwhile waits, then finds it done
        try:
            version = self._version(path)
            for migration in MIGRATIONS:
                if migration.version > version:
                    migration.apply(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return version

    def _version(self, path: Path) -> int:
        """The ledger's schema version; LedgerVersionError if it is newer than this lumbar-node's."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise LedgerVersionError(
                f"{path}: the ledger's schema is version {version}, written by a newer lumbar-node; this one "
                f"knows versions up to {SCHEMA_VERSION}. Run the newer version, or point storage.ledger_path "
                "at another file.")
        return version

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()
            self._writers.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._writers:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """A query on the reading connection (the last commit; never waits for a writer)."""
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    # -- instances and studies --------------------------------------------------------------------

    def instance(self, series_uid: str, sop_instance_uid: str) -> KnownInstance | None:
        """The study and content digest of a recorded instance (a series' SOP instance), or None."""
        rows = self._read("SELECT study_uid, digest FROM instances WHERE series_uid=? AND sop_instance_uid=?",
                          (series_uid, sop_instance_uid))
        return KnownInstance(*rows[0]) if rows else None

    def sop_uid_repeats(self, study_uid: str, sop_instance_uid: str) -> bool:
        """Whether this SOP Instance UID is recorded in more than one series of the study (as the
        RSNA Kaggle files have it)."""
        rows = self._read("SELECT COUNT(DISTINCT series_uid) FROM instances WHERE study_uid=? AND sop_instance_uid=?",
                          (study_uid, sop_instance_uid))
        return int(rows[0][0]) > 1

    def record_instance(self, sop_instance_uid: str, study_uid: str, series_uid: str, sop_class_uid: str,
                        path: Path, calling_aet: str, series_size: int | None = None, reopens: bool = True,
                        digest: str | None = None) -> Recorded:
        """Record a stored instance, keyed by (series, SOP Instance UID).

        A new instance, or a known one with other content (``digest``), that ``reopens`` (an image
        to grade) sets its study back to receiving and bumps its generation; one that does not
        (our own SR/SC coming back) only creates the study row when the study is new. The same
        bytes again change nothing; a series' SOP Instance UID filed under another study is not
        recorded. The same SOP Instance UID in another series of the study is another instance.
        """
        return self.record_instances([InstanceRecord(sop_instance_uid, study_uid, series_uid, sop_class_uid, path,
                                                     calling_aet, series_size, reopens, digest)])[0]

    def record_instances(self, records: list[InstanceRecord]) -> list[Recorded]:
        """Record several stored instances in one transaction (one commit, one sync of the WAL), in
        order, each as ``record_instance`` would; what each came to. All or none: an error records none."""
        now = time.time()
        with self._transaction() as db:
            return [_record(db, record, now) for record in records]

    def set_state(self, study_uid: str, state: StudyState, reason: str | None = None,
                  generation: int | None = None) -> bool:
        """Set a study's state; with ``generation``, only if no instance arrived since. True if set."""
        sql = "UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?"
        args: tuple[object, ...] = (state, reason, time.time(), study_uid)
        if generation is not None:
            sql, args = sql + " AND generation=?", (*args, generation)
        with self._transaction() as db:
            return db.execute(sql, args).rowcount == 1

    def studies(self, states: tuple[StudyState, ...] | None = None, study_uid: str | None = None) -> list[Study]:
        """Every study (or those in ``states``, or the one ``study_uid``) with its instance count, oldest first."""
        conditions: list[str] = []
        args: list[object] = list(states or ())
        if states:
            conditions.append(f"s.state IN ({','.join('?' * len(states))})")
        if study_uid is not None:
            conditions.append("s.study_uid = ?")
            args.append(study_uid)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._query(
            "SELECT s.study_uid, s.state, s.reason, COUNT(i.sop_instance_uid), s.last_received, s.generation "
            f"FROM studies s LEFT JOIN instances i ON i.study_uid = s.study_uid {where} "
            "GROUP BY s.study_uid ORDER BY s.first_received", tuple(args))
        return [Study(uid, StudyState(state), *rest) for uid, state, *rest in rows]

    def study(self, study_uid: str) -> Study | None:
        found = self.studies(study_uid=study_uid)
        return found[0] if found else None

    def instance_paths(self, study_uid: str) -> list[Path]:
        rows = self._query("SELECT path FROM instances WHERE study_uid=? ORDER BY received_at", (study_uid,))
        return [Path(r[0]) for r in rows]

    def series_counts(self, study_uid: str) -> list[SeriesCount]:
        """Each series of a study: instances received, ImagesInAcquisition if sent, one file."""
        rows = self._query("SELECT series_uid, COUNT(*), MAX(series_size), MIN(path) FROM instances "
                           "WHERE study_uid=? GROUP BY series_uid", (study_uid,))
        return [SeriesCount(*row) for row in rows]

    def reopen(self, study_uid: str) -> bool:
        """Grade a known study again (after a failure, a skip or a model change). False if unknown."""
        with self._transaction() as db:
            return db.execute("UPDATE studies SET state=?, reason=NULL, generation=generation+1, worker_deaths=0, "
                              "updated_at=? WHERE study_uid=?",
                              (StudyState.RECEIVING, time.time(), study_uid)).rowcount == 1

    def resume(self) -> int:
        """After a restart: a study that was being graded is graded again. Returns how many. The
        pending deliveries of a run whose report was recorded before its other files were written
        (``open``) are superseded: the study's next run replaces that run (and supersedes its report
        where any of it reached a destination, see ``last_report``)."""
        with self._transaction() as db:
            _close_open(db, None, time.time())
            return db.execute("UPDATE studies SET state=?, updated_at=? WHERE state=?",
                              (StudyState.RECEIVING, time.time(), StudyState.ANALYSING)).rowcount

    def worker_died(self, study_uid: str, limit: int, reason: str) -> bool:
        """Count a grading worker that died while grading this study. At ``limit`` deaths the study
        fails with ``reason`` and is not graded again until ``reopen`` (True); before that it is
        queued to be graded once more (False)."""
        with self._transaction() as db:
            _close_open(db, study_uid, time.time())  # the run it died in is replaced, or the study fails
            db.execute("UPDATE studies SET worker_deaths=worker_deaths+1 WHERE study_uid=?", (study_uid,))
            row = db.execute("SELECT worker_deaths FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            given_up = row is not None and row[0] >= limit
            state, why = (StudyState.FAILED, reason) if given_up else (StudyState.RECEIVING, None)
            db.execute("UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?",
                       (state, why, time.time(), study_uid))
        return given_up

    def study_senders(self, study_uid: str) -> list[str]:
        """The calling AE titles (or source names) a study's instances came from, first sender first."""
        rows = self._query("SELECT calling_aet FROM instances WHERE study_uid=? GROUP BY calling_aet "
                           "ORDER BY MIN(received_at)", (study_uid,))
        return [str(r[0]) for r in rows]

    # -- query/retrieve: each study asked once ------------------------------------------------------

    def ask_pacs(self, study_uid: str) -> bool:
        """Record that the node asks the PACS about a study; False (nothing changed) if it did before."""
        with self._transaction() as db:
            return db.execute("INSERT INTO pacs_queries (study_uid, asked_at, outcome) VALUES (?, ?, ?) "
                              "ON CONFLICT(study_uid) DO NOTHING",
                              (study_uid, time.time(), PacsAnswer.ASKING)).rowcount == 1

    def pacs_answered(self, study_uid: str, outcome: PacsAnswer, source: str | None, detail: str) -> None:
        """Record what asking the PACS about a study came to."""
        with self._transaction() as db:
            db.execute("UPDATE pacs_queries SET outcome=?, source=?, detail=?, finished_at=? WHERE study_uid=?",
                       (outcome, source, detail, time.time(), study_uid))

    def pacs_query(self, study_uid: str) -> PacsQuery | None:
        """Whether (and with what outcome) the node asked the PACS about a study."""
        rows = self._query("SELECT study_uid, asked_at, outcome, source, detail FROM pacs_queries WHERE study_uid=?",
                           (study_uid,))
        if not rows:
            return None
        uid, asked_at, outcome, source, detail = rows[0]
        return PacsQuery(uid, asked_at, PacsAnswer(outcome), source, detail)

    # -- retention -----------------------------------------------------------------------------------

    def purgeable(self, received_before: float) -> list[Purgeable]:
        """Finished studies (done, failed, skipped) with files, whose last instance came before
        ``received_before``, oldest first, with the instance files the ledger holds."""
        finished = (StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED)
        rows = self._query("SELECT s.study_uid, i.path FROM studies s JOIN instances i ON i.study_uid = s.study_uid "
                           f"WHERE s.state IN ({','.join('?' * len(finished))}) AND s.last_received < ? "
                           "ORDER BY s.last_received, s.study_uid", (*finished, received_before))
        out: dict[str, list[Path]] = {}
        for study_uid, path in rows:
            out.setdefault(study_uid, []).append(Path(path))
        return [Purgeable(study_uid, files) for study_uid, files in out.items()]

    def purged(self, study_uid: str, files: list[Path], what: str) -> None:
        """Record a purge: the instances whose files were removed are forgotten (a re-send is new
        again), the study keeps its line with what was purged and when."""
        now = time.time()
        with self._transaction() as db:
            db.executemany("DELETE FROM instances WHERE study_uid=? AND path=?",
                           [(study_uid, str(p)) for p in files])
            db.execute("UPDATE studies SET purged_at=?, purged=? WHERE study_uid=?", (now, what, study_uid))

    # -- reports and deliveries ---------------------------------------------------------------------

    def last_report(self, study_uid: str, published: bool = False) -> Report | None:
        """The newest report of a study; with ``published``, the newest that a destination has (or
        that had no destination to go to; or part of whose files, its SR first, a destination has):
        the one a new report supersedes."""
        where = ("AND (EXISTS (SELECT 1 FROM deliveries d WHERE d.study_uid=r.study_uid AND d.run=r.run "
                 "AND (d.state=? OR d.sent > 0)) "
                 "OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.study_uid=r.study_uid AND d.run=r.run))"
                 ) if published else ""
        rows = self._query("SELECT study_uid, run, sr_path, sr_series_uid, sc_series_uid FROM reports r "
                           f"WHERE study_uid=? {where} ORDER BY run DESC LIMIT 1",
                           (study_uid, DeliveryState.DELIVERED) if published else (study_uid,))
        return Report(*rows[0]) if rows else None

    def add_report(self, report: Report, generation: int, destinations: list[str],
                   paths: list[str], more: bool = False) -> list[int] | None:
        """Commit a finished run: the report, one pending delivery per destination (their ids), the
        study 'sending'; earlier undelivered results are superseded. Nothing (None) if the study
        was re-opened by a late instance meanwhile.

        With ``more``, only the report is written yet (``paths``: the SR, on disk): its deliveries
        are ``open`` (sent as far as they go, never delivered while open) and the study stays
        'analysing' until ``complete_run`` adds the run's other files."""
        now = time.time()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM studies WHERE study_uid=? AND generation=?",
                          (report.study_uid, generation)).fetchone() is None:
                return None
            db.execute("INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, ?, ?)",
                       (report.study_uid, report.run, report.sr_path, report.sr_series_uid, report.sc_series_uid, now))
            ids = _queue_deliveries(db, report.study_uid, report.run, destinations, paths, now, is_open=more)
            if not more:
                state = StudyState.SENDING if destinations else StudyState.DONE
                db.execute("UPDATE studies SET state=?, reason=NULL, updated_at=? WHERE study_uid=?",
                           (state, now, report.study_uid))
        return ids

    def complete_run(self, study_uid: str, run: int, generation: int, paths: list[str]) -> list[int]:
        """Commit the rest of a run recorded with ``add_report(more=True)``: its open deliveries
        still pending now hold every file (``paths``, on disk, the SR first) and are no longer
        open (their ids: schedule them). The study, unless a late instance re-opened it meanwhile,
        is 'sending' while a delivery of it is pending, else 'failed' if one of the run's failed
        for good, else 'done'. The report itself stays, whatever the generation: it may be on a
        destination already, and the study's next run supersedes it."""
        now = time.time()
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM deliveries WHERE study_uid=? AND run=? AND open=1 "
                                            "AND state=? ORDER BY id", (study_uid, run, DeliveryState.PENDING))]
            db.execute("UPDATE deliveries SET paths=?, open=0, updated_at=? WHERE study_uid=? AND run=? AND open=1 "
                       "AND state=?", (json.dumps(paths), now, study_uid, run, DeliveryState.PENDING))
            db.execute("UPDATE deliveries SET open=0 WHERE study_uid=? AND run=? AND open=1", (study_uid, run))
            if db.execute("SELECT 1 FROM studies WHERE study_uid=? AND generation=?",
                          (study_uid, generation)).fetchone() is None:
                return ids
            failed = db.execute("SELECT destination, attempts, last_error FROM deliveries WHERE study_uid=? "
                                "AND run=? AND state=? ORDER BY id LIMIT 1",
                                (study_uid, run, DeliveryState.FAILED)).fetchone()
            pending = db.execute("SELECT 1 FROM deliveries WHERE study_uid=? AND state=?",
                                 (study_uid, DeliveryState.PENDING)).fetchone()
            state, reason = StudyState.DONE, None
            if pending is not None:
                state = StudyState.SENDING
            elif failed is not None:
                state, reason = StudyState.FAILED, f"delivery to {failed[0]} failed after {failed[1]} attempts: " \
                                                   f"{failed[2]}"
            db.execute("UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?",
                       (state, reason, now, study_uid))
        return ids

    def abandon_run(self, study_uid: str) -> None:
        """The grading of a run recorded with ``add_report(more=True)`` failed before its other
        files were written: its pending open deliveries are superseded (what of them reached a
        destination stays there, and the study's next run supersedes it)."""
        with self._transaction() as db:
            _close_open(db, study_uid, time.time())

    def deliveries(self, study_uid: str | None = None, state: DeliveryState | None = None,
                   delivery_id: int | None = None) -> list[Delivery]:
        """Deliveries, optionally of one study, in one state, or the one with this id."""
        sql = ("SELECT id, study_uid, run, destination, paths, state, attempts, next_attempt_at, last_error, "
               "sent, open FROM deliveries WHERE 1=1")
        args: list[object] = []
        for column, value in (("study_uid", study_uid), ("state", state), ("id", delivery_id)):
            if value is not None:
                sql, args = sql + f" AND {column}=?", [*args, value]
        rows = self._query(sql + " ORDER BY id", tuple(args))
        return [Delivery(r[0], r[1], r[2], r[3], json.loads(r[4]), DeliveryState(r[5]), r[6], r[7], r[8], r[9],
                         bool(r[10])) for r in rows]

    def delivery(self, delivery_id: int) -> Delivery | None:
        found = self.deliveries(delivery_id=delivery_id)
        return found[0] if found else None

    def delivery_done(self, delivery_id: int) -> None:
        """Mark a delivery delivered; the study is done when none of its deliveries is pending."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=NULL, updated_at=? "
                       "WHERE id=? AND state=?", (DeliveryState.DELIVERED, now, delivery_id, DeliveryState.PENDING))
            study_uid = db.execute("SELECT study_uid FROM deliveries WHERE id=?", (delivery_id,)).fetchone()[0]
            pending = db.execute("SELECT 1 FROM deliveries WHERE study_uid=? AND state=?",
                                 (study_uid, DeliveryState.PENDING)).fetchone()
            if pending is None:
                db.execute("UPDATE studies SET state=?, reason=NULL, updated_at=? WHERE study_uid=? AND state=?",
                           (StudyState.DONE, now, study_uid, StudyState.SENDING))

    def delivery_sent(self, delivery_id: int, sent: int) -> DeliveryProgress:
        """Record that the first ``sent`` paths of a pending delivery are stored on its destination:
        delivered (as ``delivery_done``) when that is all of them and the run is complete; else
        ``OPEN`` (the rest of the run is not recorded yet) or ``MORE`` (it is: send the rest)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT paths, open, state FROM deliveries WHERE id=?", (delivery_id,)).fetchone()
            if row is None or row[2] != DeliveryState.PENDING:
                return DeliveryProgress.GONE
            db.execute("UPDATE deliveries SET sent=MAX(sent, ?), last_error=NULL, updated_at=? WHERE id=?",
                       (sent, now, delivery_id))
            if row[1]:
                return DeliveryProgress.OPEN
            if sent < len(json.loads(row[0])):
                return DeliveryProgress.MORE
        self.delivery_done(delivery_id)
        return DeliveryProgress.DELIVERED

    def delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: retry at ``next_attempt_at``, or (None) give up and fail the study."""
        now = time.time()
        with self._transaction() as db:
            delivery_state = DeliveryState.PENDING if next_attempt_at is not None else DeliveryState.FAILED
            db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?, next_attempt_at=?, "
                       "updated_at=? WHERE id=? AND state=?",
                       (delivery_state, error, next_attempt_at or now, now, delivery_id, DeliveryState.PENDING))
            study_uid, destination, attempts = db.execute(
                "SELECT study_uid, destination, attempts FROM deliveries WHERE id=?", (delivery_id,)).fetchone()
            if next_attempt_at is None:
                study_state = StudyState.FAILED
                reason = f"delivery to {destination} failed after {attempts} attempts: {error}"
            else:
                when = time.strftime("%H:%M:%S", time.gmtime(next_attempt_at))
                study_state = StudyState.SENDING
                reason = f"delivery to {destination}: attempt {attempts} failed ({error}); retry {when} UTC"
            db.execute("UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=? AND state=?",
                       (study_state, reason, now, study_uid, StudyState.SENDING))

    # -- audit trail, uploads and the dashboard (read by the web page) ------------------------------

    def add_event(self, kind: EventKind, actor: str, study_uid: str | None = None, detail: str | None = None,
                  data: dict[str, Any] | None = None) -> None:
        """Write one line of the audit trail: what happened (``kind``), who did it (``actor``: a
        user name, a calling AE title, or "node"), to which study, in words (``detail``) and as
        plain data (``data``). Never patient data."""
        with self._transaction() as db:
            db.execute("INSERT INTO events (study_uid, at, kind, actor, detail, data) VALUES (?, ?, ?, ?, ?, ?)",
                       (study_uid, time.time(), kind, actor, detail, json.dumps(data) if data is not None else None))

    def events(self, study_uid: str | None = None, limit: int = 500) -> list[Event]:
        """A study's audit trail, oldest first; without ``study_uid``, the newest ``limit`` events of all."""
        columns = "id, study_uid, at, kind, actor, detail, data"
        if study_uid is not None:
            rows = self._query(f"SELECT {columns} FROM events WHERE study_uid=? ORDER BY id LIMIT ?",
                               (study_uid, limit))
        else:
            rows = self._query(f"SELECT {columns} FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [Event(r[0], r[1], r[2], EventKind(r[3]), r[4], r[5], json.loads(r[6]) if r[6] else None) for r in rows]

    def add_upload(self, study_uid: str, user: str, send: bool = False) -> bool:
        """Mark a study as uploaded through the web page by ``user`` (sent to the PACS only with
        ``send``); a study already marked keeps its first uploader. True if it was not marked."""
        with self._transaction() as db:
            return db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?) ON CONFLICT(study_uid) DO NOTHING",
                              (study_uid, user, time.time(), int(send))).rowcount == 1

    def upload(self, study_uid: str) -> Upload | None:
        """How a study came through the web page's upload, or None (it came over DICOM)."""
        rows = self._query("SELECT study_uid, uploaded_by, uploaded_at, send FROM uploads WHERE study_uid=?",
                           (study_uid,))
        return Upload(rows[0][0], rows[0][1], rows[0][2], bool(rows[0][3])) if rows else None

    def set_upload_send(self, study_uid: str, send: bool) -> bool:
        """Whether an uploaded study's results go to the destinations. False if it is not an upload."""
        with self._transaction() as db:
            return db.execute("UPDATE uploads SET send=? WHERE study_uid=?", (int(send), study_uid)).rowcount == 1

    def add_deliveries(self, study_uid: str, run: int, destinations: list[str], paths: list[str]) -> list[int]:
        """Send a run's results (again): one new pending delivery per destination (their ids), the
        study 'sending'; pending deliveries of the study are superseded by these."""
        now = time.time()
        with self._transaction() as db:
            ids = _queue_deliveries(db, study_uid, run, destinations, paths, now)
            if destinations:
                db.execute("UPDATE studies SET state=?, reason=NULL, updated_at=? WHERE study_uid=?",
                           (StudyState.SENDING, now, study_uid))
        return ids

    def state_counts(self) -> dict[StudyState, int]:
        """How many studies are in each state (every state listed, zero included)."""
        counts = dict.fromkeys(StudyState, 0)
        for state, n in self._query("SELECT state, COUNT(*) FROM studies GROUP BY state"):
            counts[StudyState(state)] = n
        return counts

    def dashboard(self, state: StudyState | None = None, search: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[StudyRow], int]:
        """One page of studies, newest first, in ``state`` and/or whose Study Instance UID contains
        ``search``, with their counts and times; and how many studies match in all."""
        conditions, args = [], []
        if state is not None:
            conditions.append("s.state = ?")
            args.append(str(state))
        if search:
            conditions.append("s.study_uid LIKE ? ESCAPE '\\'")
            args.append("%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        latest = "(SELECT MAX(at) FROM events e WHERE e.study_uid = s.study_uid AND e.kind = ?)"
        rows = self._query(
            "SELECT s.study_uid, s.state, s.reason, s.first_received, s.last_received, "
            "(SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid), "
            "(SELECT COUNT(DISTINCT series_uid) FROM instances i WHERE i.study_uid = s.study_uid), "
            f"{latest}, {latest}, {latest}, "
            "(SELECT data FROM events e WHERE e.study_uid = s.study_uid AND e.kind = ? ORDER BY at DESC LIMIT 1), "
            "u.uploaded_by FROM (SELECT s.study_uid FROM studies s "  # the page first (on the index), then its details
            f"{where} ORDER BY s.first_received DESC, s.study_uid DESC LIMIT ? OFFSET ?) page "
            "JOIN studies s ON s.study_uid = page.study_uid LEFT JOIN uploads u ON u.study_uid = s.study_uid "
            "ORDER BY s.first_received DESC, s.study_uid DESC",
            (EventKind.RELEASED, EventKind.GRADED, EventKind.DELIVERED, EventKind.GRADED, *args, limit, offset))
        total = self._query(f"SELECT COUNT(*) FROM studies s {where}", tuple(args))[0][0]
        out = []
        for (study_uid, state_value, reason, first_received, last_received, instances, series, released_at,
             graded_at, delivered_at, graded, uploaded_by) in rows:
            roles = json.loads(graded).get("series_roles", {}) if graded else {}
            out.append(StudyRow(study_uid, StudyState(state_value), reason, instances, series, first_received,
                                last_received, released_at, graded_at, delivered_at, roles, uploaded_by))
        return out, total


def _record(db: sqlite3.Connection, record: InstanceRecord, now: float) -> Recorded:
    """One instance's rows, in the open transaction (``Ledger.record_instances``)."""
    row = db.execute("SELECT study_uid, digest FROM instances WHERE series_uid=? AND sop_instance_uid=?",
                     (record.series_uid, record.sop_instance_uid)).fetchone()
    known = KnownInstance(*row) if row is not None else None
    if known is not None and known.study_uid != record.study_uid:
        return Recorded.OTHER_STUDY
    if known is not None and (record.digest is None or known.digest == record.digest):
        return Recorded.RESENT
    outcome = Recorded.NEW if known is None else Recorded.REPLACED
    db.execute(f"INSERT OR REPLACE INTO instances ({INSTANCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (record.sop_instance_uid, record.study_uid, record.series_uid, record.sop_class_uid, str(record.path),
                record.calling_aet, now, record.series_size, record.digest))
    new_study = f"INTO studies ({STUDY_COLUMNS}) VALUES (?, ?, NULL, ?, ?, ?, 1, 0, NULL, NULL)"
    if record.reopens:
        db.execute(f"INSERT {new_study} "
                   "ON CONFLICT(study_uid) DO UPDATE SET state=excluded.state, reason=NULL, "
                   "last_received=excluded.last_received, updated_at=excluded.updated_at, "
                   "generation=studies.generation + 1", (record.study_uid, StudyState.RECEIVING, now, now, now))
    else:
        db.execute(f"INSERT OR IGNORE {new_study}", (record.study_uid, StudyState.RECEIVING, now, now, now))
    return outcome


def _queue_deliveries(db: sqlite3.Connection, study_uid: str, run: int, destinations: list[str], paths: list[str],
                      now: float, is_open: bool = False) -> list[int]:
    """In the caller's transaction: the study's pending deliveries superseded, one new pending
    delivery of run ``run`` (``paths``, in the order sent; ``is_open``: more follow) per destination;
    their ids."""
    db.execute("UPDATE deliveries SET state=?, open=0, updated_at=? WHERE study_uid=? AND state=?",
               (DeliveryState.SUPERSEDED, now, study_uid, DeliveryState.PENDING))
    ids = []
    for name in destinations:
        row_id = db.execute("INSERT INTO deliveries (study_uid, run, destination, paths, state, next_attempt_at, "
                            "updated_at, open) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (study_uid, run, name, json.dumps(paths), DeliveryState.PENDING, now, now,
                             int(is_open))).lastrowid
        if row_id is None:  # sqlite3 sets it after every INSERT of a row; None would be a broken driver
            raise RuntimeError("the ledger's INSERT returned no delivery id")
        ids.append(row_id)
    return ids


def _close_open(db: sqlite3.Connection, study_uid: str | None, now: float) -> None:
    """In the caller's transaction: the open deliveries (of one study, or all) closed, the pending
    ones superseded (their run's other files will not be written)."""
    where, args = ("AND study_uid=?", (study_uid,)) if study_uid is not None else ("", ())
    db.execute(f"UPDATE deliveries SET state=?, updated_at=? WHERE open=1 AND state=? {where}",
               (DeliveryState.SUPERSEDED, now, DeliveryState.PENDING, *args))
    db.execute(f"UPDATE deliveries SET open=0 WHERE open=1 {where}", args)


@dataclass(frozen=True)
class Event:
    """One line of the audit trail."""

    id: int
    study_uid: str | None
    at: float
    kind: EventKind
    actor: str
    detail: str | None
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Upload:
    """A study that came through the web page's upload."""

    study_uid: str
    uploaded_by: str
    uploaded_at: float
    send: bool


@dataclass(frozen=True)
class StudyRow:
    """A study as the dashboard lists it: state, counts, the series roles of its last grading, times."""

    study_uid: str
    state: StudyState
    reason: str | None
    instances: int
    series: int
    first_received: float
    last_received: float
    released_at: float | None
    graded_at: float | None
    delivered_at: float | None
    series_roles: dict[str, list[str]]
    uploaded_by: str | None
