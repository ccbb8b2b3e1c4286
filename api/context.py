"""What handlers read from the app and the request: the repository, the clock, the query."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sanic import Request

from api.params import ROUTE_PARAMETERS, single_values
from socks5_analytics.storage import Repository
from socks5_analytics.storage.errors import DatabaseUnavailableError

__all__ = ["now", "query", "repository"]


def repository(request: Request) -> Repository:
    """The app's repository (opened by the `before_server_start` listener, or later)."""
    repo: Repository | None = request.app.ctx.repository
    if repo is None:
        raise DatabaseUnavailableError("the database has not been reachable since startup")
    return repo


def now(request: Request) -> datetime:
    """The app's clock: UTC now, or a fixed time in tests."""
    clock: Callable[[], datetime] = request.app.ctx.clock
    return clock()


def query(request: Request, route: str) -> dict[str, str]:
    """The query arguments, one value each, refusing any that `route` does not take."""
    args: Any = request.get_args(keep_blank_values=True)
    return single_values(dict(args), ROUTE_PARAMETERS[route])
