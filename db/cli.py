"""``omnict-node db``: schema migrations."""

from __future__ import annotations

import click

from omnict_node.cli import NodeContext, pass_node


@click.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command()
@click.option("--revision", default="head", show_default=True)
@pass_node
def upgrade(node: NodeContext, revision: str) -> None:
    """Apply migrations up to REVISION."""
    from db.migrate import current_revision
    from db.migrate import upgrade as run_upgrade

    run_upgrade(node.settings.database.url, revision)
    click.echo(f"database at revision {current_revision(node.settings.database.url)}")


@db.command()
@pass_node
def current(node: NodeContext) -> None:
    """Print the schema revision of the configured database."""
    from db.migrate import current_revision

    click.echo(current_revision(node.settings.database.url) or "empty (run `omnict-node db upgrade`)")
