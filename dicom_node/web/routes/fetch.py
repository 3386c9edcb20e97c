"""Fetching a study from the PACS by its accession number: the form and the list of recent
fetches (signed-in users), and the post (administrators, with the session's CSRF token, like
every action). The node finds, retrieves and grades the study in the background
(``NodeActions.fetch``: query/retrieve, ``pipeline.fetch``); the page shows how it goes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from dicom_node.observability import get_logger
from dicom_node.web.security import User
from dicom_node.web.site import Site

log = get_logger(__name__)

MAX_ACCESSION = 16  # AccessionNumber is an SH: at most 16 characters


def accession_problem(value: str) -> str | None:
    """Why a typed accession number cannot be asked for (None: it can)."""
    if not value:
        return "Type an accession number."
    if len(value) > MAX_ACCESSION:
        return f"An accession number has at most {MAX_ACCESSION} characters."
    if any(c in value for c in "\\*?") or not value.isprintable():
        return "An accession number has no backslash, wildcard (* ?) or control character."
    return None


def routes(site: Site) -> list[Route]:
    ctx, render, page = site.ctx, site.render, site.page

    def fetch_page(request: Request, user: User, error: str | None = None, status: int = 200) -> Response:
        jobs = ctx.node.fetches()
        running = any(job.finished_at is None for job in jobs)
        return render(request, "fetch.html", user, status, jobs=jobs, running=running, error=error,
                      can_fetch=ctx.node.can_fetch())

    def show(request: Request, user: User) -> Response:
        return fetch_page(request, user)

    async def start(request: Request, user: User) -> Response:
        form = await request.form()  # page() read it for the CSRF token: the same (cached) form
        value = form.get("accession")
        accession = value.strip() if isinstance(value, str) else ""
        problem = accession_problem(accession) or (None if ctx.node.can_fetch() else
                                                   "No query/retrieve source is configured.")
        if problem is not None:
            return fetch_page(request, user, problem, 400)
        job = ctx.node.fetch(accession, user.name)
        log.info("fetch requested", user=user.name, job=job.id)
        return RedirectResponse("/fetch", 303)

    return [
        Route("/fetch", page(show), methods=["GET"]),
        Route("/fetch", page(start, admin=True, action="fetch a study from the PACS"), methods=["POST"]),
    ]
