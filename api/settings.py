"""Settings of the HTTP API that ``omnict_node.config.ApiSettings`` does not (yet) carry: tokens and worklist rules.

Until the lead nests them in ``ApiSettings`` (as ``auth`` and ``worklist``), :func:`auth_settings_from` and
:func:`worklist_rules_from` read them from ``settings.api`` when present and fall back to the defaults here.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Role(str, enum.Enum):
    """What a token may do. Each role includes everything of the roles before it.

    * ``read``: read studies, findings, results, DICOMweb, the worklist and the web pages;
    * ``radiologist``: ``read`` + claim, release and complete worklist items (their own claims);
    * ``operator``: everything, including releasing or completing another reader's claim and refreshing items.
    """

    READ = "read"
    RADIOLOGIST = "radiologist"
    OPERATOR = "operator"

    @property
    def rank(self) -> int:
        return _ROLE_RANK[self]

    def allows(self, needed: "Role") -> bool:
        return self.rank >= needed.rank


_ROLE_RANK = {Role.READ: 0, Role.RADIOLOGIST: 1, Role.OPERATOR: 2}


class ApiToken(BaseModel):
    """One bearer token. Prefer ``token_sha256`` (hex SHA-256 of the token) so the config holds no secret."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Who holds the token; written to audit events as the actor (no patient data).")
    role: Role = Role.READ
    token: str | None = Field(None, description="The token in clear (development only).")
    token_sha256: str | None = Field(None, description="Hex SHA-256 of the token.")

    @model_validator(mode="after")
    def _one_form(self) -> "ApiToken":
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError(f"token {self.name!r}: give exactly one of 'token' or 'token_sha256'")
        if self.token_sha256 is not None:
            value = self.token_sha256.strip().lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"token {self.name!r}: token_sha256 must be 64 hex digits")
            self.token_sha256 = value
        return self

    @property
    def digest(self) -> str:
        return self.token_sha256 or hashlib.sha256(self.token.encode()).hexdigest()  # type: ignore[union-attr]


class ApiAuthSettings(BaseModel):
    """Bearer-token authentication. With no tokens configured every protected endpoint answers 401 (closed)."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[ApiToken] = Field(default_factory=list)
    cookie_name: str = "omnict_token"
    cookie_secure: bool = Field(False, description="Set the Secure flag on the login cookie (behind HTTPS).")
    cookie_max_age_s: int = 12 * 3600


class WorklistRules(BaseModel):
    """How a worklist item's priority score is computed (see ``api.worklist.priority_score``).

    score = priority_weights[order priority] + urgency_score (from findings) + stat_weight (if a critical finding)
            + min(aging_cap, aging_per_hour * hours since ready)
    """

    model_config = ConfigDict(extra="forbid")

    stat_weight: float = Field(1000.0, description="Added when any finding is critical (or the order is STAT).")
    priority_weights: dict[str, float] = Field(
        default_factory=lambda: {"STAT": 1000.0, "HIGH": 40.0, "MEDIUM": 10.0, "ROUTINE": 0.0, "LOW": -5.0},
        description="DICOM Requested Procedure Priority (0040,1003) values -> score.",
    )
    aging_per_hour: float = Field(1.0, description="Score gained per hour of waiting, so routine work does not starve.")
    aging_cap: float = Field(48.0, description="Most score aging can add (kept below stat_weight: aging never beats STAT).")
    secondary_fraction: float = Field(
        0.25, description="Urgency of a study = max positive finding weight + this fraction of the other positive weights.")
    urgent_threshold: float = Field(10.0, description="Urgency score from which the badge says 'urgent'.")
    default_limit: int = 50
    max_limit: int = 500

    def priority_weight(self, requested_priority: str | None) -> float:
        if not requested_priority:
            return 0.0
        return self.priority_weights.get(requested_priority.strip().upper(), 0.0)


def auth_settings_from(settings: Any) -> ApiAuthSettings:
    """``settings.api.auth`` when the lead has nested it there, else the defaults."""
    value = getattr(getattr(settings, "api", None), "auth", None)
    return value if isinstance(value, ApiAuthSettings) else ApiAuthSettings.model_validate(value or {})


def worklist_rules_from(settings: Any) -> WorklistRules:
    """``settings.api.worklist`` when the lead has nested it there, else the defaults."""
    value = getattr(getattr(settings, "api", None), "worklist", None)
    return value if isinstance(value, WorklistRules) else WorklistRules.model_validate(value or {})
