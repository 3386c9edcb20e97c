"""The web page's routes (Starlette): sign-in, dashboard, study page, actions, upload, downloads,
``/metrics`` and ``/healthz``. Every page but ``/healthz`` (and ``/metrics`` when
``web.metrics_anonymous``) needs a signed-in user; every action (POST) needs the session's CSRF
token; grading and sending again need an administrator. Sign-ins and actions go to the audit trail."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dicom_node.accounts import AccountError, authenticate
from dicom_node.config import Settings
from dicom_node.ledger import Ledger
from dicom_node.logconfig import get_logger
from dicom_node.metrics import CONTENT_TYPE, NodeMetrics
from dicom_node.safety import uid_problem
from dicom_node.states import EventKind, StudyState
from dicom_node.web.results import levels, patient_of, pdf_bytes, run_view, sc_png
from dicom_node.web.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    AccountsFile,
    User,
    basic_credentials,
    csrf_ok,
    session_user,
    sign_in,
)
from dicom_node.web.uploads import EXPECTED, UploadError, parse_upload, store_upload

log = get_logger(__name__)
SESSION_COOKIE = "lumbar_node_session"
MAX_UPLOAD_FILES = 20000


class NodeActions(Protocol):
    """What the web page asks of the running node (dicom_node.node.Node provides it)."""

    metrics: NodeMetrics

    def grade_again(self, study_uid: str, actor: str) -> bool: ...

    def send_again(self, study_uid: str, actor: str) -> int: ...

    def release_now(self, study_uid: str) -> None: ...


@dataclass
class WebContext:
    settings: Settings
    ledger: Ledger  # the web page's own connection to the node's ledger
    node: NodeActions
    accounts: AccountsFile


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _percent(p: float) -> str:
    return f"{100 * p:.0f}%"


def _grade_class(grade: str | None) -> str:
    return {"Normal/Mild": "g-normal", "Moderate": "g-moderate", "Severe": "g-severe"}.get(grade or "", "g-none")


_TEMPLATES = Jinja2Templates(directory=str(files("dicom_node.web") / "templates"))
_TEMPLATES.env.filters.update(when=_when, percent=_percent, grade_class=_grade_class)


def build_app(ctx: WebContext) -> Starlette:
    """The web application over ``ctx`` (a new session secret each start: a restart signs everyone out)."""
    web = ctx.settings.web
    spool = Path(ctx.settings.storage.spool_dir)

    def user_of(request: Request) -> User | None:
        try:
            return session_user(request.session, ctx.accounts.accounts(), web.session_max_age_s)
        except AccountError as exc:
            log.error("cannot read the accounts file", error=str(exc))
            return None

    def render(request: Request, name: str, user: User | None, status: int = 200, **values: Any) -> Response:
        return _TEMPLATES.TemplateResponse(request, name, {"user": user, "csrf": request.session.get("csrf", ""),
                                                           "states": list(StudyState), **values}, status_code=status)

    def page(handler: Callable[[Request, User], Awaitable[Response]], admin: bool = False,
             action: str = "") -> Callable[[Request], Awaitable[Response]]:
        """A route for signed-in users (anonymous: to the sign-in page); an action (POST) also
        needs the CSRF token, and ``admin`` an administrator (refusals are audited)."""

        async def endpoint(request: Request) -> Response:
            user = user_of(request)
            if user is None:
                if request.method == "GET" and "application/json" not in request.headers.get("accept", ""):
                    return RedirectResponse(f"/signin?{urlencode({'next': request.url.path})}", 303)
                return JSONResponse({"error": "sign in first"}, 401)
            if request.method == "POST":
                token = request.headers.get(CSRF_HEADER)
                content_type = request.headers.get("content-type", "")
                if token is None and content_type.startswith("multipart/form-data"):
                    declared = request.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > web.upload_max_mb * 2**20 + 2**20:
                        return JSONResponse({"error": f"Too large: the upload is over the limit of "
                                                      f"{web.upload_max_mb:g} MiB (web.upload_max_mb)"}, 413)
                    try:  # parsed once: the handler gets the same (cached) form
                        token = (await request.form(max_files=MAX_UPLOAD_FILES, max_fields=100)).get(CSRF_FIELD)
                    except Exception as exc:  # noqa: BLE001 - a malformed or over-long form
                        return JSONResponse({"error": f"The upload could not be read: {exc}"}, 400)
                elif token is None and content_type.startswith("application/x-www-form-urlencoded"):
                    token = (await request.form()).get(CSRF_FIELD)
                if not csrf_ok(request.session, token if isinstance(token, str) else None):
                    return render(request, "message.html", user, 403, title="Refused",
                                  message="The form was out of date (CSRF token missing or wrong): reload the page "
                                          "and try again.")
                if admin and not user.admin:
                    study_uid = request.path_params.get("study_uid")
                    ctx.ledger.add_event(EventKind.REFUSED, user.name, study_uid, f"{action}: {user.name} is "
                                         f"{user.role}, only an administrator may")
                    log.warning("action refused: not an administrator", action=action, user=user.name,
                                study_uid=study_uid)
                    return render(request, "message.html", user, 403, title="Not allowed",
                                  message=f"Only an administrator may {action}; you are signed in as "
                                          f"{user.name} ({user.role}).")
            return await handler(request, user)

        return endpoint

    # -- anonymous ---------------------------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        try:
            ctx.ledger.state_counts()
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "error", "error": f"ledger: {type(exc).__name__}"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        if not web.metrics_anonymous and user_of(request) is None:
            credentials = basic_credentials(request.headers.get("authorization"))
            if credentials is None or authenticate(ctx.accounts.accounts(), *credentials) is None:
                return PlainTextResponse("sign in, or HTTP Basic authentication with an account\n", 401,
                                         headers={"WWW-Authenticate": 'Basic realm="lumbar-node metrics"'})
        return Response(ctx.node.metrics.exposition(), media_type=CONTENT_TYPE)

    async def signin_form(request: Request) -> Response:
        return render(request, "signin.html", None, next=_safe_next(request.query_params.get("next")))

    async def signin(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        target = _safe_next(str(form.get("next", "/")))
        try:
            account = authenticate(ctx.accounts.accounts(), name, password)
        except AccountError as exc:
            log.error("cannot read the accounts file", error=str(exc))
            account = None
        if account is None:
            ctx.ledger.add_event(EventKind.SIGN_IN_REFUSED, name[:64] or "-", None, "wrong name or password",
                                 {"address": request.client.host if request.client else None})
            log.warning("sign-in refused", user=name[:64])
            return render(request, "signin.html", None, 401, next=target, error="Wrong name or password.")
        sign_in(request.session, account)
        ctx.ledger.add_event(EventKind.SIGNED_IN, account.name, None, f"{account.name} ({account.role})",
                             {"address": request.client.host if request.client else None})
        log.info("signed in", user=account.name, role=str(account.role))
        return RedirectResponse(target, 303)

    async def signout(request: Request, user: User) -> Response:
        request.session.clear()
        ctx.ledger.add_event(EventKind.SIGNED_OUT, user.name, None, user.name)
        return RedirectResponse("/signin", 303)

    # -- pages -------------------------------------------------------------------------------------

    async def dashboard(request: Request, user: User) -> Response:
        params = request.query_params
        state = params.get("state") or None
        state_value = StudyState(state) if state in {s.value for s in StudyState} else None
        search = (params.get("q") or "").strip()[:64] or None
        try:
            page_no = max(1, int(params.get("page", "1")))
        except ValueError:
            page_no = 1
        started = time.perf_counter()
        rows, total = await run_in_threadpool(ctx.ledger.dashboard, state_value, search,
                                              (page_no - 1) * web.page_size, web.page_size)
        counts = await run_in_threadpool(ctx.ledger.state_counts)
        pages = max(1, math.ceil(total / web.page_size))
        query = {k: v for k, v in (("state", state_value and str(state_value)), ("q", search)) if v}
        return render(request, "dashboard.html", user, rows=rows, total=total, page=page_no, pages=pages,
                      state=state_value, q=search or "", counts=counts, query=urlencode(query),
                      query_ms=(time.perf_counter() - started) * 1000)

    def _study_or_404(request: Request) -> str | None:
        study_uid = request.path_params["study_uid"]
        if uid_problem(study_uid, "Study Instance UID") is not None or ctx.ledger.study(study_uid) is None:
            return None
        return study_uid

    def _not_found(request: Request, user: User) -> Response:
        return render(request, "message.html", user, 404, title="Not found",
                      message="The node's ledger holds no such study.")

    def _view(study_uid: str) -> Any:
        report = ctx.ledger.last_report(study_uid)
        return run_view(report.sr_path, report.run) if report is not None else None

    async def study_page(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        if study_uid is None:
            return _not_found(request, user)
        study = ctx.ledger.study(study_uid)
        series = ctx.ledger.series_counts(study_uid)
        name, patient_id = patient_of(Path(series[0][3])) if series else ("", "")
        upload = ctx.ledger.upload(study_uid)
        template = "upload_result.html" if request.url.path.startswith("/upload/") else "study.html"
        return render(request, template, user, study=study, series=series, view=_view(study_uid),
                      events=ctx.ledger.events(study_uid), deliveries=ctx.ledger.deliveries(study_uid),
                      upload=upload, patient_name=name, patient_id=patient_id, levels=levels(),
                      destinations=[d.name for d in ctx.settings.destinations])

    async def study_status(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        if study_uid is None:
            return JSONResponse({"error": "no such study"}, 404)
        study = ctx.ledger.study(study_uid)
        assert study is not None
        return JSONResponse({"study_uid": study_uid, "state": str(study.state), "reason": study.reason,
                             "final": study.state.final or (study.state is StudyState.SENDING
                                                            and ctx.ledger.last_report(study_uid) is not None)})

    async def grade_again(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        if study_uid is None:
            return _not_found(request, user)
        ctx.node.grade_again(study_uid, user.name)
        log.info("grade again requested", user=user.name, study_uid=study_uid)
        return RedirectResponse(_back(request, study_uid), 303)

    async def send_again(request: Request, user: User) -> Response:
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

    # -- downloads ---------------------------------------------------------------------------------

    async def download(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        view = _view(study_uid) if study_uid else None
        what = request.path_params["what"]
        if view is None:
            return PlainTextResponse("no result for this study\n", 404)
        short = study_uid[-12:] if study_uid else "study"
        if what == "result.json":
            return Response((view.folder / "results.json").read_bytes(), media_type="application/json",
                            headers=_attachment(f"lumbar-result-{short}.json"))
        if what == "sr.dcm" and (sr := view.sr_file()) is not None:
            return Response(sr.read_bytes(), media_type="application/dicom", headers=_attachment(f"SR-{short}.dcm"))
        if what == "summary.pdf" and (pdf := view.pdf_file()) is not None:
            return Response(pdf_bytes(pdf), media_type="application/pdf", headers=_attachment(f"summary-{short}.pdf"))
        if what == "pdf.dcm" and (pdf := view.pdf_file()) is not None:
            return Response(pdf.read_bytes(), media_type="application/dicom", headers=_attachment(f"PDF-{short}.dcm"))
        return PlainTextResponse("no such file\n", 404)

    async def heatmap(request: Request, user: User) -> Response:
        study_uid = _study_or_404(request)
        view = _view(study_uid) if study_uid else None
        scs = view.sc_files() if view else []
        index = request.path_params["index"]
        if not 0 <= index < len(scs):
            return PlainTextResponse("no such image\n", 404)
        if request.path_params["ext"] == "dcm":
            return Response(scs[index].read_bytes(), media_type="application/dicom",
                            headers=_attachment(scs[index].name))
        return Response(await run_in_threadpool(sc_png, scs[index]), media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # -- upload ------------------------------------------------------------------------------------

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

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", page(signout), methods=["POST"]),
        Route("/", page(dashboard)),
        Route("/upload", page(upload_form), methods=["GET"]),
        Route("/upload", page(upload), methods=["POST"]),
        Route("/upload/{study_uid}", page(study_page)),
        Route("/studies/{study_uid}", page(study_page)),
        Route("/studies/{study_uid}/status", page(study_status)),
        Route("/studies/{study_uid}/grade-again", page(grade_again, admin=True, action="grade a study again"),
              methods=["POST"]),
        Route("/studies/{study_uid}/send-again", page(send_again, admin=True, action="send results to the PACS"),
              methods=["POST"]),
        Route("/studies/{study_uid}/files/{what}", page(download)),
        Route("/studies/{study_uid}/heatmaps/{index:int}.{ext:str}", page(heatmap)),
        Mount("/static", StaticFiles(directory=str(files("dicom_node.web") / "static")), name="static"),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie=SESSION_COOKIE,
                             max_age=web.session_max_age_s, same_site="strict", https_only=web.secure_cookies),
                  Middleware(_SecurityHeaders)]
    return Starlette(routes=routes, middleware=middleware)


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _safe_next(target: str | None) -> str:
    """A local path to go to after signing in (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class _SecurityHeaders:
    """Headers on every response: no framing, no sniffing, scripts and styles from this site only."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"same-origin"),
               (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")]

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
