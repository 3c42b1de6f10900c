"""Bearer-token authentication with three roles (see :class:`api.settings.Role`).

* API clients send ``Authorization: Bearer <token>``. No or an unknown token → 401; a known token whose role is
  too low → 403.
* The web pages use the same tokens, kept in an HttpOnly, SameSite=Strict cookie set by ``POST /login`` (or by a
  one-time ``?token=`` that is removed from the address at once). A state-changing request authenticated by that
  cookie must also carry the ``X-OmniCT-Request`` header, which a cross-site form cannot send (CSRF).

Tokens are compared by SHA-256 digest: the configuration can hold only digests, and a dict lookup by digest does
not leak the secret through timing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request, status

from api.settings import ApiAuthSettings, Role

CSRF_HEADER = "X-OmniCT-Request"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name (the audit actor) and role."""

    name: str
    role: Role
    via_cookie: bool = False


class TokenRegistry:
    def __init__(self, auth: ApiAuthSettings) -> None:
        self.auth = auth
        self._by_digest = {t.digest: t for t in auth.tokens}

    def lookup(self, token: str | None) -> Principal | None:
        if not token:
            return None
        entry = self._by_digest.get(hashlib.sha256(token.encode()).hexdigest())
        return Principal(entry.name, entry.role) if entry else None


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def authenticate(request: Request) -> Principal | None:
    """The caller's principal from the bearer header, else from the login cookie; None when neither is valid."""
    registry: TokenRegistry = request.app.state.tokens
    token = bearer_token(request)
    if token is not None:
        return registry.lookup(token)
    cookie = request.cookies.get(registry.auth.cookie_name)
    principal = registry.lookup(cookie)
    return Principal(principal.name, principal.role, via_cookie=True) if principal else None


def require(role: Role) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the caller must hold ``role`` (or a higher one)."""

    # async: pure CPU work, so FastAPI runs it on the event loop instead of paying a threadpool hop.
    async def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required",
                                headers={"WWW-Authenticate": 'Bearer realm="omnict"'})
        if principal.via_cookie and request.method not in SAFE_METHODS and CSRF_HEADER.lower() not in request.headers:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"cookie-authenticated changes need the {CSRF_HEADER} header")
        if not principal.role.allows(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {role.value} role; "
                                                           f"the token has {principal.role.value}")
        return principal

    dependency.__name__ = f"require_{role.value}"
    return dependency


require_read = require(Role.READ)
require_radiologist = require(Role.RADIOLOGIST)
require_operator = require(Role.OPERATOR)
