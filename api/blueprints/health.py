"""/healthz, /readyz, /metrics (public: for orchestrators and Prometheus) and /openapi.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, raw
from sanic_ext.extensions.openapi import openapi, types
from sanic_ext.extensions.openapi.builders import SpecificationBuilder

from api.context import query, repository
from api.errors import NotReadyError
from api.openapi import ERRORS, SCHEMA, describe, json_content
from socks5_analytics.config import ApiSettings
from socks5_analytics.storage.errors import StorageError
from socks5_analytics.storage.migrate import head_revision

__all__ = ["blueprint"]

F = TypeVar("F", bound=Callable[..., Any])
Schema: Any = types.Schema  # sanic-ext's schema objects are untyped


def _head(request: Request) -> str:
    """The newest migration this code knows, read once per app (alembic scans its folder)."""
    head: str | None = getattr(request.app.ctx, "head_revision", None)
    if head is None:
        head = request.app.ctx.head_revision = head_revision()
    return head


def _self_described(*, secured: bool) -> Callable[[F], F]:
    """The document's own entry (DESIGN.md lists /openapi.json among the routes)."""

    def decorate(handler: F) -> F:
        error = json_content(SCHEMA["error"])
        handler = openapi.summary("This OpenAPI document")(handler)
        handler = openapi.description(
            "The OpenAPI 3 document of every route: parameters with their exact syntax, "
            "responses and errors." + (" Needs the token." if secured else ""))(handler)
        handler = openapi.tag("health")(handler)
        handler = openapi.response(
            200, {"application/json": Schema(type="object", required=["openapi", "paths"])},
            "OK")(handler)
        handler = openapi.response(400, error, "An unknown parameter")(handler)
        handler = openapi.response(401, error, ERRORS[401])(handler)
        if secured:
            handler = openapi.secured("token")(handler)
        return handler

    return decorate


def blueprint(settings: ApiSettings) -> Blueprint:
    """The health, metrics and document routes."""
    bp = Blueprint("health")

    @bp.get("/healthz", name="healthz", ctx_public=True)
    @describe(route="none", response="health", tag="health", secured=False, errors=(400,),
              summary="Liveness: the process answers", description="Always 200 while up.")
    async def healthz(request: Request) -> HTTPResponse:
        query(request, "none")
        return json({"status": "ok"})

    @bp.get("/readyz", name="readyz", ctx_public=True)
    @describe(route="none", response="ready", tag="health", secured=False, errors=(400, 503),
              summary="Readiness: the database answers and its schema is the newest",
              description="503 with the error object when the database is unreachable or "
              "not migrated to the newest revision.")
    async def readyz(request: Request) -> HTTPResponse:
        query(request, "none")
        try:
            repo = repository(request)
            await repo.ping()
            revision = await repo.schema_revision()
            head = _head(request)
        except StorageError as exc:
            raise NotReadyError(f"not ready: {exc}") from exc
        if revision != head:
            raise NotReadyError(f"the schema is at {revision}, not {head}: run "
                                "`socks5-analytics migrate`")
        return json({"status": "ready", "schema_revision": revision})

    @bp.get("/metrics", name="metrics", ctx_public=True)
    @describe(route="none", response="text", tag="health", secured=False, errors=(400,),
              summary="Prometheus metrics", description="The text exposition format.")
    async def metrics(request: Request) -> HTTPResponse:
        query(request, "none")
        return raw(request.app.ctx.metrics.render(),
                   content_type="text/plain; version=0.0.4; charset=utf-8")

    @bp.get("/openapi.json", name="openapi_document")
    @_self_described(secured=settings.token is not None)
    async def document(request: Request) -> HTTPResponse:
        query(request, "none")
        builder: Any = SpecificationBuilder()  # untyped in sanic-ext
        return json(builder.build(request.app).serialize())

    return bp
