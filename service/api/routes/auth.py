"""GET /v1/whoami: how the service authenticates, and who the caller is (the page asks it)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..deps import AccessDep, ApiKeyDep
from ..responses import Whoami, errors

router = APIRouter(prefix="/v1", tags=["auth"])


@router.get(
    "/whoami",
    responses=errors(401, 429),
    summary="The authentication mode and the caller's name and role",
)
async def whoami(request: Request, access: AccessDep, key: ApiKeyDep) -> Whoami:
    """Never asks for a key: without one, `user` is null. A key that is sent must be valid
    (401 otherwise). Open mode says so in `note`."""
    principal = await access.optional(request, key)
    return Whoami(**access.describe(principal))
