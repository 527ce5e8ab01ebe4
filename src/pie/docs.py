"""API documentation that works offline: Swagger UI (``/v2/docs``) and ReDoc (``/v2/redoc``)
load their JavaScript and CSS from this server (the assets ship in the ``fastapi-offline``
package; ReDoc's bundle is served without the one remote image it would load, its attribution
logo from cdn.redoc.ly), ``/`` is a small landing page pointing to the console, the docs, the
OpenAPI document and health, and ``/favicon.ico`` is PIE's icon."""

from __future__ import annotations

import html
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_PATH = "/v2/docs/assets"
DOCS_PATH = "/v2/docs"
REDOC_PATH = "/v2/redoc"
OAUTH2_REDIRECT_PATH = "/v2/docs/oauth2-redirect"
REDOC_JS_PATH = "/v2/redoc/redoc.standalone.js"
FAVICON = Path(__file__).resolve().parent / "console" / "static" / "favicon.ico"
# the only remote resource of ReDoc's bundle: an <img> of the "API docs by Redocly" link, which
# hides itself when it cannot load (an empty src loads nothing)
REDOC_REMOTE_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def offline_redoc_bundle() -> bytes:
    """ReDoc's standalone bundle without its remote logo URL."""
    source = (ASSETS_DIR / "redoc.standalone.js").read_bytes()
    return source.replace(REDOC_REMOTE_LOGO.encode(), b"")


def install_docs(app: FastAPI) -> None:
    """Mount the assets and the documentation pages (create the app with ``docs_url=None`` and
    ``redoc_url=None``)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def prefix(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        )

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{REDOC_JS_PATH}",
            redoc_favicon_url=f"{root}/favicon.ico",
            with_google_fonts=False,
        )

    redoc_bundle: list[bytes] = []  # read once, on first use

    @app.get(REDOC_JS_PATH, include_in_schema=False)
    async def redoc_js() -> Response:
        if not redoc_bundle:
            redoc_bundle.append(offline_redoc_bundle())
        return Response(
            redoc_bundle[0], media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/", include_in_schema=False)
    async def landing(request: Request) -> HTMLResponse:
        root = prefix(request)
        title = html.escape(app.title)
        links = [
            (f"{root}/console", "Operator console"),
            (f"{root}{DOCS_PATH}", "API documentation (Swagger UI)"),
            (f"{root}{REDOC_PATH}", "API reference (ReDoc)"),
            (f"{root}{app.openapi_url}", "OpenAPI document (JSON)"),
            (f"{root}/v2/health", "Health"),
        ]
        items = "\n".join(f'    <li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for href, text in links)
        body = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="{html.escape(root)}/favicon.ico"></head>
<body>
  <h1>{title} <small>{html.escape(app.version)}</small></h1>
  <p>{html.escape(app.description)}</p>
  <ul>
{items}
  </ul>
</body>
</html>
"""
        return HTMLResponse(body)
