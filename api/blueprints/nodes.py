"""/nodes: the proxy nodes seen, with what each reported last."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from api import serialize
from api.context import query, repository
from api.openapi import describe
from api.params import parse_page
from socks5_analytics.config import ApiSettings

__all__ = ["blueprint"]


def blueprint(settings: ApiSettings) -> Blueprint:
    """The nodes route."""
    bp = Blueprint("nodes")

    @bp.get("/nodes", name="nodes")
    @describe(route="nodes", response="nodes", tag="nodes", secured=settings.token is not None,
              summary="The proxy nodes seen, by node id",
              description="Each node's version, start, last heartbeat, policy version and "
              "open connections. Takes `limit` and `offset` only: nodes are not events.")
    async def nodes(request: Request) -> HTTPResponse:
        limit, offset = parse_page(query(request, "nodes"))
        result = await repository(request).nodes(limit=limit, offset=offset)
        return json(serialize.page(result, serialize.node))

    return bp
