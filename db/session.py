"""Engines and sessions for PostgreSQL (production) and SQLite (embedded default)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, echo: bool = False, *, durable_commits: bool = True) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout (several processes share the file) and full sync.

    ``durable_commits=False`` is for writers whose every committed row can be rebuilt from durable files (the
    SCP's instance registrations, see :mod:`dicom_node.reconcile`): a commit is then still atomic, visible to
    every reader and safe against a crash of the process, but it is not flushed to disk on its own (SQLite
    ``synchronous=NORMAL`` in WAL mode; PostgreSQL ``synchronous_commit=off``), which saves one fsync per commit.
    A power cut can roll back the last commits; the rebuild at the next start restores them."""
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        synchronous = "FULL" if durable_commits else "NORMAL"
        event.listen(engine, "connect", lambda connection, _record: _sqlite_pragmas(connection, synchronous))
        return engine
    connect_args = {} if durable_commits else {"options": "-c synchronous_commit=off"}
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=10,
                         connect_args=connect_args)


def _sqlite_pragmas(dbapi_connection, synchronous: str) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed row survives power loss, not only a crash of the node (see make_engine for NORMAL).
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def session_factory_for(url: str) -> sessionmaker[Session]:
    """Sessions on a new engine for ``url`` (CLI commands and worker processes: one per process)."""
    return make_session_factory(make_engine(url))


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
