"""Issue 22's reproductions against the node as its users run it (`lumbar-node serve` in its own
process, over HTTP on loopback; headless Chromium where a browser is what matters): a cookie
replayed after sign-out, after a password change, a role change and the account's removal, and
after an administrator ended it; 30 wrong passwords (the form and /metrics' Basic authentication);
a cross-site sign-in form; Cache-Control on the pages; a page number past any end; an upload
refused for a bad UID (its file name never in the log).

The throttle's and the sessions' times are set short here (web.signin_wait_s, ...) so that no test
waits minutes."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from demo.orthanc import free_port
from dicom_node.states import EventKind
from tests.support.browser import chromium, require_chromium
from tests.support.served_node import ServedNode, stop_all
from tests.support.uploads import CONTENT_TYPE, image, multipart, part10, sign_in, signin_token

if TYPE_CHECKING:
    from playwright.sync_api import Route

ADMIN, ADMIN_PASSWORD = "ada", "ada-password-1"
VIEWER, VIEWER_PASSWORD = "vic", "vic-password-1"
FREE, FIRST_WAIT, MAX_WAIT = 3, 0.5, 2.0  # short: the throttle's times in these tests
WEB = {"signin_free_attempts": FREE, "signin_wait_s": FIRST_WAIT, "signin_wait_max_s": MAX_WAIT}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedNode]:
    """One node for the module (a start takes seconds); each test uses its own accounts or ends its waits."""
    served = ServedNode(tmp_path_factory.mktemp("sessions") / "node", free_port(), web=WEB)
    served.add_user(ADMIN, "admin", ADMIN_PASSWORD)
    served.add_user(VIEWER, "viewer", VIEWER_PASSWORD)
    served.start()
    try:
        yield served
    finally:
        stop_all()


def _user(node: ServedNode, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """`lumbar-node user ...` against the running node's configuration."""
    exe = Path(sys.executable).with_name("lumbar-node")
    done = subprocess.run([str(exe), "--config", str(node.config), "user", *args], capture_output=True, text=True,
                          input=(password + "\n") if password else "", timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def _replayed(node: ServedNode, cookies: httpx.Cookies) -> httpx.Client:
    """A new client carrying nothing but a saved session cookie (as an attacker who copied it)."""
    return httpx.Client(base_url=node.web_url, cookies=cookies, follow_redirects=False, timeout=30)


def _opens(node: ServedNode, cookies: httpx.Cookies) -> bool:
    with _replayed(node, cookies) as client:
        answer = client.get("/")
        assert answer.status_code in (200, 303)
        return answer.status_code == 200


def _events(node: ServedNode, kind: EventKind) -> list:
    ledger = node.ledger()
    try:
        return [e for e in ledger.events() if e.kind == kind]
    finally:
        ledger.close()


def test_a_cookie_saved_before_sign_out_opens_nothing_and_its_csrf_token_does_nothing(node: ServedNode) -> None:
    client, token = sign_in(node.web_url, ADMIN, ADMIN_PASSWORD)
    saved = httpx.Cookies(client.cookies)
    assert _opens(node, saved)
    assert client.post("/signout", data={"csrf": token}, follow_redirects=False).status_code == 303
    assert not _opens(node, saved), "a cookie replayed after sign-out still opened the dashboard"
    with _replayed(node, saved) as replay:
        answer = replay.post("/studies/1.2.3/grade-again", data={"csrf": token}, headers={"Accept": "application/json"})
        assert answer.status_code == 401  # its CSRF token is worth nothing without the session
    assert _events(node, EventKind.SIGNED_OUT)


def test_a_password_change_a_role_change_and_a_removal_end_the_sessions_at_once(node: ServedNode) -> None:
    node.add_user("pat", "viewer", "pat-password-1")
    client, _ = sign_in(node.web_url, "pat", "pat-password-1")
    saved = httpx.Cookies(client.cookies)
    assert _opens(node, saved)
    done = _user(node, "passwd", "pat", password="pat-password-2")
    assert "1 session(s) ended" in done.stdout
    assert not _opens(node, saved), "the old session still worked after a password change"
    assert sign_in(node.web_url, "pat", "pat-password-2")  # the new password works at once

    client, _ = sign_in(node.web_url, "pat", "pat-password-2")
    saved = httpx.Cookies(client.cookies)
    node.add_user("pat", "admin", "pat-password-2")  # a role change (the same password)
    assert not _opens(node, saved), "the session outlived a role change"

    client, _ = sign_in(node.web_url, "pat", "pat-password-2")
    saved = httpx.Cookies(client.cookies)
    _user(node, "remove", "pat")
    assert not _opens(node, saved), "the session outlived the account's removal"
    failed = subprocess.run([str(Path(sys.executable).with_name("lumbar-node")), "--config", str(node.config),
                             "user", "remove", "pat"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "no account 'pat'" in failed.stderr


def test_an_administrator_sees_and_ends_an_accounts_sessions(node: ServedNode) -> None:
    viewer, _ = sign_in(node.web_url, VIEWER, VIEWER_PASSWORD)
    saved = httpx.Cookies(viewer.cookies)
    assert viewer.get("/accounts").status_code == 403  # a viewer does not see them
    admin, admin_token = sign_in(node.web_url, ADMIN, ADMIN_PASSWORD)
    page = admin.get("/accounts").text
    sessions = re.findall(rf'data-account="{VIEWER}" data-session="([^"]+)"', page)
    assert len(sessions) == 1 and "127.0.0.1" in page and "(this one)" in page
    assert admin.post(f"/accounts/{VIEWER}/sessions/{sessions[0]}/end", data={"csrf": "forged"}).status_code == 403
    assert _opens(node, saved)
    answer = admin.post(f"/accounts/{VIEWER}/sessions/{sessions[0]}/end", data={"csrf": admin_token},
                        follow_redirects=False)
    assert answer.status_code == 303
    assert not _opens(node, saved), "a session the administrator ended still worked"
    assert f'data-account="{VIEWER}" data-session=' not in admin.get("/accounts").text
    for _ in range(2):
        sign_in(node.web_url, VIEWER, VIEWER_PASSWORD)
    assert admin.post(f"/accounts/{VIEWER}/sessions/end", data={"csrf": admin_token},
                      follow_redirects=False).status_code == 303
    assert f'data-account="{VIEWER}" data-session=' not in admin.get("/accounts").text
    ended = _events(node, EventKind.SESSIONS_ENDED)
    assert {e.actor for e in ended} == {ADMIN} and sorted(e.data["ended"] for e in ended) == [1, 2]


def test_thirty_wrong_passwords_are_throttled_and_the_right_one_works_once_the_wait_is_over(node: ServedNode) -> None:
    client = httpx.Client(base_url=node.web_url, follow_redirects=False, timeout=30)
    token = signin_token(client)
    started = time.monotonic()
    answers = [client.post("/signin", data={"name": ADMIN, "password": f"guess-{i}", "csrf": token})
               for i in range(30)]
    statuses = [a.status_code for a in answers]
    assert statuses[:FREE] == [401] * FREE and statuses.count(429) >= 25, statuses
    throttled = next(a for a in answers if a.status_code == 429)
    assert 1 <= int(throttled.headers["retry-after"]) <= MAX_WAIT + 1 and "Too many failed sign-ins" in throttled.text
    right = client.post("/signin", data={"name": ADMIN, "password": ADMIN_PASSWORD, "csrf": token})
    assert right.status_code == 429, "the right password went through during the wait"
    time.sleep(int(right.headers["retry-after"]))
    right = client.post("/signin", data={"name": ADMIN, "password": ADMIN_PASSWORD, "csrf": token})
    assert right.status_code == 303, "the right password did not work once the wait was over (a lockout)"
    assert time.monotonic() - started < 30
    assert _events(node, EventKind.SIGN_IN_THROTTLED), "the throttle is audited"

    time.sleep(MAX_WAIT)  # /metrics' Basic authentication: the same throttle (the address has failed before)
    statuses = [httpx.get(f"{node.web_url}/metrics", auth=(VIEWER, f"guess-{i}"), timeout=30).status_code
                for i in range(30)]
    assert statuses[0] == 401 and statuses.count(429) >= 25, statuses
    answer = httpx.get(f"{node.web_url}/metrics", auth=(VIEWER, VIEWER_PASSWORD), timeout=30)
    assert answer.status_code == 429 and answer.headers["retry-after"]
    time.sleep(int(answer.headers["retry-after"]))
    assert httpx.get(f"{node.web_url}/metrics", auth=(VIEWER, VIEWER_PASSWORD), timeout=30).status_code == 200


def test_a_cross_site_sign_in_form_does_not_replace_the_administrators_session(node: ServedNode) -> None:
    require_chromium()
    evil = f"""<!doctype html><form id="f" method="post" action="{node.web_url}/signin">
      <input name="name" value="{VIEWER}"><input name="password" value="{VIEWER_PASSWORD}">
      <input name="next" value="/"></form><script>document.getElementById('f').submit()</script>"""
    viewer_sign_ins = len([e for e in _events(node, EventKind.SIGNED_IN) if e.actor == VIEWER])
    with chromium() as browser:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{node.web_url}/")
        page.fill("input[name=name]", ADMIN)
        page.fill("input[name=password]", ADMIN_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{node.web_url}/")
        assert ADMIN in page.inner_text("header")

        def serve_evil(route: Route) -> None:
            route.fulfill(status=200, content_type="text/html", body=evil)

        context.route("http://attacker.example/**", serve_evil)
        with page.expect_response(f"{node.web_url}/signin") as answer:
            page.goto("http://attacker.example/login-csrf.html")  # its form submits itself to the node
        assert answer.value.status == 403
        page.goto(f"{node.web_url}/")
        header = page.inner_text("header")
        assert ADMIN in header and VIEWER not in header, "a cross-site form replaced the administrator's session"
        context.close()
    assert len([e for e in _events(node, EventKind.SIGNED_IN) if e.actor == VIEWER]) == viewer_sign_ins


def test_pages_are_not_cached_and_a_page_past_the_end_is_the_last(node: ServedNode) -> None:
    client, _ = sign_in(node.web_url, ADMIN, ADMIN_PASSWORD)
    for path in ("/", "/upload", "/accounts", "/studies/1.2.3", "/studies/1.2.3/files/sr.dcm",
                 "/studies/1.2.3/heatmaps/0.png", "/metrics", "/signin"):
        answer = client.get(path)
        assert answer.headers.get("cache-control") == "no-store", (path, answer.headers.get("cache-control"))
    assert client.get("/static/style.css").headers.get("cache-control") != "no-store"  # no patient data
    huge = client.get("/?page=99999999999999999999999")
    assert huge.status_code == 200 and "page 1 of 1" in huge.text
    assert client.get("/?page=-1").status_code == 400 and client.get("/?page=abc").status_code == 400
    assert client.get("/?page=0").status_code == 200
    log = node.log_text()
    assert "Traceback" not in log and "OverflowError" not in log and "Exception in ASGI" not in log


def test_an_upload_refused_for_a_bad_uid_logs_no_file_name(node: ServedNode) -> None:
    client, token = sign_in(node.web_url, VIEWER, VIEWER_PASSWORD)
    bad = image(16)
    bad.SOPInstanceUID = "1.2.03.4"  # a leading zero: not a UID
    name = "SMITH_JANE_MRN4455_lumbar.dcm"
    answer = client.post("/upload", content=multipart(token, [(name, part10(bad))]),
                         headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 400 and name in answer.json()["error"]  # told to the one who sent it...
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr(f"DOE_JOHN_MRN7788/{name}", part10(bad))
    answer = client.post("/upload", content=multipart(token, [("DOE_JOHN_MRN7788.zip", packed.getvalue())]),
                         headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 400
    log = node.log_text()
    assert log.count('"upload refused"') == 2
    for word in ("SMITH", "JANE", "MRN4455", "DOE_JOHN", "MRN7788"):  # ... never to the log
        assert word not in log, f"{word!r} (a file name) in the node's log"
