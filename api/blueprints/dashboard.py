"""The dashboard and the API reference page: static files of this package, no network needed.

Only the files present at startup are served, by name, so no path a client sends can reach
outside the folder. The pages hold no data and fetch everything from the API with the token
the user gives them. With a token configured, `/dashboard` is a 401 without it, as every
data route: a browser (which cannot send the header when it opens a page) gets the page with
its 401, and the page asks for the token. Its files under `/static/` and `/docs` are public.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from sanic import Blueprint, Request
from sanic.exceptions import NotFound
from sanic.response import HTTPResponse, raw, redirect
from sanic_ext.extensions.openapi import openapi

from api.context import query
from api.openapi import ERRORS, describe
from socks5_analytics.config import ApiSettings

__all__ = ["STATIC", "blueprint"]

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml",
          ".txt": "text/plain; charset=utf-8"}
# The pages load nothing from elsewhere; say so to the browser too.
_SECURITY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _load(folder: Path) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
            files[path.relative_to(folder).as_posix()] = (
                path.read_bytes(), kind or "application/octet-stream"
            )
    return files


def blueprint(settings: ApiSettings) -> Blueprint:
    """`/` (a redirect), `/dashboard` and `/static/<file>` (`/docs` is sanic-ext's slot)."""
    bp = Blueprint("dashboard")
    files = _load(STATIC)

    def serve(name: str, *, status: int = 200,
              headers: dict[str, str] | None = None) -> HTTPResponse:
        try:
            body, kind = files[name]
        except KeyError:
            raise NotFound(f"no such file: {name}") from None
        return raw(body, status=status, content_type=kind,
                   headers={**_SECURITY, "Cache-Control": "no-cache", **(headers or {})})

    @bp.get("/", name="root", ctx_public=True)
    @openapi.exclude()
    async def root(request: Request) -> HTTPResponse:
        query(request, "none")
        return redirect("/dashboard")

    secured = settings.token is not None

    @bp.get("/dashboard", name="dashboard", ctx_page=True)
    # A browser's 401 is the page itself (merged into the JSON error of `describe`).
    @openapi.response(401, {"text/html": {"schema": {"type": "string"}}}, ERRORS[401])
    @describe(route="none", response="html", tag="dashboard", secured=secured,
              errors=(400, 401),
              summary="The dashboard (HTML)",
              description="Charts of the stats routes. When a token is set, a request without "
              "it is a 401; a browser's (`Accept: text/html`) gets the page with the 401, and "
              "the page asks for the token.")
    async def dashboard(request: Request) -> HTTPResponse:
        query(request, "none")
        if getattr(request.ctx, "unauthorized", False):
            return serve("dashboard.html", status=401, headers={"WWW-Authenticate": "Bearer"})
        return serve("dashboard.html")

    @bp.get("/static/<name:path>", name="static", ctx_public=True)
    @openapi.exclude()
    async def static(request: Request, name: str) -> HTTPResponse:
        return serve(name)

    return bp
