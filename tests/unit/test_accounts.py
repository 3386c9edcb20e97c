"""Accounts of the web page: argon2id hashes in the accounts file, authentication, sessions, CSRF."""

from __future__ import annotations

import base64
import os
import stat
import time
from pathlib import Path

import pytest

from dicom_node.web.accounts import AccountError, Role, add_account, authenticate, load_accounts
from dicom_node.web.security import AccountsFile, basic_credentials, csrf_ok, session_user, sign_in


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


def test_a_session_names_its_user_until_it_expires_or_the_account_goes(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    account = add_account(path, "ada", Role.ADMIN, "password one")
    session: dict = {"user": "mallory", "csrf": "old"}
    sign_in(session, account)
    assert set(session) == {"user", "role", "csrf", "since"} and session["csrf"] != "old"
    accounts = load_accounts(path)
    user = session_user(session, accounts, 60)
    assert user is not None and user.name == "ada" and user.admin
    assert session_user(session, {}, 60) is None  # the account was removed
    session["since"] = time.time() - 61
    assert session_user(session, accounts, 60) is None  # too old
    assert session_user({}, accounts, 60) is None


def test_csrf_token_must_match_the_session() -> None:
    session = {"csrf": "token-1"}
    assert csrf_ok(session, "token-1")
    assert not csrf_ok(session, "token-2")
    assert not csrf_ok(session, None)
    assert not csrf_ok({}, "token-1")
    assert not csrf_ok({}, None)


def test_basic_credentials() -> None:
    header = "Basic " + base64.b64encode(b"ada:pass:word").decode()
    assert basic_credentials(header) == ("ada", "pass:word")
    assert basic_credentials("Bearer abc") is None
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials(None) is None


def test_what_each_role_may_do_and_basic_credentials_of_a_sender(tmp_path: Path) -> None:
    from dicom_node.web.security import basic_account

    assert [r for r in Role if r.sees_pages] == [Role.ADMIN, Role.VIEWER]
    assert [r for r in Role if r.stores] == [Role.ADMIN, Role.SENDER]
    path = tmp_path / "accounts.yaml"
    add_account(path, "pacs", Role.SENDER, "sender password")
    accounts = load_accounts(path)
    header = "Basic " + base64.b64encode(b"pacs:sender password").decode()
    assert basic_account(header, accounts).role is Role.SENDER
    assert basic_account("Basic " + base64.b64encode(b"pacs:wrong").decode(), accounts) is None
    assert basic_account("Bearer abc", accounts) is None and basic_account(None, accounts) is None
    session: dict = {}
    sign_in(session, accounts["pacs"])
    assert session_user(session, accounts, 3600) is None  # a sender has no page, even with a session
