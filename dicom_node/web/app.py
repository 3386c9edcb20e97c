"""The web application (Starlette): the routes of ``web/routes/`` assembled, the static files and
the security headers. Every page but ``/healthz`` (and ``/metrics`` when ``web.metrics_anonymous``)
needs a signed-in user (a server-side session, ``web.sessions``); every action (POST) needs the
session's CSRF token, and the sign-in form its own token; grading, sending again and the accounts'
sessions need an administrator. Sign-ins and actions go to the audit trail. Nothing but the static
files may be cached: every other answer (pages, downloads, heatmaps) is ``Cache-Control: no-store``."""

from __future__ import annotations

from importlib.resources import files
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from dicom_node.web.context import NodeActions, WebContext
from dicom_node.web.routes import accounts, auth, dicomweb, fetch, ops, studies, uploads
from dicom_node.web.security import SESSION_COOKIE
from dicom_node.web.site import Site

__all__ = ["SESSION_COOKIE", "NodeActions", "WebContext", "build_app"]


def build_app(ctx: WebContext) -> Starlette:
    """The web application over ``ctx`` (its sessions kept on the server: they outlive a restart)."""
    site = Site(ctx)
    routes: list[BaseRoute] = [*ops.routes(site), *auth.routes(site), *accounts.routes(site), *studies.routes(site),
                               *uploads.routes(site), *dicomweb.routes(site), *fetch.routes(site),
                               Mount("/static", StaticFiles(directory=str(files("dicom_node.web") / "static")),
                                     name="static")]
    return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])


class _SecurityHeaders:
    """Headers on every response: no framing, no sniffing, scripts and styles from this site only;
    and no caching of anything but the static files (pages and downloads carry patient data)."""

    HEADERS: ClassVar[tuple[tuple[bytes, bytes], ...]] = (
        (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"))

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        static = str(scope.get("path", "")).startswith("/static/")

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not static:
                    headers = [(k, v) for k, v in headers if k.lower() not in (b"cache-control", b"expires")]
                    headers += [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
                message["headers"] = [*headers, *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
