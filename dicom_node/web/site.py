"""What every route shares: the templates, the signed-in user (its server-side session), the
sign-in throttle, and ``page()``, the wrapper that lets only signed-in users in and checks an
action's CSRF token and role (refusals are audited).

Nothing that blocks runs on the event loop: the ledger and the sessions (SQLite) and the accounts
file are called through ``run_in_threadpool``, argon2 through ``check_password`` (a few threads
of its own, so that guessed passwords never take every thread of the pool), and a handler that
is a plain function (not ``async``) is run in the threadpool whole by ``page()``, as Starlette
runs plain endpoints."""

from __future__ import annotations

import inspect
import os
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

import anyio
import anyio.to_thread
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from dicom_node.observability import get_logger
from dicom_node.states import EventKind, StudyState
from dicom_node.web.accounts import Account, AccountError, authenticate
from dicom_node.web.context import WebContext
from dicom_node.web.security import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, User, basic_credentials, tokens_match
from dicom_node.web.sessions import Session
from dicom_node.web.throttle import SignInThrottle, retry_after

__all__ = ["HASHING_THREADS", "MAX_UPLOAD_FILES", "AsyncHandler", "Handler", "Site", "SyncHandler", "too_many"]

log = get_logger(__name__)
MAX_UPLOAD_FILES = 20000
#: argon2 checks at once (each takes tens of ms and 64 MiB): the rest of the node keeps a core.
HASHING_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
T = TypeVar("T")

#: A route's handler once ``page()`` let the request in: it gets the signed-in user. A plain
#: function (one that reads the ledger or files) runs in the threadpool; a coroutine function
#: (one that reads the request body) on the event loop, and must not block it.
AsyncHandler = Callable[[Request, User], Awaitable[Response]]
SyncHandler = Callable[[Request, User], Response]
Handler = AsyncHandler | SyncHandler


def _on_the_loop(handler: Handler) -> AsyncHandler:
    """``handler`` as a coroutine function: a plain one is run in the threadpool."""
    if inspect.iscoroutinefunction(handler):
        return cast(AsyncHandler, handler)  # the check above is the runtime's, the type cannot say it
    plain = cast(SyncHandler, handler)

    async def in_threadpool(request: Request, user: User) -> Response:
        return await run_in_threadpool(plain, request, user)

    return in_threadpool


def too_many(wait: float) -> str:
    """The words of a throttled sign-in."""
    return f"Too many failed sign-ins: try again in {retry_after(wait)} s."


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _percent(p: float) -> str:
    return f"{100 * p:.0f}%"


def _grade_class(grade: str | None) -> str:
    return {"Normal/Mild": "g-normal", "Moderate": "g-moderate", "Severe": "g-severe"}.get(grade or "", "g-none")


_TEMPLATES = Jinja2Templates(directory=str(files("dicom_node.web") / "templates"))
_TEMPLATES.env.filters.update(when=_when, percent=_percent, grade_class=_grade_class)


class Site:
    """The routes' shared helpers over one ``WebContext``."""

    def __init__(self, ctx: WebContext):
        self.ctx = ctx
        self.web = web = ctx.settings.web
        self.sessions = ctx.session_store()
        self.throttle = SignInThrottle(web.signin_free_attempts, web.signin_wait_s, web.signin_wait_max_s)
        self._hashing: anyio.CapacityLimiter | None = None

    async def check_password(self, check: Callable[..., T], *args: Any) -> T:
        """Run ``check`` (argon2, and its audit line) off the event loop, at most ``HASHING_THREADS`` at once."""
        if self._hashing is None:  # made on the event loop, where anyio wants it
            self._hashing = anyio.CapacityLimiter(HASHING_THREADS)
        return await anyio.to_thread.run_sync(check, *args, limiter=self._hashing)

    def audit_throttle(self, name: str, address: str | None, wait: float, where: str) -> None:
        """The audit trail's line (and the log's) when failed sign-ins make the next attempt wait (blocking)."""
        self.ctx.ledger.add_event(EventKind.SIGN_IN_THROTTLED, name[:64] or "-", None,
                                  f"failed sign-ins ({where}): the next attempt waits {retry_after(wait)} s",
                                  {"address": address, "wait_s": round(wait, 1)})
        log.warning("sign-in throttled", user=name[:64], address=address, wait_s=round(wait, 1), where=where)

    async def basic_account(self, request: Request, where: str) -> Account | Response:
        """The account of the request's HTTP Basic credentials, checked off the event loop and
        throttled as the sign-in form is; else the answer to give: 401 with a challenge, or 429
        with Retry-After (the password unchecked). For ``/metrics``, and any route a machine
        signs in to (``where`` names it in the audit trail)."""
        challenge = {"WWW-Authenticate": f'Basic realm="lumbar-node {where}"'}
        credentials = basic_credentials(request.headers.get("authorization"))
        if credentials is None:
            return PlainTextResponse("sign in, or HTTP Basic authentication with an account\n", 401,
                                     headers=challenge)
        name, address = credentials[0], request.client.host if request.client else None
        wait, _ = self.throttle.wait(name, address)
        if wait > 0:
            return PlainTextResponse(f"{too_many(wait)}\n", 429, headers={"Retry-After": retry_after(wait)})
        account = await self.check_password(self._authenticate, *credentials)
        if account is None:
            wait = self.throttle.failed(name, address)
            if wait > 0:
                await run_in_threadpool(self.audit_throttle, name, address, wait, where)
                challenge["Retry-After"] = retry_after(wait)
            return PlainTextResponse("wrong name or password\n", 401, headers=challenge)
        self.throttle.succeeded(name)
        return account

    def _authenticate(self, name: str, password: str) -> Account | None:
        try:
            return authenticate(self.ctx.accounts.accounts(), name, password)
        except AccountError as exc:
            log.error("cannot read the accounts file", error=str(exc))
            return None

    def session_of(self, request: Request) -> Session | None:
        """The request's live session (blocking: the sessions file), remembered on the request."""
        if not hasattr(request.state, "session"):
            try:
                session = self.sessions.lookup(request.cookies.get(SESSION_COOKIE), self.ctx.accounts.accounts())
            except AccountError as exc:
                log.error("cannot read the accounts file", error=str(exc))
                session = None
            except sqlite3.Error as exc:  # the sessions file unreadable: nobody is signed in (fails closed)
                log.error("cannot read the sessions file", error=f"{type(exc).__name__}: {exc}")
                session = None
            request.state.session = session
        return cast(Session | None, request.state.session)

    def user_of(self, request: Request) -> User | None:
        session = self.session_of(request)
        return User(session.name, session.role) if session is not None else None

    @staticmethod
    def csrf_of(request: Request) -> str:
        """The CSRF token of the request's session (once ``session_of`` has looked it up), or ""."""
        session = getattr(request.state, "session", None)
        return session.csrf if isinstance(session, Session) else ""

    def render(self, request: Request, name: str, user: User | None, status: int = 200, **values: Any) -> Response:
        values.setdefault("csrf", self.csrf_of(request))
        return _TEMPLATES.TemplateResponse(request, name, {"user": user, "states": list(StudyState), **values},
                                           status_code=status)

    def page(self, handler: Handler, admin: bool = False, action: str = "",
             streamed: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """A route for signed-in users (anonymous: to the sign-in page); an action (POST) also
        needs the CSRF token; ``admin`` needs an administrator, to see or to act (refusals are
        audited). A ``streamed`` handler reads a multipart body itself, as it arrives: without the
        token in the header, it checks the form's token before the first file (the body is never
        read here)."""
        ctx, web, render = self.ctx, self.web, self.render
        call = _on_the_loop(handler)

        async def endpoint(request: Request) -> Response:
            user = await run_in_threadpool(self.user_of, request)
            if user is None:
                if request.method == "GET" and "application/json" not in request.headers.get("accept", ""):
                    return RedirectResponse(f"/signin?{urlencode({'next': request.url.path})}", 303)
                return JSONResponse({"error": "sign in first"}, 401)
            if request.method == "POST":
                token: str | UploadFile | None = request.headers.get(CSRF_HEADER)
                content_type = request.headers.get("content-type", "")
                if token is None and streamed and not admin and content_type.startswith("multipart/form-data"):
                    return await call(request, user)  # it checks the form's token itself
                if token is None and content_type.startswith("multipart/form-data"):
                    declared = request.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > web.upload_max_mb * 2**20 + 2**20:
                        return JSONResponse({"error": f"Too large: the upload is over the limit of "
                                                      f"{web.upload_max_mb:g} MiB (web.upload_max_mb)"}, 413)
                    try:  # parsed once: the handler gets the same (cached) form
                        token = (await request.form(max_files=MAX_UPLOAD_FILES, max_fields=100)).get(CSRF_FIELD)
                    except Exception as exc:  # noqa: BLE001 - a malformed or over-long form
                        return JSONResponse({"error": f"The upload could not be read: {exc}"}, 400)
                elif token is None and content_type.startswith("application/x-www-form-urlencoded"):
                    token = (await request.form()).get(CSRF_FIELD)
                if not tokens_match(self.csrf_of(request), token):
                    return render(request, "message.html", user, 403, title="Refused",
                                  message="The form was out of date (CSRF token missing or wrong): reload the page "
                                          "and try again.")
            if admin and not user.admin:
                study_uid = request.path_params.get("study_uid")
                await run_in_threadpool(ctx.ledger.add_event, EventKind.REFUSED, user.name, study_uid,
                                        f"{action}: {user.name} is {user.role}, only an administrator may")
                log.warning("action refused: not an administrator", action=action, user=user.name,
                            study_uid=study_uid)
                return render(request, "message.html", user, 403, title="Not allowed",
                              message=f"Only an administrator may {action}; you are signed in as "
                                      f"{user.name} ({user.role}).")
            return await call(request, user)

        return endpoint
