"""Who is signed in, and whether a request may do what it asks: the session cookie (a random
token; the session itself is kept on the server, ``web.sessions``), the CSRF token of actions, the
sign-in form's own token (login CSRF), and HTTP Basic credentials."""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from dicom_node.web.accounts import Account, Role, load_accounts

CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_COOKIE = "lumbar_node_session"
SIGNIN_COOKIE = "lumbar_node_signin"  # the sign-in form's token, submitted again in the form (double submit)


@dataclass(frozen=True)
class User:
    """A signed-in user."""

    name: str
    role: Role

    @property
    def admin(self) -> bool:
        """Whether the user may administer: grade and send again, see and end sessions (the one role check)."""
        return self.role is Role.ADMIN


def tokens_match(expected: str | None, submitted: object) -> bool:
    """Whether a submitted token is the expected one (compared in constant time)."""
    return bool(expected) and isinstance(expected, str) and isinstance(submitted, str) \
        and hmac.compare_digest(expected, submitted)


def new_token() -> str:
    """A fresh random token (CSRF, the sign-in form's)."""
    return secrets.token_urlsafe(32)


def cross_site(fetch_site: str | None) -> bool:
    """Whether the browser says the request came from another site (``Sec-Fetch-Site``)."""
    return (fetch_site or "").lower() in ("cross-site", "same-site")


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(name, password) of an HTTP Basic Authorization header, or None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        name, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return name, password


class AccountsFile:
    """The accounts file, re-read when it changes (``lumbar-node user ...`` while the node runs)."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[float, int, int] | None = None
        self._accounts: dict[str, Account] = {}

    def accounts(self) -> dict[str, Account]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return {}
        if stamp != self._stamp:
            self._accounts, self._stamp = load_accounts(self.path), stamp
        return self._accounts
