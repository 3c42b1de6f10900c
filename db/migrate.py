"""Apply Alembic migrations programmatically (``omnict-node db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema at ``database_url`` up to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from db.session import make_engine

    engine = make_engine(database_url)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def schema_problem(database_url: str) -> str | None:
    """Why a command cannot read this database yet (schema missing or behind), as an operator hint; else None."""
    current, head = current_revision(database_url), head_revision()
    if current == head:
        return None
    return (f"the database schema is at {current or 'nothing (no tables yet)'}, this node needs {head}: "
            f"run `omnict-node db upgrade` (or start `omnict-node serve`, which migrates an embedded SQLite)")


def ensure_schema(database_url: str) -> None:
    """Embedded SQLite is migrated on start; a server database must be migrated by the operator
    (``omnict-node db upgrade``), so a node never changes a shared schema behind its owners' back."""
    if database_url.startswith("sqlite"):
        upgrade(database_url)
        return
    problem = schema_problem(database_url)
    if problem:
        raise RuntimeError(problem)
