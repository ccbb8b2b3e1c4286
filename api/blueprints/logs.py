"""/logs: the raw connection events, newest first."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from api import serialize
from api.context import now, query, repository
from api.openapi import describe
from api.params import bad_cursor, parse_cursor, parse_list_query
from socks5_analytics.config import ApiSettings
from socks5_analytics.storage.errors import InvalidQueryError

__all__ = ["blueprint"]


def blueprint(settings: ApiSettings) -> Blueprint:
    """The logs route."""
    bp = Blueprint("logs")

    @bp.get("/logs", name="logs")
    @describe(route="logs", response="logs", tag="logs", secured=settings.token is not None,
              summary="Raw connection events, newest first",
              description="Filtered like the stats routes; page with `limit` and `offset`, or "
              "with `cursor` (the previous page's `next_cursor`), which never repeats or "
              "skips an event. `total` counts the whole filtered window.")
    async def logs(request: Request) -> HTTPResponse:
        values = query(request, "logs")
        q = parse_list_query(values, now=now(request))
        cursor = values.get("cursor")
        if cursor is not None:
            parse_cursor("cursor", cursor)
        try:
            result = await repository(request).logs(flt=q.flt, limit=q.limit, offset=q.offset,
                                                    cursor=cursor)
        except InvalidQueryError as exc:
            # The only query the repository can refuse here is the cursor's (one that does
            # not decode): the same error as a cursor of the wrong shape.
            raise bad_cursor("cursor") from exc
        return json(serialize.log_page(result))

    return bp
