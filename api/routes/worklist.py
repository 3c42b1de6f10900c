"""The radiologists' worklist: sorted reading, claims and completion."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api import worklist
from api.auth import Principal, require_operator, require_radiologist, require_read
from api.queries import results_run
from api.routes.common import bad_request, db, parse_statuses, rules
from db.models import Study

router = APIRouter(tags=["worklist"])


@router.get("/worklist", summary="Worklist items sorted by computed priority (highest first)")
def get_worklist(request: Request, limit: int | None = Query(None, ge=1),
                 offset: int = Query(0, ge=0),
                 status: list[str] | None = Query(None, description="unread, claimed, completed or all; "
                                                                     "comma-separated or repeated (default unread,claimed)"),
                 state: str | None = Query(None, description="Run state of the item's run, e.g. delivered"),
                 _: Principal = Depends(require_read)) -> JSONResponse:
    the_rules = rules(request)
    limit = min(limit or the_rules.default_limit, the_rules.max_limit)
    with db(request) as session:
        try:
            entries = worklist.list_worklist(session, the_rules, statuses=parse_statuses(status, worklist.OPEN_STATUSES),
                                             run_state=state or None, limit=limit, offset=offset)
        except ValueError as exc:
            raise bad_request(exc) from exc
    return JSONResponse([e.as_dict() for e in entries])


@router.get("/worklist/{study_uid}", summary="The worklist entry of one study")
def get_entry(study_uid: str, request: Request, _: Principal = Depends(require_read)) -> JSONResponse:
    with db(request) as session:
        entry = worklist.get_entry(session, study_uid, rules(request))
    if entry is None:
        raise HTTPException(404, f"study {study_uid} is not on the worklist")
    return JSONResponse(entry.as_dict())


def _change(request: Request, study_uid: str, principal: Principal, action) -> JSONResponse:
    with db(request) as session:
        try:
            action(session, study_uid, principal.name, principal.role)
            session.commit()
        except worklist.WorklistError as exc:
            session.rollback()
            raise HTTPException(exc.status_code, str(exc)) from exc
        entry = worklist.get_entry(session, study_uid, rules(request))
    return JSONResponse(entry.as_dict())  # type: ignore[union-attr]


@router.post("/worklist/{study_uid}/claim", summary="Claim a study for reading (radiologist or operator)")
def claim(study_uid: str, request: Request, principal: Principal = Depends(require_radiologist)) -> JSONResponse:
    return _change(request, study_uid, principal, worklist.claim)


@router.post("/worklist/{study_uid}/release", summary="Give a claim back (the claimer, or an operator)")
def release(study_uid: str, request: Request, principal: Principal = Depends(require_radiologist)) -> JSONResponse:
    return _change(request, study_uid, principal, worklist.release)


@router.post("/worklist/{study_uid}/complete", summary="Mark a claimed study read (the claimer, or an operator)")
def complete(study_uid: str, request: Request, principal: Principal = Depends(require_radiologist)) -> JSONResponse:
    return _change(request, study_uid, principal, worklist.complete)


@router.post("/worklist/{study_uid}/refresh", summary="Recompute the item from the study's findings (operator)")
def refresh(study_uid: str, request: Request, principal: Principal = Depends(require_operator)) -> JSONResponse:
    with db(request) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        run = results_run(session, study) if study is not None else None
        if run is None:
            raise HTTPException(404, f"study {study_uid} has no run with results")
        worklist.refresh_worklist_item(session, run.id, rules(request), actor=principal.name)
        session.commit()
        entry = worklist.get_entry(session, study_uid, rules(request))
    return JSONResponse(entry.as_dict())  # type: ignore[union-attr]
