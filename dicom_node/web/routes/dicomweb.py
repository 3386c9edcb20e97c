"""STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies`` and ``/dicom-web/studies/{study}``, for a
PACS or an archive that sends by DICOMweb. HTTP Basic with an account whose role stores (a
``sender``, or an ``admin``): 401 without, 403 for a viewer, both audited. The body, a
``multipart/related; type="application/dicom"``, is streamed to the spool's staging area as it
arrives and counted (``dicomweb.read_related``: 415 another media type, 400 a malformed body, 413
over ``web.upload_max_mb``), then each instance goes through the node's one admission
(``dicomweb.store_parts``); the answer is the Store Instances Response in DICOM JSON."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node.dicomweb import RESPONSE_TYPE, RelatedLimits, StowError, boundary_of, read_related, store_parts
from dicom_node.ingest import Admission
from dicom_node.observability import get_logger
from dicom_node.states import EventKind
from dicom_node.store import uid_problem
from dicom_node.web.accounts import Account
from dicom_node.web.security import basic_credentials
from dicom_node.web.site import Site

log = get_logger(__name__)
MiB = 2**20


def routes(site: Site) -> list[Route]:
    ctx, web = site.ctx, site.web
    admission = Admission(ctx.settings, ctx.ledger, ctx.node.metrics)
    limits = RelatedLimits(max_bytes=int(web.upload_max_mb * MiB),
                           min_free_bytes=ctx.settings.storage.min_free_disk_mb * MiB)

    def refuse_sign_in(name: str, address: str | None) -> None:
        ctx.ledger.add_event(EventKind.SIGN_IN_REFUSED, name[:64] or "-", None, "STOW-RS: wrong name or password",
                             {"address": address})
        log.warning("STOW-RS: sign-in refused", user=name[:64] or "-")

    def refuse_role(account: Account, study_uid: str | None) -> None:
        ctx.ledger.add_event(EventKind.REFUSED, account.name, None,
                             f"store by STOW-RS: {account.name} is {account.role}, only a sender or an administrator "
                             "may", {"study_uid": study_uid})
        log.warning("STOW-RS refused: the role may not store", user=account.name, role=str(account.role))

    async def stow(request: Request) -> Response:
        study_uid: str | None = request.path_params.get("study")
        address = request.client.host if request.client else None
        account = await site.basic_account(request, "STOW-RS")  # throttled as the sign-in form is
        if isinstance(account, Response):
            credentials = basic_credentials(request.headers.get("authorization"))
            if account.status_code == 401 and credentials is not None:
                await run_in_threadpool(refuse_sign_in, credentials[0], address)
            return account
        if not account.role.stores:
            await run_in_threadpool(refuse_role, account, study_uid)
            return JSONResponse({"error": f"{account.name} is {account.role}: only a sender or an administrator "
                                          "may store"}, 403)
        if study_uid is not None and (problem := uid_problem(study_uid, "Study Instance UID")) is not None:
            return JSONResponse({"error": f"the URL's {problem}"}, 400)
        content_type = request.headers.get("content-type", "")
        try:
            boundary_of(content_type)  # 415 before a byte of the body is read or staged
            with admission.staging.area() as area:
                received = await read_related(request.stream(), content_type, area, limits,
                                              request.headers.get("content-length"))
                result = await run_in_threadpool(store_parts, received.parts, admission, account.name, study_uid)
        except StowError as exc:
            log.info("STOW-RS request refused", user=account.name, status=exc.http_status, why=str(exc))
            return JSONResponse({"error": str(exc)}, exc.http_status)
        except ClientDisconnect:
            log.info("STOW-RS request broke off", user=account.name)
            return Response(status_code=400)
        log.info("STOW-RS request", user=account.name, stored=len(result.stored), failed=len(result.failed),
                 studies=sorted(result.study_uids), status=result.http_status)
        return JSONResponse(result.response(), result.http_status, media_type=RESPONSE_TYPE)

    return [
        Route("/dicom-web/studies", stow, methods=["POST"]),
        Route("/dicom-web/studies/{study}", stow, methods=["POST"]),
    ]
