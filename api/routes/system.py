"""Health (no authentication: load balancers and probes) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from api.auth import Principal, require_read
from api.metrics import CONTENT_TYPE

router = APIRouter(tags=["system"])


@router.get("/health", summary="Liveness and database reachability (no token needed)")
def health(request: Request) -> JSONResponse:
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any database failure makes the node unhealthy
        return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/metrics", summary="Prometheus metrics (read token)", response_class=Response)
def metrics(request: Request, _: Principal = Depends(require_read)) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)
