"""The Sanic application: `create_app(settings)` wires blueprints, auth, CORS, limits,
metrics, the OpenAPI document and the one error handler; listeners open and close the
repository's pool on `app.ctx`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sanic import Request, Sanic
from sanic.response import BaseHTTPResponse
from sanic_ext import Extend

from api import errors
from api.blueprints import dashboard, health, logs, nodes, stats
from api.errors import UnauthorizedError
from api.metrics import ApiMetrics
from socks5_analytics import __version__
from socks5_analytics.config import Settings
from socks5_analytics.logs import get_logger
from socks5_analytics.storage import Repository
from socks5_analytics.storage.errors import DatabaseUnavailableError

__all__ = ["App", "create_app"]

App = Sanic[Any, Any]

_names = itertools.count()
log = get_logger("api")


async def _open(settings: Settings) -> Repository:
    return await Repository.from_settings(settings.database,
                                          application_name="socks5-analytics-api")


async def _reconnect(app: App, settings: Settings) -> None:
    """Open the repository once the database answers, backing off up to 10 s."""
    delay = 0.5
    while app.ctx.repository is None:
        await asyncio.sleep(delay)
        try:
            app.ctx.repository = await _open(settings)
        except DatabaseUnavailableError:
            delay = min(delay * 2, 10.0)
        else:
            log.info("database available again")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _configure(app: App, settings: Settings) -> None:
    api = settings.api
    app.config.update({
        "REQUEST_MAX_SIZE": api.max_request_size,
        "REQUEST_MAX_HEADER_SIZE": min(api.max_request_size, 8192 * 2),
        "REQUEST_TIMEOUT": api.request_timeout,
        "RESPONSE_TIMEOUT": api.response_timeout,
        "KEEP_ALIVE_TIMEOUT": api.keep_alive_timeout,
        "ACCESS_LOG": False,
        "MOTD": False,
        # TouchUp rewrites Sanic's own modules in place at startup, which breaks the second
        # app started in one process (tests; `up` beside other apps); it saves microseconds.
        "TOUCHUP": False,
        "FALLBACK_ERROR_FORMAT": "json",
        # sanic-ext: its UI slot at /docs shows our own page (its Redoc and Swagger pages
        # load from a CDN); the document is also at /openapi.json, where DESIGN.md puts it.
        "OAS_URL_PREFIX": "/docs",
        "OAS_URI_TO_JSON": "/openapi.json",
        "OAS_UI_DEFAULT": "redoc",
        "OAS_UI_REDOC": True,
        "OAS_URI_TO_REDOC": "/redoc",
        "OAS_PATH_TO_REDOC_HTML": str(dashboard.STATIC / "docs.html"),
        "OAS_UI_SWAGGER": False,
        "OAS_AUTODOC": False,
        "OAS_IGNORE_HEAD": True,
        "OAS_IGNORE_OPTIONS": True,
        "CORS": bool(api.cors_origins),
        "CORS_ORIGINS": ",".join(api.cors_origins),
        "CORS_AUTOMATIC_OPTIONS": bool(api.cors_origins),
        "CORS_ALLOW_HEADERS": "authorization",
        "CORS_METHODS": "GET, OPTIONS",
        "CORS_MAX_AGE": 600,
        "HEALTH": False,
    })


def _start_request_span(tracer: Any, request: Request) -> None:
    """A server span per request (HTTP semantic conventions), current while it is handled."""
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    route = request.route.path if request.route is not None else None
    name = f"{request.method} /{route}" if route is not None else request.method
    span = tracer.start_span(name, kind=SpanKind.SERVER, attributes={
        "http.request.method": request.method, "url.path": request.path,
        **({"http.route": f"/{route}"} if route is not None else {}),
    })
    request.ctx.span = span
    request.ctx.span_token = context.attach(trace.set_span_in_context(span))


def _end_request_span(request: Request, status: int) -> None:
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    span = getattr(request.ctx, "span", None)
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    token = getattr(request.ctx, "span_token", None)
    if token is not None:
        try:
            context.detach(token)
        except ValueError:
            pass  # detached in another context: the span is ended all the same


def create_app(
    settings: Settings,
    *,
    repository: Repository | None = None,
    clock: Callable[[], datetime] = _utc_now,
    name: str | None = None,
    tracer: Any = None,
) -> App:
    """The API app. With `repository`, the caller owns it (tests, `up`); without, the app
    opens one from `settings.database` before serving and closes it after."""
    # configure_logging=False: Sanic's loggers go to the root logger, which
    # socks5_analytics.logs renders in the one JSON schema of every component.
    app = Sanic(name or f"socks5_analytics_api_{next(_names)}", env_prefix="S5A_SANIC_",
                configure_logging=False)
    _configure(app, settings)
    app.ctx.settings = settings
    app.ctx.clock = clock
    app.ctx.repository = repository
    app.ctx.metrics = ApiMetrics()
    Extend(app)
    app.ext.openapi.describe(
        "socks5-analytics stats API", version=__version__,
        description="Connection analytics of the SOCKS5 proxy nodes. All JSON; bad input is "
        "a 400 with `{\"error\": {\"code\", \"message\"}}`.",
    )
    app.ext.openapi.add_security_scheme("token", "http", scheme="bearer")
    for module in (stats, logs, nodes, health, dashboard):
        app.blueprint(module.blueprint(settings.api))

    token = settings.api.token
    expected = token.get_secret_value().encode() if token is not None else None

    async def start_clock(request: Request) -> None:
        request.ctx.started = time.perf_counter()
        if tracer is not None:
            _start_request_span(tracer, request)

    async def authenticate(request: Request) -> None:
        if expected is None or request.method == "OPTIONS":
            return
        route = request.route
        if route is not None and getattr(route.ctx, "public", False):
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 expected):
            if (route is not None and getattr(route.ctx, "page", False)
                    and "text/html" in request.headers.get("accept", "")):
                # A browser cannot send the header when it opens a page: it gets the 401
                # with the page (which holds no data), and the page asks for the token.
                request.ctx.unauthorized = True
                return
            raise UnauthorizedError("this route needs `Authorization: Bearer <token>`")

    async def count(request: Request, response: BaseHTTPResponse) -> None:
        started = getattr(request.ctx, "started", None)
        # The route's name without the app's ("<app>.<blueprint>.<route>").
        route = (request.route.name.partition(".")[2] if request.route is not None
                 else "unmatched")
        if started is not None:
            app.ctx.metrics.observe(route=route, method=request.method,
                                    status=response.status,
                                    seconds=time.perf_counter() - started)
        if tracer is not None:
            _end_request_span(request, response.status)

    async def docs_pages_are_public(app: App) -> None:
        # The docs pages carry no data; they fetch the document with the user's token.
        for route in app.router.routes:
            if route.name.endswith(("openapi.index", "openapi.redoc")):
                route.ctx.public = True

    async def open_repository(app: App) -> None:
        if app.ctx.repository is not None:
            return
        app.ctx.owns_repository = True
        try:
            app.ctx.repository = await _open(settings)
        except DatabaseUnavailableError as exc:
            # Serve anyway: /healthz stays up, /readyz and the data routes answer 503 until
            # the database is back, as an orchestrator expects of a dependency outage.
            log.warning("database unavailable; answering 503 until it is back", error=str(exc))
            app.ctx.reconnecting = asyncio.get_running_loop().create_task(
                _reconnect(app, settings), name="api-reconnect")

    async def close_repository(app: App) -> None:
        reconnecting = getattr(app.ctx, "reconnecting", None)
        if reconnecting is not None:
            reconnecting.cancel()
        if getattr(app.ctx, "owns_repository", False) and app.ctx.repository is not None:
            await app.ctx.repository.close()

    app.register_middleware(start_clock, "request", priority=100)
    app.register_middleware(authenticate, "request", priority=90)
    app.register_middleware(count, "response", priority=100)
    app.register_listener(docs_pages_are_public, "before_server_start")
    app.register_listener(open_repository, "before_server_start")
    app.register_listener(close_repository, "after_server_stop")
    errors.install(app)
    return app
