"""OpenAPI docs at /docs, from local files when `swagger-ui-bundle-v2` is installed (no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def local_swagger_ui() -> Path | None:
    """The Swagger UI 5 files shipped by the swagger-ui-bundle-v2 wheel, if installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def fastapi_docs_url() -> str | None:
    """FastAPI's own /docs (assets from a CDN) only when the local files are missing."""
    return None if local_swagger_ui() else "/docs"


def install_local_docs(app: FastAPI) -> None:
    """/docs from local files, when swagger-ui-bundle-v2 is installed."""
    assets = local_swagger_ui()
    if assets is None:
        return
    app.mount(ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} – API docs",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
