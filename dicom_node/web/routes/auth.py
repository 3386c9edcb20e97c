"""Sign-in (name and password, argon2id) and sign-out; both go to the audit trail."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from dicom_node.observability import get_logger
from dicom_node.states import EventKind
from dicom_node.web.accounts import Account, AccountError, authenticate
from dicom_node.web.security import User, sign_in
from dicom_node.web.site import Site

log = get_logger(__name__)


def routes(site: Site) -> list[Route]:
    ctx, render = site.ctx, site.render

    async def signin_form(request: Request) -> Response:
        return render(request, "signin.html", None, next=safe_next(request.query_params.get("next")))

    async def signin(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        target = safe_next(str(form.get("next", "/")))
        address = request.client.host if request.client else None
        account = await run_in_threadpool(_check, name, password, address)  # argon2 and SQLite: off the loop
        if account is None:
            return render(request, "signin.html", None, 401, next=target, error="Wrong name or password.")
        sign_in(request.session, account)
        return RedirectResponse(target, 303)

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

    def signout(request: Request, user: User) -> Response:  # the ledger: run in the threadpool by page()
        request.session.clear()
        ctx.ledger.add_event(EventKind.SIGNED_OUT, user.name, None, user.name)
        return RedirectResponse("/signin", 303)

    return [
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", site.page(signout), methods=["POST"]),
    ]


def safe_next(target: str | None) -> str:
    """A local path to go to after signing in (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
