"""Accounts of the web page: argon2id hashes in the accounts file, authentication, the server-side
sessions, the sign-in throttle, CSRF tokens."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from dicom_node.web.accounts import (
    AccountError,
    Role,
    add_account,
    authenticate,
    change_password,
    load_accounts,
    remove_account,
)
from dicom_node.web.security import AccountsFile, basic_credentials, tokens_match
from dicom_node.web.sessions import SessionStore
from dicom_node.web.throttle import Over, SignInThrottle


def test_an_account_is_written_hashed_and_private(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "accounts.yaml"
    add_account(path, "ada", Role.ADMIN, "correct horse")
    text = path.read_text()
    assert "correct horse" not in text and "$argon2id$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    accounts = load_accounts(path)
    assert authenticate(accounts, "ada", "correct horse").role is Role.ADMIN
    assert authenticate(accounts, "ada", "wrong horse") is None
    assert authenticate(accounts, "nobody", "correct horse") is None


def test_the_accounts_file_stays_private_whatever_the_umask_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    previous = os.umask(0)
    try:
        add_account(path, "ada", Role.ADMIN, "correct horse")
        add_account(path, "vic", Role.VIEWER, "viewer password")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and [p.name for p in tmp_path.iterdir()] == ["accounts.yaml"]


def test_adding_again_replaces_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    add_account(path, "ada", Role.ADMIN, "first password")
    add_account(path, "vic", Role.VIEWER, "viewer password")
    add_account(path, "ada", Role.VIEWER, "second password")
    accounts = load_accounts(path)
    assert set(accounts) == {"ada", "vic"} and accounts["ada"].role is Role.VIEWER
    assert authenticate(accounts, "ada", "first password") is None
    assert authenticate(accounts, "ada", "second password") is not None


@pytest.mark.parametrize(("name", "password", "why"), [("ada", "short", "at least 8"),
                                                      ("a b", "long enough", "user name"),
                                                      ("", "long enough", "user name")])
def test_bad_accounts_are_refused(tmp_path: Path, name: str, password: str, why: str) -> None:
    with pytest.raises(AccountError, match=why):
        add_account(tmp_path / "accounts.yaml", name, Role.VIEWER, password)
    assert not (tmp_path / "accounts.yaml").exists()


def test_an_unreadable_accounts_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text("users:\n  ada: {role: king, password_hash: x}\n")
    with pytest.raises(AccountError, match=r"accounts\.yaml: cannot read the accounts file"):
        load_accounts(path)
    assert load_accounts(tmp_path / "absent.yaml") == {}


def test_the_accounts_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    watched = AccountsFile(path)
    assert watched.accounts() == {}
    add_account(path, "ada", Role.ADMIN, "password one")
    assert set(watched.accounts()) == {"ada"}
    add_account(path, "vic", Role.VIEWER, "password two")
    assert set(watched.accounts()) == {"ada", "vic"}


def _store(tmp_path: Path, idle_s: float = 60, max_age_s: float = 3600) -> SessionStore:
    return SessionStore(tmp_path / "sessions.sqlite", idle_s, max_age_s)


def test_a_session_lives_on_the_server_until_it_is_ended_or_its_account_changes(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    ada = add_account(path, "ada", Role.ADMIN, "password one")
    add_account(path, "vic", Role.VIEWER, "password two")
    store = _store(tmp_path)
    token, session = store.create(ada, "127.0.0.1", "a browser")
    assert session.name == "ada" and session.role is Role.ADMIN and len(session.csrf) >= 32
    assert token not in (tmp_path / "sessions.sqlite").read_bytes().decode("latin-1")  # only its digest is kept
    assert stat.S_IMODE((tmp_path / "sessions.sqlite").stat().st_mode) == 0o600
    looked = store.lookup(token, load_accounts(path))
    assert looked is not None and (looked.public_id, looked.csrf, looked.address) == (session.public_id, session.csrf,
                                                                                      "127.0.0.1")
    assert store.lookup("forged", load_accounts(path)) is None and store.lookup(None, load_accounts(path)) is None
    assert store.end(token) and store.lookup(token, load_accounts(path)) is None  # sign-out: gone at once
    for change in (lambda: change_password(path, "ada", "password three"),
                   lambda: add_account(path, "ada", Role.VIEWER, "password one"),
                   lambda: remove_account(path, "ada")):
        token, _ = store.create(load_accounts(path)["ada"], None, None)
        assert store.lookup(token, load_accounts(path)) is not None
        change()  # a new password, another role, no account: the session no longer opens anything
        assert store.lookup(token, load_accounts(path)) is None
        assert store.live("ada") == []  # ... and its row is gone
    vic = load_accounts(path)["vic"]
    first, _ = store.create(vic, None, None)
    second, other = store.create(vic, None, None)
    assert len(store.live("vic")) == 2 and other.public_id in {s.public_id for s in store.live()}
    assert store.end_one("vic", other.public_id) and store.lookup(second, load_accounts(path)) is None
    assert store.lookup(first, load_accounts(path)) is not None
    assert store.end_all("vic") == 1 and store.lookup(first, load_accounts(path)) is None
    store.close()


def test_a_session_ends_when_idle_and_after_its_lifetime(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    ada = add_account(path, "ada", Role.ADMIN, "password one")
    accounts = load_accounts(path)
    now = [1000.0]
    store = SessionStore(tmp_path / "sessions.sqlite", 30, 80, clock=lambda: now[0])
    token, _ = store.create(ada, None, None)
    for _ in range(4):  # used every 20 s: never idle for 30 s...
        now[0] += 20
        assert store.lookup(token, accounts) is not None
    now[0] += 1  # ... but 81 s after its sign-in: past its lifetime
    assert store.lookup(token, accounts) is None
    token, _ = store.create(ada, None, None)
    now[0] += 31
    assert store.lookup(token, accounts) is None  # idle too long
    assert store.live() == []
    store.close()


def test_the_throttle_waits_longer_after_each_failure_up_to_a_bound_and_never_for_ever() -> None:
    now = [1000.0]
    throttle = SignInThrottle(3, 1.0, 8.0, clock=lambda: now[0])
    assert [throttle.failed("ada", "10.0.0.1") for _ in range(3)] == [0, 0, 1.0]  # 2 free, the 3rd: wait 1 s
    assert throttle.wait("ada", "10.0.0.2") == (1.0, Over.ACCOUNT)  # the account, from any address
    assert throttle.wait("bob", "10.0.0.1") == (1.0, Over.ADDRESS)  # the address, for any account
    assert throttle.wait("bob", "10.0.0.2") == (0, None)
    now[0] += 1.0
    assert throttle.wait("ada", "10.0.0.1")[0] == 0  # the wait is over
    waits = []
    for _ in range(6):
        waits.append(throttle.failed("ada", "10.0.0.1"))
        now[0] += waits[-1]
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]  # doubling, bounded
    assert throttle.wait("ada", "10.0.0.1")[0] == 0  # after the wait: the right password may be tried
    throttle.succeeded("ada")
    assert throttle.wait("ada", "10.0.0.9") == (0, None)  # a success clears the account...
    assert throttle.failed("carl", "10.0.0.1") == 8.0  # ... not the address that guessed
    now[0] += 8.0 + throttle.forget_after + 1
    assert throttle.failed("carl", "10.0.0.1") == 0  # a quiet spell: forgotten


def test_passwd_and_remove_need_an_existing_account(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    old = add_account(path, "ada", Role.ADMIN, "password one")
    with pytest.raises(AccountError, match="no account 'bob'"):
        change_password(path, "bob", "password two")
    with pytest.raises(AccountError, match="at least 8"):
        change_password(path, "ada", "short")
    new = change_password(path, "ada", "password two")
    assert new.role is Role.ADMIN and new.password_hash != old.password_hash
    assert authenticate(load_accounts(path), "ada", "password two") is not None
    assert authenticate(load_accounts(path), "ada", "password one") is None
    with pytest.raises(AccountError, match="no account 'bob'"):
        remove_account(path, "bob")
    remove_account(path, "ada")
    assert load_accounts(path) == {}


def test_basic_credentials() -> None:
    header = "Basic " + base64.b64encode(b"ada:pass:word").decode()
    assert basic_credentials(header) == ("ada", "pass:word")
    assert basic_credentials("Bearer abc") is None
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials(None) is None


def test_what_each_role_may_do_and_a_sender_account(tmp_path: Path) -> None:
    assert [r for r in Role if r.sees_pages] == [Role.ADMIN, Role.VIEWER]
    assert [r for r in Role if r.stores] == [Role.ADMIN, Role.SENDER]
    path = tmp_path / "accounts.yaml"
    add_account(path, "pacs", Role.SENDER, "sender password")
    accounts = load_accounts(path)
    assert authenticate(accounts, "pacs", "sender password").role is Role.SENDER
    assert authenticate(accounts, "pacs", "wrong") is None


def test_tokens_must_match() -> None:
    assert tokens_match("token-1", "token-1")
    assert not tokens_match("token-1", "token-2")
    assert not tokens_match("token-1", None)
    assert not tokens_match("", "")
    assert not tokens_match(None, None)
