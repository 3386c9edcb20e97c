"""The upload of a study to grade: the form, and the post that parses, spools and records it (the
parsing and storing are ``web.uploads``), then asks the node to grade it at once."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node.observability import get_logger
from dicom_node.web.security import User
from dicom_node.web.site import MAX_UPLOAD_FILES, Site
from dicom_node.web.uploads import EXPECTED, UploadError, parse_upload, store_upload

log = get_logger(__name__)


def routes(site: Site) -> list[Route]:
    ctx, web, render, page = site.ctx, site.web, site.render, site.page
    spool = Path(ctx.settings.storage.spool_dir)

    async def upload_form(request: Request, user: User) -> Response:
        return render(request, "upload.html", user, expected=EXPECTED, max_mb=web.upload_max_mb)

    async def upload(request: Request, user: User) -> Response:
        max_bytes = int(web.upload_max_mb * 2**20)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return JSONResponse({"error": f"Nothing chosen: choose {EXPECTED}"}, 400)
        form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=100)  # parsed (and checked) by page()
        try:
            parts = []
            for item in form.getlist("files"):
                if isinstance(item, UploadFile):
                    parts.append((item.filename or "file", await item.read()))
            try:
                instances = await run_in_threadpool(parse_upload, parts, max_bytes)
                study_uid = await run_in_threadpool(store_upload, instances, ctx.ledger, spool, user.name,
                                                    ctx.settings.storage.fsync)
            except UploadError as exc:
                # the kind only: the message names the user's files, and a file name may hold a patient's name
                log.info("upload refused", user=user.name, why=str(exc).split(":", 1)[0])
                return JSONResponse({"error": str(exc)}, 400)
        finally:
            await form.close()
        ctx.node.metrics.instances_received.labels("upload").inc(len(instances))
        ctx.node.metrics.received_bytes.labels("upload").inc(sum(len(i.data) for i in instances))
        ctx.node.release_now(study_uid)
        log.info("study uploaded", user=user.name, study_uid=study_uid, instances=len(instances))
        return JSONResponse({"study_uid": study_uid, "url": f"/upload/{quote(study_uid)}"})

    return [
        Route("/upload", page(upload_form), methods=["GET"]),
        Route("/upload", page(upload), methods=["POST"]),
    ]
