"""The pipeline run state machine: which transitions are allowed, in one place."""

from __future__ import annotations

from db.models import RunState

S = RunState

ALLOWED: dict[RunState, frozenset[RunState]] = {
    S.RECEIVING: frozenset({S.COMPLETE, S.FAILED}),
    S.COMPLETE: frozenset({S.ASSEMBLING, S.FAILED}),
    S.ASSEMBLING: frozenset({S.SEGMENTING, S.FAILED}),
    S.SEGMENTING: frozenset({S.INFERRING, S.FAILED}),
    S.INFERRING: frozenset({S.REPORTING, S.FAILED}),
    S.REPORTING: frozenset({S.DELIVERING, S.FAILED}),
    S.DELIVERING: frozenset({S.DELIVERED, S.DELIVERY_FAILED, S.FAILED}),
    S.DELIVERY_FAILED: frozenset({S.DELIVERING, S.FAILED}),
    S.DELIVERED: frozenset(),
    S.FAILED: frozenset(),
}

TERMINAL = frozenset({S.DELIVERED, S.FAILED})
PROCESSING = frozenset({S.COMPLETE, S.ASSEMBLING, S.SEGMENTING, S.INFERRING, S.REPORTING, S.DELIVERING})


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: RunState, target: RunState) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> target`` is allowed. A stage re-entering its own
    state (a retried, idempotent stage) is allowed."""
    if target != current and target not in ALLOWED[current]:
        raise InvalidTransition(f"run cannot go from {current.value} to {target.value}")
