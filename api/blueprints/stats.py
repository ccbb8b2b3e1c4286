"""/stats/*: aggregates over a time window, served from the per-minute rollups."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from api import serialize
from api.context import now, query, repository
from api.openapi import describe
from api.params import choose_interval, parse_choice, parse_filter, parse_list_query
from socks5_analytics.config import ApiSettings

__all__ = ["blueprint"]

_SORTS = ("connections", "bytes")
_WINDOW = ("Window and filters: `from`, `to` (default: the last 24 hours), `user`, "
           "`source_ip`, `domain`, `node`, `status`.")


def blueprint(settings: ApiSettings) -> Blueprint:
    """The stats routes."""
    bp = Blueprint("stats", url_prefix="/stats")
    secured = settings.token is not None

    @bp.get("/top-domains", name="top_domains")
    @describe(route="top_domains", response="top_domains", tag="stats", secured=secured,
              summary="Destination domains by connections or bytes",
              description="Connections to IP literals have no domain and are not listed. "
              + _WINDOW)
    async def top_domains(request: Request) -> HTTPResponse:
        values = query(request, "top_domains")
        q = parse_list_query(values, now=now(request))
        sort = parse_choice("sort", values.get("sort", "connections"), _SORTS)
        group = parse_choice("group", values.get("group", "domain"),
                             ("domain", "registered_domain"))
        result = await repository(request).top_domains(
            flt=q.flt, sort=sort, group=group, limit=q.limit, offset=q.offset  # type: ignore[arg-type]
        )
        return json(serialize.page(result, serialize.domain_stat))

    @bp.get("/source-ips", name="source_ips")
    @describe(route="source_ips", response="source_ips", tag="stats", secured=secured,
              summary="Client addresses by connections or bytes",
              description="`users` counts the distinct user names seen from the address. "
              + _WINDOW)
    async def source_ips(request: Request) -> HTTPResponse:
        values = query(request, "source_ips")
        q = parse_list_query(values, now=now(request))
        sort = parse_choice("sort", values.get("sort", "connections"), _SORTS)
        result = await repository(request).top_source_ips(
            flt=q.flt, sort=sort, limit=q.limit, offset=q.offset  # type: ignore[arg-type]
        )
        return json(serialize.page(
            result, lambda item: serialize.client(item, key="source_ip", distinct="users")
        ))

    @bp.get("/users", name="users")
    @describe(route="users", response="users", tag="stats", secured=secured,
              summary="Users by connections or bytes",
              description="`user` is empty for connections without authentication; "
              "`source_ips` counts the distinct client addresses. " + _WINDOW)
    async def users(request: Request) -> HTTPResponse:
        values = query(request, "users")
        q = parse_list_query(values, now=now(request))
        sort = parse_choice("sort", values.get("sort", "connections"), _SORTS)
        result = await repository(request).top_users(
            flt=q.flt, sort=sort, limit=q.limit, offset=q.offset  # type: ignore[arg-type]
        )
        return json(serialize.page(
            result, lambda item: serialize.client(item, key="user", distinct="source_ips")
        ))

    @bp.get("/traffic", name="traffic")
    @describe(route="traffic", response="traffic", tag="stats", secured=secured,
              summary="Connections and bytes over time",
              description="Every bucket of the window, zeros included, aligned in UTC. "
              f"More than {settings.max_points} points is a 400. " + _WINDOW)
    async def traffic(request: Request) -> HTTPResponse:
        values = query(request, "traffic")
        flt = parse_filter(values, now=now(request))
        interval = choose_interval(values.get("interval"), flt.since, flt.until,
                                   max_points=settings.max_points)
        series = await repository(request).traffic(flt=flt, interval=interval,
                                                   max_points=settings.max_points)
        return json(serialize.traffic(series))

    @bp.get("/latency", name="latency")
    @describe(route="latency", response="latency", tag="stats", secured=secured,
              summary="Connect latency: count, mean, percentiles, max, histogram",
              description="Of `connect_ms`. Percentiles are interpolated within histogram "
              "buckets. `group_by=domain` gives a list response of the same per domain "
              "(`limit` and `offset` apply to it). " + _WINDOW)
    async def latency(request: Request) -> HTTPResponse:
        values = query(request, "latency")
        q = parse_list_query(values, now=now(request))
        group_by = values.get("group_by")
        if group_by is not None:
            parse_choice("group_by", group_by, ("domain",))
            result = await repository(request).latency_by_domain(
                flt=q.flt, limit=q.limit, offset=q.offset
            )
            return json(serialize.page(result, serialize.domain_latency))
        return json(serialize.latency(await repository(request).latency(flt=q.flt)))

    @bp.get("/statuses", name="statuses")
    @describe(route="statuses", response="statuses", tag="stats", secured=secured,
              summary="Connections per status, most first", description=_WINDOW)
    async def statuses(request: Request) -> HTTPResponse:
        values = query(request, "statuses")
        q = parse_list_query(values, now=now(request))
        result = await repository(request).statuses(flt=q.flt, limit=q.limit,
                                                    offset=q.offset)
        return json(serialize.page(result, serialize.status_count))

    return bp
