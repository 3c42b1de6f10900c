"""Small helpers shared by the route modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, Request
from sqlalchemy.orm import Session

from api.settings import WorklistRules


@contextmanager
def db(request: Request) -> Iterator[Session]:
    """A session for one request; endpoints that change data commit themselves."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rules(request: Request) -> WorklistRules:
    return request.app.state.worklist_rules


def bad_request(exc: Exception) -> HTTPException:
    return HTTPException(400, str(exc))


def not_found(exc: Exception) -> HTTPException:
    return HTTPException(404, str(exc))


def parse_statuses(raw: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """``?status=unread,claimed`` or repeated ``?status=``; ``all`` means every status."""
    if not raw:
        return default
    values = tuple(v.strip() for item in raw for v in item.split(",") if v.strip())
    if "all" in values:
        return ("unread", "claimed", "completed")
    return values or default
