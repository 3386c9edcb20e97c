"""``/healthz`` (anonymous) and ``/metrics`` (Prometheus; signed in, HTTP Basic with an account, or
anonymous with ``web.metrics_anonymous``). Basic authentication's failures are throttled as the
sign-in form's are (429 with Retry-After), its argon2 check runs off the event loop."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.observability import CONTENT_TYPE
from dicom_node.web.accounts import Account, AccountError, authenticate
from dicom_node.web.routes.auth import audit_throttle, too_many
from dicom_node.web.security import basic_credentials
from dicom_node.web.site import Site
from dicom_node.web.throttle import retry_after

CHALLENGE = {"WWW-Authenticate": 'Basic realm="lumbar-node metrics"'}


def routes(site: Site) -> list[Route]:
    ctx, web = site.ctx, site.web

    def healthz(request: Request) -> Response:  # reads the ledger: a plain function, run in the threadpool
        try:
            ctx.ledger.state_counts()
        except Exception as exc:  # noqa: BLE001 - any ledger failure is an unhealthy node (503)
            return JSONResponse({"status": "error", "error": f"ledger: {type(exc).__name__}"}, 503)
        return JSONResponse({"status": "ok"})

    def _check(name: str, password: str) -> Account | None:
        try:
            return authenticate(ctx.accounts.accounts(), name, password)
        except AccountError:
            return None

    async def metrics(request: Request) -> Response:
        if not web.metrics_anonymous and await run_in_threadpool(site.user_of, request) is None:
            credentials = basic_credentials(request.headers.get("authorization"))
            if credentials is None:
                return PlainTextResponse("sign in, or HTTP Basic authentication with an account\n", 401,
                                         headers=CHALLENGE)
            name, address = credentials[0], request.client.host if request.client else None
            wait, _ = site.throttle.wait(name, address)
            if wait > 0:
                return PlainTextResponse(f"{too_many(wait)}\n", 429, headers={"Retry-After": retry_after(wait)})
            if await site.check_password(_check, *credentials) is None:
                wait = site.throttle.failed(name, address)
                headers = dict(CHALLENGE)
                if wait > 0:
                    await run_in_threadpool(audit_throttle, site, name, address, wait, "/metrics")
                    headers["Retry-After"] = retry_after(wait)
                return PlainTextResponse("wrong name or password\n", 401, headers=headers)
            site.throttle.succeeded(name)
        exposition = await run_in_threadpool(ctx.node.metrics.exposition)
        return Response(exposition, media_type=CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/metrics", metrics)]
