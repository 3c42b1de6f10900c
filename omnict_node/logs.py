"""Logging with stable event names.

Every line an operator may need to find carries an ``event`` name that does not change between releases
(for example ``scp.association.rejected``), followed by ``key=value`` fields. Fields are UIDs, AE titles,
addresses, counts and timings only: never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send our log lines to stderr; keep pynetdicom quiet (its debug output can carry identifiers)."""
    root = logging.getLogger()
    if not any(getattr(h, "_omnict", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._omnict = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``key=value`` fields, e.g. ``log_event(log, "study.complete", study_uid=uid)``."""
    if not logger.isEnabledFor(level):
        return
    parts = [event] + [f"{key}={_format(value)}" for key, value in fields.items()]
    logger.log(level, " ".join(parts))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return f'"{text}"' if " " in text else text
