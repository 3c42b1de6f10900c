"""Shared fixtures: real PostgreSQL, Redis and Orthanc on loopback, and per-test settings and databases."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services

os.environ.setdefault("TCP_NODELAY", "1")  # dcmtk tools and Orthanc are ~30x slower with Nagle on loopback
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[services.PostgresServer]:
    server = services.start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres: services.PostgresServer) -> str:
    """A fresh, migrated PostgreSQL database shared by the session."""
    from db.migrate import upgrade

    url = postgres.create_database("omnict_session")
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database migrated to head, once on SQLite and once on PostgreSQL."""
    from db.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'omnict.db'}"
    else:
        server: services.PostgresServer = request.getfixturevalue("postgres")
        url = server.create_database(f"omnict_t{os.getpid()}_{next(_db_counter)}")
    upgrade(url)
    return url


@pytest.fixture
def settings(tmp_path: Path, database_url: str):
    """Settings for one test: data under tmp_path, the parametrized database, short timers, a free DICOM port."""
    from omnict_node.config import load_settings

    return load_settings(
        data_dir=str(tmp_path / "data"),
        database={"url": database_url},
        dicom={"port": services.free_port()},
        storage={"min_free_bytes": 1024**2},
        completeness={"series_quiet_s": 0.5, "study_quiet_s": 1.0, "hard_limit_s": 120.0, "sweep_interval_s": 0.1},
        workers={"retry_backoff_s": 0.5},
    )


@pytest.fixture
def session_factory(settings):
    from db.session import make_engine, make_session_factory

    engine = make_engine(settings.database.url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    server = services.start_redis()
    yield server.url
    server.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[services.OrthancServer]:
    server = services.start_orthanc(tmp_path / "orthanc")
    yield server
    server.stop()
