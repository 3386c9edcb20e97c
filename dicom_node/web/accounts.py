"""The web page's accounts: administrators, read-only users and senders (STOW-RS only), with argon2id password hashes,
in a YAML file whose path the configuration gives (``web.accounts_file``):

    users:
      alice: {role: admin, password_hash: "$argon2id$v=19$..."}

``lumbar-node user add NAME --role admin|viewer|sender`` writes it (the password read from standard input),
``user passwd NAME`` changes a password, ``user remove NAME`` removes an account; each ends the
account's sessions (``web.sessions``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dicom_node.errors import NodeError
from dicom_node.store.durable import write_durably

USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 8
_HASHER = PasswordHasher()
# Verifying against this when the user is unknown costs the same time as a known user's check.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


class AccountError(NodeError, ValueError):
    """An account that cannot be written or an accounts file that cannot be read: the message says why."""


class Role(StrEnum):
    """What a signed-in user may do: an admin also grades and sends again; a viewer looks and uploads;
    a sender (a PACS or archive) only stores instances by STOW-RS, and sees no page."""

    ADMIN = "admin"
    VIEWER = "viewer"
    SENDER = "sender"

    @property
    def sees_pages(self) -> bool:
        """Whether the role may sign in to the web page (and read ``/metrics``)."""
        return self is not Role.SENDER

    @property
    def stores(self) -> bool:
        """Whether the role may store instances by STOW-RS."""
        return self in (Role.ADMIN, Role.SENDER)


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    password_hash: str


def load_accounts(path: Path) -> dict[str, Account]:
    """The accounts in ``path`` (none when the file does not exist); AccountError if unreadable."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        users = data.get("users") or {}
        return {name: Account(str(name), Role(entry["role"]), str(entry["password_hash"]))
                for name, entry in users.items()}
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise AccountError(f"{path}: cannot read the accounts file: {type(exc).__name__}: {exc}") from None


def _write(path: Path, accounts: dict[str, Account]) -> None:
    data = {"users": {a.name: {"role": str(a.role), "password_hash": a.password_hash} for a in accounts.values()}}
    write_durably(yaml.safe_dump(data, sort_keys=True).encode("utf-8"), path, mode=0o600)


def _checked_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password has at least {MIN_PASSWORD} characters")
    return password


def add_account(path: Path, name: str, role: Role, password: str) -> Account:
    """Add or replace an account (argon2id hash) in ``path``, written atomically, readable by its owner only."""
    if not USER_NAME.match(name):
        raise AccountError("a user name is 1-64 letters, digits or . _ @ -")
    accounts = load_accounts(path)
    account = Account(name, role, _HASHER.hash(_checked_password(password)))
    accounts[name] = account
    _write(path, accounts)
    return account


def change_password(path: Path, name: str, password: str) -> Account:
    """Give the existing account ``name`` a new password (its role kept); AccountError if there is none."""
    accounts = load_accounts(path)
    if name not in accounts:
        raise AccountError(f"no account {name!r} in {path}")
    account = Account(name, accounts[name].role, _HASHER.hash(_checked_password(password)))
    accounts[name] = account
    _write(path, accounts)
    return account


def remove_account(path: Path, name: str) -> Account:
    """Remove the account ``name``; the removed account, or AccountError if there is none."""
    accounts = load_accounts(path)
    if name not in accounts:
        raise AccountError(f"no account {name!r} in {path}")
    removed = accounts.pop(name)
    _write(path, accounts)
    return removed


def authenticate(accounts: dict[str, Account], name: str, password: str) -> Account | None:
    """The account if ``password`` is its password, else None (same cost for an unknown name)."""
    account = accounts.get(name)
    try:
        _HASHER.verify(account.password_hash if account else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return account
