"""API keys: `Authorization: Bearer <key>`, checked against the configured SHA-256 hashes.

Every route but `/healthz`, `/readyz` and `/metrics` depends on `authenticate` (a router-level
dependency), which answers 401 without a known key; routes that read a job ask for the `Caller` and
show the job only to the key name that made it (or an admin key: operators cancel runaway jobs).
A job that is not the caller's is a 404, not a 403, so ids cannot be probed. The key is hashed as it
arrives and never stored or logged.

Auth is off only when configured so (`HYPERSD_AUTH=false`) or, by default, in embedded mode on a
loopback host (`launcher.embedded` says so at start); then every request is the anonymous caller.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobs.record import JobRecord
from service.deps import ServicesDep
from service.errors import ApiError

# auto_error off: a missing or malformed header is our 401 in the error model, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="an API key")


@dataclass(frozen=True)
class Caller:
    """Who is asking: an API key's name (None when auth is off) and whether it is an admin."""

    name: str | None
    admin: bool

    def owns(self, record: JobRecord) -> bool:
        """Whether this caller may read or cancel the job."""
        return self.admin or record.owner == self.name


# auth off: no access control at all, so the one caller may do anything
_ANONYMOUS = Caller(name=None, admin=True)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller of this request, from its bearer key; 401 without a known one."""
    if not services.auth:
        return _ANONYMOUS
    if credentials is None:
        raise _unauthorized("an API key is required: Authorization: Bearer <key>")
    digest = hashlib.sha256(credentials.credentials.encode()).hexdigest()
    # compare_digest over every key: the time taken says nothing about which hash came close
    found = None
    for key in services.settings.api_keys:
        if hmac.compare_digest(key.sha256, digest):
            found = key
    if found is None:
        raise _unauthorized("the API key is not valid")
    return Caller(name=found.name, admin=found.admin)


CallerDep = Annotated[Caller, Depends(authenticate)]


async def require_admin(caller: CallerDep) -> Caller:
    """403 unless the caller's key has the admin scope."""
    if not caller.admin:
        raise ApiError(403, "forbidden", "this route needs an admin API key")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]
