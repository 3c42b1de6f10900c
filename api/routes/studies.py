"""Studies, their findings and their generated result objects."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from api import queries
from api.auth import Principal, require_read
from api.render import WINDOWS, RenderError, render_png
from api.routes.common import bad_request, db, not_found, rules

router = APIRouter(tags=["studies"])


@router.get("/studies", summary="Studies known to the node, newest first, with their latest run state")
def list_studies(request: Request, state: str | None = Query(None, description="Latest run state, e.g. 'delivered'"),
                 since: dt.datetime | None = Query(None, description="Only studies with an instance received since (ISO 8601)"),
                 limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                 _: Principal = Depends(require_read)) -> JSONResponse:
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    with db(request) as session:
        try:
            return JSONResponse(queries.list_studies(session, state=state, since=since, limit=limit, offset=offset))
        except ValueError as exc:
            raise bad_request(exc) from exc


@router.get("/studies/{study_uid}", summary="A study: runs with stage timings, errors, deliveries, worklist entry")
def get_study(study_uid: str, request: Request, _: Principal = Depends(require_read)) -> JSONResponse:
    with db(request) as session:
        try:
            return JSONResponse(queries.study_detail(session, study_uid, rules(request)))
        except queries.NotFound as exc:
            raise not_found(exc) from exc


@router.get("/studies/{study_uid}/findings",
            summary="Every question and answer with its code, organ measurements, urgency and key images")
def get_findings(study_uid: str, request: Request,
                 run: int | None = Query(None, description="Run number; default: the newest run with results"),
                 _: Principal = Depends(require_read)) -> JSONResponse:
    # Read-only Core queries: a pooled connection is enough (closing it rolls back), no ORM session per request.
    with request.app.state.session_factory.kw["bind"].connect() as connection:
        try:
            return JSONResponse(queries.study_findings(connection, study_uid, rules(request), run))
        except queries.NotFound as exc:
            raise not_found(exc) from exc


@router.get("/studies/{study_uid}/results", summary="The DICOM objects (SR, SEG, KOS) generated for the study")
def list_results(study_uid: str, request: Request, _: Principal = Depends(require_read)) -> JSONResponse:
    with db(request) as session:
        try:
            return JSONResponse(queries.study_results(session, study_uid))
        except queries.NotFound as exc:
            raise not_found(exc) from exc


@router.get("/studies/{study_uid}/results/{sop_uid}", summary="One generated object as a DICOM file",
            response_class=FileResponse, responses={200: {"content": {"application/dicom": {}}}})
def get_result(study_uid: str, sop_uid: str, request: Request, _: Principal = Depends(require_read)) -> FileResponse:
    with db(request) as session:
        try:
            path = queries.result_file(session, Path(request.app.state.settings.data_dir), study_uid, sop_uid)
        except queries.NotFound as exc:
            raise not_found(exc) from exc
    return FileResponse(path, media_type="application/dicom", filename=f"{sop_uid}.dcm")


@router.get("/studies/{study_uid}/key-images/{sop_uid}.png", summary="A key slice rendered as a windowed PNG",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def key_image(study_uid: str, sop_uid: str, request: Request,
              window: str = Query("auto", description=f"auto or one of {sorted(WINDOWS)}"),
              frame: int = Query(0, ge=0), _: Principal = Depends(require_read)) -> Response:
    with db(request) as session:
        try:
            path = queries.source_instance_file(session, Path(request.app.state.settings.storage.root), study_uid, sop_uid)
        except queries.NotFound as exc:
            raise not_found(exc) from exc
    try:
        png = render_png(path, window, frame)
    except RenderError as exc:
        raise HTTPException(422, str(exc)) from exc
    # Private: the image is patient data; the browser may keep it for the session only.
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
