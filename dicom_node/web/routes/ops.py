"""``/healthz`` (anonymous) and ``/metrics`` (Prometheus; signed in, HTTP Basic with an account, or
anonymous with ``web.metrics_anonymous``). Basic authentication's failures are throttled as the
sign-in form's are (429 with Retry-After), its argon2 check runs off the event loop
(``Site.basic_account``)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.observability import CONTENT_TYPE
from dicom_node.web.site import Site


def routes(site: Site) -> list[Route]:
    ctx, web = site.ctx, site.web

    def healthz(request: Request) -> Response:  # reads the ledger: a plain function, run in the threadpool
        try:
            ctx.ledger.state_counts()
        except Exception as exc:  # noqa: BLE001 - any ledger failure is an unhealthy node (503)
            return JSONResponse({"status": "error", "error": f"ledger: {type(exc).__name__}"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        if not web.metrics_anonymous and await run_in_threadpool(site.user_of, request) is None:
            account = await site.basic_account(request, "metrics")
            if isinstance(account, Response):
                return account
            if not account.role.sees_pages:  # a sender stores by STOW-RS, nothing else
                return PlainTextResponse(f"{account.name} is {account.role}: it reads no metrics\n", 403)
        exposition = await run_in_threadpool(ctx.node.metrics.exposition)
        return Response(exposition, media_type=CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/metrics", metrics)]
