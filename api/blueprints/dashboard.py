"""The dashboard and the API reference page: static files of this package, no network needed.

Only the files present at startup are served, by name, so no path a client sends can reach
outside the folder. The pages hold no data: they are public, and fetch everything from the
API with the token the user gives them, so they are as protected as the API itself.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from sanic import Blueprint, Request
from sanic.exceptions import NotFound
from sanic.response import HTTPResponse, raw, redirect
from sanic_ext.extensions.openapi import openapi

from api.context import query
from api.openapi import describe
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

    def serve(name: str) -> HTTPResponse:
        try:
            body, kind = files[name]
        except KeyError:
            raise NotFound(f"no such file: {name}") from None
        return raw(body, content_type=kind,
                   headers={**_SECURITY, "Cache-Control": "no-cache"})

    @bp.get("/", name="root", ctx_public=True)
    @openapi.exclude()
    async def root(request: Request) -> HTTPResponse:
        query(request, "none")
        return redirect("/dashboard")

    @bp.get("/dashboard", name="dashboard", ctx_public=True)
    @describe(route="none", response="html", tag="dashboard", secured=False, errors=(400,),
              summary="The dashboard (HTML)",
              description="Charts of the stats routes; asks for the token when one is set.")
    async def dashboard(request: Request) -> HTTPResponse:
        query(request, "none")
        return serve("dashboard.html")

    @bp.get("/static/<name:path>", name="static", ctx_public=True)
    @openapi.exclude()
    async def static(request: Request, name: str) -> HTTPResponse:
        return serve(name)

    return bp
