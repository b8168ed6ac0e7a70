"""FastAPI dependencies: the service state, the Searcher, the engine, a leased index store, the key.

All are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per
dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader

from index.store import IndexStore

from .engine import Engine
from .errors import ApiError
from .schemas import ID_MAX
from .searcher import Searcher
from .settings import Settings
from .state import ServiceState

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="the CONVIRT_API_KEY of the service"
)


async def get_service(request: Request) -> ServiceState:
    return request.app.state.service


ServiceDep = Annotated[ServiceState, Depends(get_service)]


async def get_settings(service: ServiceDep) -> Settings:
    return service.settings


async def get_engine(service: ServiceDep) -> Engine:
    if service.engine is None:
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly")
    return service.engine


async def get_searcher(service: ServiceDep) -> Searcher:
    if service.searcher is None:
        raise ApiError(503, "not_ready", "the model and index are still loading; retry shortly")
    return service.searcher


async def leased_store(service: ServiceDep) -> AsyncIterator[IndexStore]:
    """The index version current when the request arrived, kept open until it is answered."""
    if service.stores is None:
        raise ApiError(503, "not_ready", "the index is still loading; retry shortly")
    with service.stores.lease() as store:
        yield store


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    key: Annotated[str | None, Depends(api_key_header)],
) -> None:
    if settings.api_key is None:
        raise ApiError(
            403, "admin_disabled", "the admin API is off: start the service with CONVIRT_API_KEY"
        )
    expected = settings.api_key.get_secret_value().encode()
    if key is None or not secrets.compare_digest(key.encode(), expected):
        raise ApiError(
            401,
            "unauthorized",
            f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": "APIKey"},
        )


async def url_root(request: Request) -> str:
    """Prefix of the URLs put in responses (non-empty when served under a proxy's root_path)."""
    return request.scope.get("root_path", "").rstrip("/")


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SearcherDep = Annotated[Searcher, Depends(get_searcher)]
StoreDep = Annotated[IndexStore, Depends(leased_store)]
UrlRootDep = Annotated[str, Depends(url_root)]
ImageId = Annotated[
    int, Path(ge=0, le=ID_MAX, description="image id, from a search result", examples=[12345])
]
