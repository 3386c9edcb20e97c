"""The studies: the dashboard (its page number range-checked: past the end, the last page; not a
number, 400), a study's page (and the upload's result page, the same study seen
from the upload), its status for polling, the administrator's actions (grade again, send again)
and the downloads of its newest run (result JSON, SR, PDF, Grad-CAM images)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node.observability import get_logger
from dicom_node.results import read_pdf
from dicom_node.states import StudyState
from dicom_node.store import uid_problem
from dicom_node.web.security import User
from dicom_node.web.site import Site
from dicom_node.web.views import RunView, levels, patient_of, run_view, sc_png

log = get_logger(__name__)
MAX_PAGE = 10**9  # a page number beyond any ledger (SQLite takes its offset as a 64-bit integer)


def routes(site: Site) -> list[Route]:
    ctx, web, render, page = site.ctx, site.web, site.render, site.page

    # Every handler here reads the ledger (SQLite) or the run's files: plain functions, which
    # page() runs in the threadpool, never on the event loop.

    def dashboard(request: Request, user: User) -> Response:
        params = request.query_params
        state = params.get("state") or None
        state_value = StudyState(state) if state in {s.value for s in StudyState} else None
        search = (params.get("q") or "").strip()[:64] or None
        asked = (params.get("page") or "1").strip()
        if not asked.isascii() or not asked.isdigit():
            return render(request, "message.html", user, 400, title="No such page",
                          message="A page number is a whole number, 1 or more.")
        page_no = max(1, min(int(asked[:12]) if len(asked) <= 12 else MAX_PAGE, MAX_PAGE))  # past the end: the last
        started = time.perf_counter()
        rows, total = ctx.ledger.dashboard(state_value, search, (page_no - 1) * web.page_size, web.page_size)
        pages = max(1, math.ceil(total / web.page_size))
        if page_no > pages:  # a page past the end: the last page
            page_no = pages
            rows, total = ctx.ledger.dashboard(state_value, search, (page_no - 1) * web.page_size, web.page_size)
            pages = max(1, math.ceil(total / web.page_size))
        counts = ctx.ledger.state_counts()
        query = {k: v for k, v in (("state", state_value and str(state_value)), ("q", search)) if v}
        return render(request, "dashboard.html", user, rows=rows, total=total, page=page_no, pages=pages,
                      state=state_value, q=search or "", counts=counts, query=urlencode(query),
                      query_ms=(time.perf_counter() - started) * 1000)

    def _study_or_404(request: Request) -> str | None:
        study_uid: str = request.path_params["study_uid"]
        if uid_problem(study_uid, "Study Instance UID") is not None or ctx.ledger.study(study_uid) is None:
            return None
        return study_uid

    def _not_found(request: Request, user: User) -> Response:
        return render(request, "message.html", user, 404, title="Not found",
                      message="The node's ledger holds no such study.")

    def _view(study_uid: str) -> RunView | None:
        report = ctx.ledger.last_report(study_uid)
        return run_view(report.sr_path, report.run) if report is not None else None

    def study_page(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        if study_uid is None:
            return _not_found(request, user)
        study = ctx.ledger.study(study_uid)
        series = ctx.ledger.series_counts(study_uid)
        name, patient_id = patient_of(Path(series[0].a_file)) if series else ("", "")
        upload = ctx.ledger.upload(study_uid)
        template = "upload_result.html" if request.url.path.startswith("/upload/") else "study.html"
        return render(request, template, user, study=study, series=series, view=_view(study_uid),
                      events=ctx.ledger.events(study_uid), deliveries=ctx.ledger.deliveries(study_uid),
                      upload=upload, patient_name=name, patient_id=patient_id, levels=levels(),
                      destinations=[d.name for d in ctx.settings.destinations])

    def study_status(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        study = ctx.ledger.study(study_uid) if study_uid is not None else None
        if study_uid is None or study is None:
            return JSONResponse({"error": "no such study"}, 404)
        return JSONResponse({"study_uid": study_uid, "state": str(study.state), "reason": study.reason,
                             "final": study.state.final or (study.state is StudyState.SENDING
                                                            and ctx.ledger.last_report(study_uid) is not None)})

    def grade_again(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        if study_uid is None:
            return _not_found(request, user)
        ctx.node.grade_again(study_uid, user.name)
        log.info("grade again requested", user=user.name, study_uid=study_uid)
        return RedirectResponse(_back(request, study_uid), 303)

    def send_again(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        if study_uid is None:
            return _not_found(request, user)
        if ctx.ledger.upload(study_uid) is not None:
            ctx.ledger.set_upload_send(study_uid, True)
        queued = ctx.node.send_again(study_uid, user.name)
        log.info("send again requested", user=user.name, study_uid=study_uid, deliveries=queued)
        if not queued:
            return render(request, "message.html", user, 409, title="Nothing to send",
                          message="This study has no report yet, or the node has no destination configured.")
        return RedirectResponse(_back(request, study_uid), 303)

    def _back(request: Request, study_uid: str) -> str:
        referer = request.headers.get("referer", "")
        return f"/upload/{study_uid}" if "/upload/" in referer else f"/studies/{study_uid}"

    def download(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        view = _view(study_uid) if study_uid else None
        what = request.path_params["what"]
        if view is None:
            return PlainTextResponse("no result for this study\n", 404)
        short = study_uid[-12:] if study_uid else "study"
        try:
            if what == "result.json":
                return Response(view.json_file.read_bytes(), media_type="application/json",
                                headers=_attachment(f"lumbar-result-{short}.json"))
            if what == "sr.dcm" and (sr := view.sr_file()) is not None:
                return Response(sr.read_bytes(), media_type="application/dicom", headers=_attachment(f"SR-{short}.dcm"))
            if what == "summary.pdf" and (pdf := view.pdf_file()) is not None:
                return Response(read_pdf(pdf), media_type="application/pdf",
                                headers=_attachment(f"summary-{short}.pdf"))
            if what == "pdf.dcm" and (pdf := view.pdf_file()) is not None:
                return Response(pdf.read_bytes(), media_type="application/dicom",
                                headers=_attachment(f"PDF-{short}.dcm"))
        except (OSError, ValueError) as exc:  # purged meanwhile, or not a readable document
            log.warning("a run's file could not be read", study_uid=study_uid, what=what,
                        error=type(exc).__name__)
        return PlainTextResponse("no such file\n", 404)

    def heatmap(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        view = _view(study_uid) if study_uid else None
        scs = view.sc_files() if view else []
        index = request.path_params["index"]
        if not 0 <= index < len(scs):
            return PlainTextResponse("no such image\n", 404)
        try:
            if request.path_params["ext"] == "dcm":
                return Response(scs[index].read_bytes(), media_type="application/dicom",
                                headers=_attachment(scs[index].name))
            return Response(sc_png(scs[index]), media_type="image/png")  # no-store, as every page (web.app)
        except (OSError, ValueError) as exc:  # purged meanwhile, or not a readable image
            log.warning("a heatmap could not be read", study_uid=study_uid, error=type(exc).__name__)
            return PlainTextResponse("no such image\n", 404)

    return [
        Route("/", page(dashboard)),
        Route("/upload/{study_uid}", page(study_page)),
        Route("/studies/{study_uid}", page(study_page)),
        Route("/studies/{study_uid}/status", page(study_status)),
        Route("/studies/{study_uid}/grade-again", page(grade_again, admin=True, action="grade a study again"),
              methods=["POST"]),
        Route("/studies/{study_uid}/send-again", page(send_again, admin=True, action="send results to the PACS"),
              methods=["POST"]),
        Route("/studies/{study_uid}/files/{what}", page(download)),
        Route("/studies/{study_uid}/heatmaps/{index:int}.{ext:str}", page(heatmap)),
    ]


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}
