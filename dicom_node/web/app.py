"""The web application (Starlette): the routes of ``web/routes/`` assembled, the static files, the
session and the security headers. Every page but ``/healthz`` (and ``/metrics`` when
``web.metrics_anonymous``) needs a signed-in user; every action (POST) needs the session's CSRF
token; grading and sending again need an administrator. Sign-ins and actions go to the audit trail."""

from __future__ import annotations

import secrets
from importlib.resources import files
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from dicom_node.web.context import NodeActions, WebContext
from dicom_node.web.routes import auth, dicomweb, fetch, ops, studies, uploads
from dicom_node.web.site import Site

__all__ = ["SESSION_COOKIE", "NodeActions", "WebContext", "build_app"]

SESSION_COOKIE = "lumbar_node_session"


def build_app(ctx: WebContext) -> Starlette:
    """The web application over ``ctx`` (a new session secret each start: a restart signs everyone out)."""
    web = ctx.settings.web
    site = Site(ctx)
    routes: list[BaseRoute] = [*ops.routes(site), *auth.routes(site), *studies.routes(site), *uploads.routes(site),
                               *dicomweb.routes(site),
                               *fetch.routes(site),
                               Mount("/static", StaticFiles(directory=str(files("dicom_node.web") / "static")),
                                     name="static")]
    middleware = [Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie=SESSION_COOKIE,
                             max_age=web.session_max_age_s, same_site="strict", https_only=web.secure_cookies),
                  Middleware(_SecurityHeaders)]
    return Starlette(routes=routes, middleware=middleware)


class _SecurityHeaders:
    """Headers on every response: no framing, no sniffing, scripts and styles from this site only."""

    HEADERS: ClassVar[tuple[tuple[bytes, bytes], ...]] = (
        (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"))

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
