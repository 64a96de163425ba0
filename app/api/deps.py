"""Dependencies declared once and reused by every route: settings, store, job queue, models, auth.

Auth: `Authorization: Bearer <key>`; each key has a scope. `admin` may do everything;
`generate` may read, generate, upload datasets and run/cancel evaluations. Keys are
compared in constant time against every configured key. With no key configured the
service runs in development mode (everything open, logged loudly at start).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import Forbidden, Unauthorized, Unavailable
from app.services.catalog import ModelCatalog
from app.services.generation import GenerationService
from app.jobs import JobQueue
from app.settings import Settings

PERMISSIONS = {
    "admin": frozenset({"read", "generate", "evals", "admin"}),
    "generate": frozenset({"read", "generate", "evals"}),
}
"""Scope -> what it may do."""


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request):
    return request.app.state.store


def get_jobs(request: Request) -> JobQueue:
    jobs = request.app.state.jobs
    if jobs is None:
        raise Unavailable("no job queue configured (RESA_REDIS_URL is unset)", type="queue_unavailable")
    return jobs


def get_catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


def get_generation(request: Request) -> GenerationService:
    return request.app.state.generation


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[object, Depends(get_store)]
JobsDep = Annotated[JobQueue, Depends(get_jobs)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
GenerationDep = Annotated[GenerationService, Depends(get_generation)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's scope and a short, non-secret fingerprint for logs."""

    scope: str
    key_id: str | None
    development: bool = False

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.scope, frozenset())


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def key_scope(keys: dict[str, str], token: str) -> str:
    """The scope of a bearer token; Unauthorized when it is missing or no configured key."""
    token = token.strip()
    if not token:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    scope = None
    given = token.encode()
    for key, scope_of_key in keys.items():  # no early exit: the time taken does not depend on which key matched
        if hmac.compare_digest(key.encode(), given):
            scope = scope_of_key
    if scope is None:
        raise Unauthorized("invalid API key")
    return scope


def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    keys: dict[str, str] = request.app.state.api_keys
    if not keys:
        return Principal(scope="admin", key_id=None, development=True)
    token = credentials.credentials if credentials else ""
    scope = key_scope(keys, token)
    principal = Principal(scope=scope, key_id=hashlib.sha256(token.strip().encode()).hexdigest()[:8])
    request.state.principal = principal
    return principal


def require(permission: str):
    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.can(permission):
            raise Forbidden(f"this API key (scope {principal.scope!r}) may not {permission}; an admin key may")
        return principal

    check.__name__ = f"require_{permission}"
    return check


ReadAccess = Annotated[Principal, Depends(require("read"))]
GenerateAccess = Annotated[Principal, Depends(require("generate"))]
EvalAccess = Annotated[Principal, Depends(require("evals"))]
AdminAccess = Annotated[Principal, Depends(require("admin"))]
