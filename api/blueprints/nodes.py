"""/nodes: the proxy nodes seen, with what each reported last."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from api import serialize
from api.context import now, query, repository
from api.openapi import describe
from api.params import parse_list_query
from socks5_analytics.config import ApiSettings

__all__ = ["blueprint"]


def blueprint(settings: ApiSettings) -> Blueprint:
    """The nodes route."""
    bp = Blueprint("nodes")

    @bp.get("/nodes", name="nodes")
    @describe(route="nodes", response="nodes", tag="nodes", secured=settings.token is not None,
              summary="The proxy nodes seen, by node id",
              description="Each node's version, start, last heartbeat, policy version and "
              "open connections: the nodes up at some time in the window (started before "
              "its end, a heartbeat since its start). `node` names one; `user`, "
              "`source_ip`, `domain` and `status` keep the nodes that carried such a "
              "connection in the window.")
    async def nodes(request: Request) -> HTTPResponse:
        q = parse_list_query(query(request, "nodes"), now=now(request))
        result = await repository(request).nodes(flt=q.flt, limit=q.limit, offset=q.offset)
        return json(serialize.page(result, serialize.node))

    return bp
