"""``/healthz`` (anonymous) and ``/metrics`` (Prometheus; signed in, HTTP Basic with an account, or
anonymous with ``web.metrics_anonymous``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.observability import CONTENT_TYPE
from dicom_node.web.security import basic_account
from dicom_node.web.site import Site


def routes(site: Site) -> list[Route]:
    ctx, web = site.ctx, site.web

    # Both read the ledger or hash a password: plain functions, which Starlette runs in its threadpool.

    def healthz(request: Request) -> Response:
        try:
            ctx.ledger.state_counts()
        except Exception as exc:  # noqa: BLE001 - any ledger failure is an unhealthy node (503)
            return JSONResponse({"status": "error", "error": f"ledger: {type(exc).__name__}"}, 503)
        return JSONResponse({"status": "ok"})

    def metrics(request: Request) -> Response:
        if not web.metrics_anonymous and site.user_of(request) is None:
            account = basic_account(request.headers.get("authorization"), ctx.accounts.accounts())
            if account is None or not account.role.sees_pages:
                return PlainTextResponse("sign in, or HTTP Basic authentication with an account\n", 401,
                                         headers={"WWW-Authenticate": 'Basic realm="lumbar-node metrics"'})
        return Response(ctx.node.metrics.exposition(), media_type=CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/metrics", metrics)]
