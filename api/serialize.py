"""The repository's dataclasses as JSON-ready dictionaries, in the shapes of DESIGN.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from socks5_analytics.storage.models import (
    ClientStat,
    DomainLatency,
    DomainStat,
    LatencyStats,
    LogPage,
    NodeInfo,
    Page,
    StatusCount,
    StoredEvent,
    TrafficSeries,
)

__all__ = [
    "client",
    "domain_latency",
    "domain_stat",
    "event",
    "latency",
    "log_page",
    "node",
    "page",
    "status_count",
    "timestamp",
    "traffic",
]

T = TypeVar("T")


def timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, microseconds only when there are any."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def page(result: Page[T], item: Callable[[T], dict[str, Any]]) -> dict[str, Any]:
    """A list response: `{"items", "limit", "offset", "total"}`."""
    return {
        "items": [item(entry) for entry in result.items],
        "limit": result.limit,
        "offset": result.offset,
        "total": result.total,
    }


def _ms(value: float | None) -> float | None:
    """A latency figure in ms to the microsecond: the float noise of a mean (0.31449999999999995)
    is not information, and the same mean summed in another order reads the same."""
    return None if value is None else round(value, 3)


def domain_stat(stat: DomainStat) -> dict[str, Any]:
    """An item of /stats/top-domains."""
    return {
        "domain": stat.domain,
        "connections": stat.connections,
        "bytes_in": stat.bytes_in,
        "bytes_out": stat.bytes_out,
        "bytes_total": stat.bytes_total,
        "avg_connect_ms": _ms(stat.avg_connect_ms),
    }


def client(stat: ClientStat, *, key: str, distinct: str) -> dict[str, Any]:
    """An item of /stats/source-ips (`source_ip`, `users`) or /stats/users (`user`,
    `source_ips`)."""
    return {
        key: stat.key,
        "connections": stat.connections,
        "bytes_in": stat.bytes_in,
        "bytes_out": stat.bytes_out,
        "bytes_total": stat.bytes_total,
        distinct: stat.distinct,
    }


def traffic(series: TrafficSeries) -> dict[str, Any]:
    """The /stats/traffic answer."""
    return {
        "interval": series.interval,
        "points": [
            {"ts": timestamp(point.ts), "connections": point.connections,
             "bytes_in": point.bytes_in, "bytes_out": point.bytes_out}
            for point in series.points
        ],
    }


def _bound(value: float) -> float | None:
    # JSON has no infinity: the last, unbounded histogram bucket has `le_ms: null`.
    return None if math.isinf(value) else value


def latency(stats: LatencyStats) -> dict[str, Any]:
    """The /stats/latency answer (histogram counts are per bucket, not cumulative)."""
    return {
        "count": stats.count,
        "avg_ms": _ms(stats.avg_ms),
        "p50_ms": _ms(stats.p50_ms),
        "p95_ms": _ms(stats.p95_ms),
        "p99_ms": _ms(stats.p99_ms),
        "max_ms": _ms(stats.max_ms),
        "histogram": [{"le_ms": _bound(bucket.le_ms), "count": bucket.count}
                      for bucket in stats.histogram],
    }


def domain_latency(item: DomainLatency) -> dict[str, Any]:
    """An item of /stats/latency?group_by=domain."""
    return {"domain": item.domain, **latency(item.latency)}


def status_count(item: StatusCount) -> dict[str, Any]:
    """An item of /stats/statuses."""
    return {"status": item.status, "connections": item.connections}


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


def event(item: StoredEvent) -> dict[str, Any]:
    """An item of /logs: the connection event of DESIGN.md, under its names."""
    return {
        "event_id": str(item.event_id),
        "node_id": item.node_id,
        "started_at": timestamp(item.started_at),
        "ended_at": timestamp(item.ended_at),
        "source_ip": str(item.source_ip),
        "source_port": item.source_port,
        "user": item.user_name,
        "command": item.command,
        "protocol": item.protocol,
        "dest_host": item.dest_host,
        "domain": item.domain,
        "dest_ip": _text(item.dest_ip),
        "dest_port": item.dest_port,
        "registered_domain": item.registered_domain,
        "status": item.status,
        "reply_code": item.reply_code,
        "close_reason": item.close_reason,
        "connect_ms": item.connect_ms,
        "ttfb_ms": item.ttfb_ms,
        "duration_ms": item.duration_ms,
        "bytes_out": item.bytes_out,
        "bytes_in": item.bytes_in,
        "trace_id": item.trace_id,
    }


def log_page(result: LogPage) -> dict[str, Any]:
    """The /logs answer: a list response with `next_cursor`."""
    return {
        "items": [event(item) for item in result.items],
        "limit": result.limit,
        "offset": result.offset,
        "total": result.total,
        "next_cursor": result.next_cursor,
    }


def node(item: NodeInfo) -> dict[str, Any]:
    """An item of /nodes."""
    return {
        "node_id": item.node_id,
        "version": item.version,
        "started_at": timestamp(item.started_at),
        "last_seen": timestamp(item.last_seen),
        "policy_version": item.policy_version,
        "active_connections": item.active_connections,
    }

