"""The administrator's page of the accounts and their sessions (``/accounts``): who may sign in,
with which role, and each account's live sessions (since, last seen, address, browser), each of
which (or all of an account's at once) the administrator can end. Ending is audited."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from dicom_node.observability import get_logger
from dicom_node.states import EventKind
from dicom_node.web.security import User
from dicom_node.web.site import Site

log = get_logger(__name__)


def routes(site: Site) -> list[Route]:
    ctx, render, page = site.ctx, site.render, site.page

    # The accounts file and the sessions file: plain functions, run in the threadpool by page().

    def accounts_page(request: Request, user: User) -> Response:
        accounts = sorted(ctx.accounts.accounts().values(), key=lambda a: a.name)
        live = site.sessions.live()
        mine = site.session_of(request)
        return render(request, "accounts.html", user, accounts=accounts, mine=mine.public_id if mine else "",
                      sessions={a.name: [s for s in live if s.name == a.name] for a in accounts},
                      idle_s=site.web.session_idle_s, max_age_s=site.web.session_max_age_s)

    def end_sessions(request: Request, user: User) -> Response:
        name: str = request.path_params["name"]
        public_id: str | None = request.path_params.get("public_id")
        ended = int(site.sessions.end_one(name, public_id)) if public_id else site.sessions.end_all(name)
        what = "one session" if public_id else "every session"
        ctx.ledger.add_event(EventKind.SESSIONS_ENDED, user.name, None,
                             f"{user.name} ended {what} of {name[:64]} ({ended} ended)",
                             {"account": name[:64], "ended": ended})
        log.info("sessions ended", user=user.name, account=name[:64], ended=ended)
        return RedirectResponse("/accounts", 303)

    return [
        Route("/accounts", page(accounts_page, admin=True, action="see the accounts' sessions"), methods=["GET"]),
        Route("/accounts/{name}/sessions/end", page(end_sessions, admin=True, action="end sessions"),
              methods=["POST"]),
        Route("/accounts/{name}/sessions/{public_id}/end", page(end_sessions, admin=True, action="end sessions"),
              methods=["POST"]),
    ]
