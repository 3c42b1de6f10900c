"""Server-rendered web pages (Jinja2 + a little plain JS): the sorted worklist and a study page.

Pages authenticate with the login cookie (see :mod:`api.auth`). A browser without it is sent to ``/login``.
``?token=`` on a page sets the cookie and redirects to the same address without the token, so the token does
not stay in the address bar or the history.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api import queries, worklist
from api.auth import CSRF_HEADER, Principal, authenticate
from api.routes.common import db, parse_statuses, rules
from api.settings import Role
from db.models import RunState

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))
router = APIRouter(include_in_schema=False)


def _set_cookie(request: Request, response: Response, token: str) -> None:
    auth = request.app.state.tokens.auth
    response.set_cookie(auth.cookie_name, token, max_age=auth.cookie_max_age_s, httponly=True, samesite="strict",
                        secure=auth.cookie_secure, path="/")


def _local(next_path: str | None) -> str:
    # Only same-site paths: an open redirect after login would be a phishing aid.
    if not next_path or not next_path.startswith("/") or next_path.startswith("//") or "\\" in next_path:
        return "/"
    return next_path


def _page_principal(request: Request) -> Principal | Response:
    """The cookie's principal, or the response that gets one (token hand-over redirect, or the login page)."""
    token = request.query_params.get("token")
    if token is not None:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(params)}" if params else "")
        if request.app.state.tokens.lookup(token) is None:
            return RedirectResponse(f"/login?{urlencode({'next': target, 'error': '1'})}", status_code=303)
        response = RedirectResponse(target, status_code=303)
        _set_cookie(request, response, token)
        return response
    principal = authenticate(request)
    if principal is None:
        next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': next_path})}", status_code=303)
    return principal


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/", error: str | None = None) -> Response:
    return TEMPLATES.TemplateResponse(request, "login.html", {"next": _local(next), "error": bool(error)},
                                      status_code=401 if error else 200)


@router.post("/login")
def login(request: Request, token: str = Form(...), next: str = Form("/")) -> Response:
    if request.app.state.tokens.lookup(token) is None:
        return TEMPLATES.TemplateResponse(request, "login.html", {"next": _local(next), "error": True},
                                          status_code=401)
    response = RedirectResponse(_local(next), status_code=303)
    _set_cookie(request, response, token)
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(request.app.state.tokens.auth.cookie_name, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def worklist_page(request: Request, status: str | None = None, state: str | None = None,
                  refresh: int = 30) -> Response:
    principal = _page_principal(request)
    if isinstance(principal, Response):
        return principal
    the_rules = rules(request)
    statuses = parse_statuses([status] if status else None, worklist.OPEN_STATUSES)
    error = None
    with db(request) as session:
        try:
            entries = worklist.list_worklist(session, the_rules, statuses=statuses, run_state=state or None,
                                             limit=the_rules.default_limit)
        except ValueError as exc:
            entries, error = [], str(exc)
    return TEMPLATES.TemplateResponse(request, "worklist.html", {
        "principal": principal, "entries": entries, "status": status or "", "state": state or "",
        "states": [s.value for s in RunState], "refresh_s": max(5, min(refresh, 3600)), "error": error,
        "can_claim": principal.role.allows(Role.RADIOLOGIST), "csrf_header": CSRF_HEADER,
    }, status_code=400 if error else 200)


@router.get("/ui/studies/{study_uid}", response_class=HTMLResponse)
def study_page(study_uid: str, request: Request, window: str = "auto") -> Response:
    principal = _page_principal(request)
    if isinstance(principal, Response):
        return principal
    with db(request) as session:
        try:
            detail = queries.study_detail(session, study_uid, rules(request))
            findings = queries.study_findings(session, study_uid, rules(request))
        except queries.NotFound as exc:
            return TEMPLATES.TemplateResponse(request, "error.html", {"principal": principal, "message": str(exc)},
                                              status_code=404)
    return TEMPLATES.TemplateResponse(request, "study.html", {
        "principal": principal, "study": detail, "findings": findings, "window": window,
        "can_claim": principal.role.allows(Role.RADIOLOGIST), "csrf_header": CSRF_HEADER,
    })
