"""Sessions and CSRF for the web page: who is signed in (from the signed session cookie) and
whether an action carries the session's CSRF token; and who an HTTP Basic Authorization header
signs in (``basic_account``: ``/metrics`` and STOW-RS)."""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.web.accounts import Account, Role, authenticate, load_accounts

CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class User:
    """A signed-in user."""

    name: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN


def sign_in(session: MutableMapping[str, Any], account: Account) -> None:
    """Start a session for ``account``: a fresh session with a new CSRF token (no fixation)."""
    session.clear()
    session.update({"user": account.name, "role": str(account.role), "csrf": secrets.token_urlsafe(32),
                    "since": time.time()})


def session_user(session: Mapping[str, Any], accounts: Mapping[str, Account], max_age_s: float) -> User | None:
    """The signed-in user of a session, or None: no session, too old, or an account that no
    longer exists (the role is the account's current one)."""
    name, since = session.get("user"), session.get("since")
    if not isinstance(name, str) or not isinstance(since, (int, float)) or time.time() - since > max_age_s:
        return None
    account = accounts.get(name)
    return User(account.name, account.role) if account is not None and account.role.sees_pages else None


def csrf_ok(session: Mapping[str, Any], submitted: str | None) -> bool:
    """Whether an action's token is the session's CSRF token (compared in constant time)."""
    expected = session.get("csrf")
    return isinstance(expected, str) and isinstance(submitted, str) and hmac.compare_digest(expected, submitted)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(name, password) of an HTTP Basic Authorization header, or None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        name, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return name, password


def basic_account(header: str | None, accounts: dict[str, Account]) -> Account | None:
    """The account an HTTP Basic Authorization header signs in (its password checked with argon2id:
    call it off the event loop), or None: no header, a malformed one, or wrong credentials. The one
    check of Basic credentials (``/metrics``, STOW-RS); the caller decides what the role may do."""
    credentials = basic_credentials(header)
    if credentials is None:
        return None
    return authenticate(accounts, *credentials)


class AccountsFile:
    """The accounts file, re-read when it changes (``lumbar-node user add`` while the node runs)."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._accounts: dict[str, Account] = {}

    def accounts(self) -> dict[str, Account]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            return {}
        if stamp != self._stamp:
            self._accounts, self._stamp = load_accounts(self.path), stamp
        return self._accounts
