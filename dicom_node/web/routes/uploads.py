"""The upload of a study to grade: the form, and the post. The post's body is streamed to the
spool's staging area as it arrives (``ingest.read_upload``: the whole upload counted while it is
read, 413 as soon as it passes ``web.upload_max_mb``), its CSRF token checked before the first file
byte is written; zips are expanded from their staged files with one running total; then the node's
one admission takes every file or none (``ingest.admit_upload``) and the node is asked to grade it at
once. Refusals are logged by kind only: a file name may hold a patient's name."""

from __future__ import annotations

from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node.ingest import (
    EXPECTED,
    Admission,
    StagedFile,
    StagingArea,
    UploadError,
    UploadLimits,
    UploadProblem,
    UploadResult,
    admit_upload,
    expand_zips,
    read_upload,
)
from dicom_node.observability import get_logger
from dicom_node.web.security import CSRF_FIELD, CSRF_HEADER, User, tokens_match
from dicom_node.web.site import MAX_UPLOAD_FILES, Site

log = get_logger(__name__)
MiB = 2**20
FORM_OUT_OF_DATE = "Refused: the form was out of date (CSRF token missing or wrong): reload the page and try again."


def routes(site: Site) -> list[Route]:
    ctx, web, render, page = site.ctx, site.web, site.render, site.page
    admission = Admission(ctx.settings, ctx.ledger, ctx.node.metrics)
    limits = UploadLimits(max_bytes=int(web.upload_max_mb * MiB), max_files=MAX_UPLOAD_FILES,
                          min_free_bytes=ctx.settings.storage.min_free_disk_mb * MiB)

    def admit(files: list[StagedFile], area: StagingArea, user: str) -> UploadResult:
        return admit_upload(expand_zips(files, area, limits), admission, user)

    async def upload_form(request: Request, user: User) -> Response:
        return render(request, "upload.html", user, expected=EXPECTED, max_mb=web.upload_max_mb)

    async def upload(request: Request, user: User) -> Response:
        header_token = request.headers.get(CSRF_HEADER)  # checked by page() when present

        def token_checked(fields: dict[str, str]) -> None:
            if header_token is None and not tokens_match(site.csrf_of(request), fields.get(CSRF_FIELD)):
                raise UploadError(UploadProblem.FORBIDDEN, FORM_OUT_OF_DATE, 403)

        with admission.staging.area() as area:
            try:
                received = await read_upload(request.stream(), request.headers.get("content-type", ""), area, limits,
                                             token_checked, request.headers.get("content-length"))
                token_checked(received.fields)  # an upload without files: its fields came whole
                result = await run_in_threadpool(admit, received.files, area, user.name)
            except UploadError as exc:
                log.info("upload refused", user=user.name, why=str(exc.kind))
                return JSONResponse({"error": str(exc)}, exc.http_status)
            except ClientDisconnect:
                log.info("upload broke off", user=user.name)
                return Response(status_code=400)
        ctx.node.release_now(result.study_uid)
        log.info("study uploaded", user=user.name, study_uid=result.study_uid, instances=result.stored,
                 already_held=result.held, send_stopped=result.send_stopped)
        return JSONResponse({"study_uid": result.study_uid, "url": f"/upload/{quote(result.study_uid)}"})

    return [
        Route("/upload", page(upload_form), methods=["GET"]),
        Route("/upload", page(upload, streamed=True), methods=["POST"]),
    ]
