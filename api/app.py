"""The node's HTTP API: studies, findings, result objects, DICOMweb, the worklist, web pages, health and metrics.

``create_app(settings)`` builds the FastAPI app; ``omnict-node api`` serves it with uvicorn. Endpoints are plain
``def`` functions on synchronous SQLAlchemy sessions (FastAPI runs them in its threadpool); authentication is an
``async`` dependency (pure CPU), so a request costs one threadpool hop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import time

import anyio.to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from api import dicomweb
from api.auth import TokenRegistry
from api.metrics import ApiMetrics, MetricsMiddleware
from api.routes import studies, system, ui, worklist
from api.settings import ApiAuthSettings, WorklistRules, auth_settings_from, worklist_rules_from
from omnict_node.config import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_THREADS = 8
# A pooled connection idle longer than this is pinged before use (see :func:`api_engine`).
IDLE_PING_S = 10.0


def api_engine(url: str, echo: bool = False) -> Engine:
    """The API's engine: :func:`db.session.make_engine`, except that a pooled PostgreSQL connection is pinged only
    when it has been idle for ``IDLE_PING_S``.

    WHY: ``pool_pre_ping`` costs a ``SELECT 1`` round trip on every checkout, i.e. on every request; under load the
    pool's connections are seconds old at most, so the ping buys nothing there. A connection that sat idle (where a
    database restart or a firewall may have closed it) is still checked before use, and a failed check makes the
    pool open a fresh connection (``DisconnectionError``), as ``pool_pre_ping`` would.
    """
    from db.session import make_engine

    if url.startswith("sqlite"):
        return make_engine(url, echo=echo)
    engine = create_engine(url, echo=echo, pool_size=10, max_overflow=10)

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record) -> None:  # noqa: ANN001
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy) -> None:  # noqa: ANN001
        last = record.info.get("checked_in_at")
        if last is None or time.monotonic() - last < IDLE_PING_S:
            return  # new, or returned to the pool moments ago
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_connection.rollback()  # leave no transaction open behind the ping
        except Exception as error:  # noqa: BLE001 - any failure means: do not use this connection
            raise sa_exc.DisconnectionError(f"idle connection failed its ping: {type(error).__name__}") from error

    return engine


def create_app(settings: Settings, session_factory: sessionmaker[Session] | None = None,
               auth: ApiAuthSettings | None = None, worklist_rules: WorklistRules | None = None,
               max_threads: int | None = None) -> FastAPI:
    """Build the app.

    ``session_factory`` defaults to a new engine on ``settings.database.url`` (disposed at shutdown);
    ``auth`` and ``worklist_rules`` default to ``settings.api.auth`` / ``settings.api.worklist`` when the settings
    carry them, else to the defaults of :mod:`api.settings` (no tokens: everything but /health answers 401).
    ``max_threads`` bounds the threadpool that runs the (synchronous) database endpoints; default
    ``settings.api.threads`` if present, else 8. More threads than database connections only adds GIL contention.
    """
    threads = max_threads or getattr(settings.api, "threads", None) or DEFAULT_THREADS
    engine = None
    if session_factory is None:
        from db.session import make_session_factory

        engine = api_engine(settings.database.url, echo=settings.database.echo)
        session_factory = make_session_factory(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield
        if engine is not None:  # only an engine we made ourselves is ours to dispose
            engine.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="OmniCT node API",
        version="0.1.0",
        description=(
            "Findings, result objects (DICOM SR/SEG/KOS), a DICOMweb subset and the radiologists' worklist.\n\n"
            "Authentication: `Authorization: Bearer <token>`. Roles: **read** (every GET), **radiologist** "
            "(read + claim/release/complete own worklist items), **operator** (everything, including another "
            "reader's claims and refreshing items). No token → 401, too low a role → 403. `/health` is open."
        ),
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.tokens = TokenRegistry(auth or auth_settings_from(settings))
    app.state.worklist_rules = worklist_rules or worklist_rules_from(settings)
    app.state.metrics = ApiMetrics(session_factory)

    app.include_router(system.router)
    app.include_router(studies.router)
    app.include_router(worklist.router)
    app.include_router(dicomweb.router)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    return app
