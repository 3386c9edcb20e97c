"""The ledger: every received instance and every study's state, in SQLite (WAL), durable across
restarts. States: receiving -> stable -> analysing -> reported -> sending -> done, or failed/skipped
with a reason."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StudyState:
    study_uid: str
    state: str
    reason: str | None
    instances: int
    last_received: float


class Ledger:
    """Thread-safe SQLite ledger (one connection, serialised writes, synchronous=FULL)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record_instance(self, sop_instance_uid: str, study_uid: str, series_uid: str, sop_class_uid: str,
                        path: Path, calling_aet: str) -> bool:
        """Record a stored instance; (re)open its study as receiving. False if it was already known."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (sop_instance_uid, study_uid, series_uid, sop_class_uid, str(path), calling_aet, now))
                self._db.execute(
                    "INSERT INTO studies VALUES (?, 'receiving', NULL, ?, ?, ?) "
                    "ON CONFLICT(study_uid) DO UPDATE SET state='receiving', reason=NULL, "
                    "last_received=excluded.last_received, updated_at=excluded.updated_at",
                    (study_uid, now, now, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return cur.rowcount == 1

    def set_state(self, study_uid: str, state: str, reason: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?",
                             (state, reason, time.time(), study_uid))

    def studies(self) -> list[StudyState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.study_uid, s.state, s.reason, COUNT(i.sop_instance_uid), s.last_received "
                "FROM studies s LEFT JOIN instances i ON i.study_uid = s.study_uid "
                "GROUP BY s.study_uid ORDER BY s.first_received").fetchall()
        return [StudyState(*row) for row in rows]

    def instance_paths(self, study_uid: str) -> list[Path]:
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances WHERE study_uid=? ORDER BY received_at",
                                    (study_uid,)).fetchall()
        return [Path(r[0]) for r in rows]
