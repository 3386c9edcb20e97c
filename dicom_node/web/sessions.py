"""The web page's sessions, kept on the server: a small SQLite file of their own beside the ledger
(``web.sessions_file``, by default ``sessions.sqlite`` in the ledger's folder, mode 0600).

The browser holds only a random token (the session cookie); the file holds its SHA-256, so a
copy of the file opens no session. A session ends at once when its row goes: sign-out, an
administrator ending it on the web page, ``lumbar-node user passwd|remove|add`` (a password or
role change), its idle timeout (``web.session_idle_s``) or its absolute lifetime
(``web.session_max_age_s``). Each lookup also checks the account as it is now: a session of an
account that was removed, whose role changed or whose password changed (by any means) is ended
when it is next used.

Why a file of its own rather than the ledger: sessions are short-lived, written on every request
and deleted freely, and hold credentials (token hashes); the ledger is the node's clinical record
and audit trail, kept for years, with its own migrations. The node writes the ledger's folder
already, and ``lumbar-node user ...`` finds the file from the same configuration."""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.web.accounts import Account, Role

__all__ = ["Session", "SessionStore", "sessions_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,   -- SHA-256 of the cookie's token (the token itself is never stored)
    public_id TEXT UNIQUE NOT NULL,  -- what the administrator's page names it by
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    credential TEXT NOT NULL,      -- SHA-256 of the account's password hash at sign-in
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    seen REAL NOT NULL,
    address TEXT,
    agent TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_name ON sessions (name);
"""


def sessions_path(settings: Settings) -> Path:
    """Where the sessions are kept: ``web.sessions_file``, or ``sessions.sqlite`` beside the ledger."""
    return settings.web.sessions_file or Path(settings.storage.ledger_path).with_name("sessions.sqlite")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def credential_of(account: Account) -> str:
    """What a session remembers of its account's password: a digest of its hash (a new password, a new digest)."""
    return _digest(account.password_hash)


@dataclass(frozen=True)
class Session:
    """One signed-in session as the server keeps it."""

    public_id: str
    name: str
    role: Role
    csrf: str
    created: float
    seen: float
    address: str | None
    agent: str | None


class SessionStore:
    """The sessions file: create, look up (ending what has expired or no longer fits its account),
    list and end. Safe to share between threads (one connection, one lock); another process
    (``lumbar-node user ...``) may open the same file."""

    def __init__(self, path: Path, idle_s: float, max_age_s: float, clock: Callable[[], float] = time.time):
        self.path, self.idle_s, self.max_age_s, self._clock = path, idle_s, max_age_s, clock
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # readable by the node's user only, like the accounts file
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def of(cls, settings: Settings) -> SessionStore:
        """The store the configuration names, with its timeouts."""
        web = settings.web
        return cls(sessions_path(settings), web.session_idle_s, web.session_max_age_s)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def create(self, account: Account, address: str | None, agent: str | None) -> tuple[str, Session]:
        """A new session for ``account``: (the cookie's token, the session). Expired sessions go meanwhile."""
        token, now = secrets.token_urlsafe(32), self._clock()
        session = Session(secrets.token_urlsafe(9), account.name, account.role, secrets.token_urlsafe(32), now, now,
                          address, (agent or "")[:200] or None)
        with self._locked() as db:
            self._purge(db, now)
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (_digest(token), session.public_id, session.name, str(session.role), credential_of(account),
                        session.csrf, now, now, address, session.agent))
        return token, session

    def lookup(self, token: str | None, accounts: Mapping[str, Account]) -> Session | None:
        """The live session of ``token``, its last use now; None (and the row gone) when it has
        expired, or its account was removed or has another role or password since."""
        if not token or len(token) > 200:
            return None
        now, key = self._clock(), _digest(token)
        with self._locked() as db:
            row = db.execute("SELECT public_id, name, role, credential, csrf, created, seen, address, agent "
                             "FROM sessions WHERE token_hash=?", (key,)).fetchone()
            if row is None:
                return None
            public_id, name, role, credential, csrf, created, seen, address, agent = row
            account = accounts.get(name)
            if (now - seen > self.idle_s or now - created > self.max_age_s or account is None
                    or str(account.role) != role or credential_of(account) != credential):
                db.execute("DELETE FROM sessions WHERE token_hash=?", (key,))
                return None
            db.execute("UPDATE sessions SET seen=? WHERE token_hash=?", (now, key))
        return Session(public_id, name, account.role, csrf, created, now, address, agent)

    def end(self, token: str | None) -> bool:
        """End the session of ``token`` (sign-out); whether there was one."""
        if not token:
            return False
        with self._locked() as db:
            return db.execute("DELETE FROM sessions WHERE token_hash=?", (_digest(token),)).rowcount > 0

    def end_one(self, name: str, public_id: str) -> bool:
        """End one session of account ``name`` (by its public id); whether there was one."""
        with self._locked() as db:
            return db.execute("DELETE FROM sessions WHERE name=? AND public_id=?", (name, public_id)).rowcount > 0

    def end_all(self, name: str) -> int:
        """End every session of account ``name``: how many there were."""
        with self._locked() as db:
            return int(db.execute("DELETE FROM sessions WHERE name=?", (name,)).rowcount)

    def live(self, name: str | None = None) -> list[Session]:
        """The unexpired sessions (of ``name``, or of everyone), newest first."""
        now = self._clock()
        with self._locked() as db:
            self._purge(db, now)
            sql = "SELECT public_id, name, role, csrf, created, seen, address, agent FROM sessions"
            rows = (db.execute(f"{sql} WHERE name=? ORDER BY created DESC", (name,)) if name is not None
                    else db.execute(f"{sql} ORDER BY name, created DESC")).fetchall()
        out = []
        for public_id, who, role, csrf, created, seen, address, agent in rows:
            try:
                out.append(Session(public_id, who, Role(role), csrf, created, seen, address, agent))
            except ValueError:  # a role this version does not know: not listed, never looked up as valid
                continue
        return out

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM sessions WHERE seen < ? OR created < ?", (now - self.idle_s, now - self.max_age_s))
