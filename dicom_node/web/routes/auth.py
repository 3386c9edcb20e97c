"""Sign-in (name and password, argon2id) and sign-out, both audited.

The sign-in form carries a token of its own, also set as a cookie (double submit), and a form
another site submits is refused (login CSRF). Failed sign-ins are throttled per account and per
address (``web.throttle``): past the allowance, 429 with Retry-After, the password unchecked. A
sign-in starts a server-side session (``web.sessions``) whose random token is the cookie; sign-out
ends it at once."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from dicom_node.observability import get_logger
from dicom_node.states import EventKind
from dicom_node.web.accounts import Account, AccountError, authenticate
from dicom_node.web.security import (
    CSRF_FIELD,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    User,
    cross_site,
    new_token,
    tokens_match,
)
from dicom_node.web.site import Site, too_many
from dicom_node.web.throttle import retry_after

log = get_logger(__name__)
WRONG = "Wrong name or password."
OUT_OF_DATE = "The sign-in form was out of date or came from another site: sign in here again."


def routes(site: Site) -> list[Route]:
    ctx, web, render = site.ctx, site.web, site.render

    def form(request: Request, status: int, target: str, error: str | None = None,
             headers: dict[str, str] | None = None) -> Response:
        """The sign-in form, with its token (the browser's, or a new one) in the form and its cookie."""
        token = request.cookies.get(SIGNIN_COOKIE) or ""
        if not 20 <= len(token) <= 64 or not token.replace("-", "").replace("_", "").isalnum():
            token = new_token()
        response = render(request, "signin.html", None, status, next=target, error=error, signin_token=token)
        response.set_cookie(SIGNIN_COOKIE, token, path="/signin", httponly=True, samesite="strict",
                            secure=web.secure_cookies)
        for key, value in (headers or {}).items():
            response.headers[key] = value
        return response

    async def signin_form(request: Request) -> Response:
        return form(request, 200, safe_next(request.query_params.get("next")))

    async def signin(request: Request) -> Response:
        fields = await request.form()
        name, password = str(fields.get("name", ""))[:256], str(fields.get("password", ""))[:1024]
        target = safe_next(str(fields.get("next", "/")))
        address = request.client.host if request.client else None
        if cross_site(request.headers.get("sec-fetch-site")) or \
                not tokens_match(request.cookies.get(SIGNIN_COOKIE), fields.get(CSRF_FIELD)):
            log.warning("sign-in refused: the form's token is missing or wrong, or another site sent it",
                        address=address)
            return form(request, 403, target, OUT_OF_DATE)
        wait, _ = site.throttle.wait(name, address)
        if wait > 0:  # the password is not even checked
            return form(request, 429, target, too_many(wait), {"Retry-After": retry_after(wait)})
        account = await site.check_password(_check, name, password, address)  # argon2 and SQLite: off the loop
        if account is None:
            wait = site.throttle.failed(name, address)
            if wait > 0:
                await run_in_threadpool(_throttled, name, address, wait)
                return form(request, 401, target, f"{WRONG} {too_many(wait)}", {"Retry-After": retry_after(wait)})
            return form(request, 401, target, WRONG)
        site.throttle.succeeded(name)
        token, _session = await run_in_threadpool(_start, request, account, address)
        response = RedirectResponse(target, 303)
        response.set_cookie(SESSION_COOKIE, token, max_age=web.session_max_age_s, path="/", httponly=True,
                            samesite="strict", secure=web.secure_cookies)
        response.delete_cookie(SIGNIN_COOKIE, path="/signin", httponly=True, samesite="strict",
                               secure=web.secure_cookies)
        return response

    def _start(request: Request, account: Account, address: str | None) -> tuple[str, object]:
        """A new server-side session (the browser's earlier one, if any, ended: no fixation)."""
        site.sessions.end(request.cookies.get(SESSION_COOKIE))
        return site.sessions.create(account, address, request.headers.get("user-agent"))

    def _check(name: str, password: str, address: str | None) -> Account | None:
        """The account these credentials sign in (argon2id), with the sign-in or its refusal audited."""
        try:
            account = authenticate(ctx.accounts.accounts(), name, password)
        except AccountError as exc:
            log.error("cannot read the accounts file", error=str(exc))
            account = None
        if account is not None and not account.role.sees_pages:  # a sender stores by STOW-RS, nothing else
            account = None
        if account is None:
            ctx.ledger.add_event(EventKind.SIGN_IN_REFUSED, name[:64] or "-", None, "wrong name or password",
                                 {"address": address})
            log.warning("sign-in refused", user=name[:64])
            return None
        ctx.ledger.add_event(EventKind.SIGNED_IN, account.name, None, f"{account.name} ({account.role})",
                             {"address": address})
        log.info("signed in", user=account.name, role=str(account.role))
        return account

    def _throttled(name: str, address: str | None, wait: float) -> None:
        site.audit_throttle(name, address, wait, "sign-in form")

    def signout(request: Request, user: User) -> Response:  # the sessions and the ledger: in the threadpool
        site.sessions.end(request.cookies.get(SESSION_COOKIE))
        ctx.ledger.add_event(EventKind.SIGNED_OUT, user.name, None, user.name)
        response = RedirectResponse("/signin", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=web.secure_cookies)
        return response

    return [
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", site.page(signout), methods=["POST"]),
    ]


def safe_next(target: str | None) -> str:
    """A local path to go to after signing in (never another site)."""
    if not target or len(target) > 2000 or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
