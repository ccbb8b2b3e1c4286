"""The repository's inputs and outputs: frozen dataclasses (one named tuple), never database
records.

Inputs are already normalized (the collector turns its proto messages into them): times are
timezone-aware UTC, addresses are `ipaddress` objects, names are lower-case.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Generic, Literal, NamedTuple, TypeVar

__all__ = [
    "BatchResult",
    "ClientStat",
    "DomainLatency",
    "DomainStat",
    "HistogramBucket",
    "IPAddress",
    "InterimReport",
    "LatencyStats",
    "LogPage",
    "MaintenanceResult",
    "NodeInfo",
    "NodeReport",
    "Page",
    "RejectedRow",
    "StatsFilter",
    "StatusCount",
    "StoredEvent",
    "TrafficInterval",
    "TrafficPoint",
    "TrafficSeries",
]

IPAddress = IPv4Address | IPv6Address
T = TypeVar("T")

TrafficInterval = Literal["1m", "5m", "1h", "1d"]


class StoredEvent(NamedTuple):
    """One connection event as `traffic_logs` stores it (DESIGN.md, "The connection event").

    A named tuple rather than a frozen dataclass: as immutable, and built in a third of the
    time (one C call instead of 23 `object.__setattr__`), which the collector pays per event.
    """

    event_id: uuid.UUID
    node_id: str
    started_at: datetime
    ended_at: datetime
    source_ip: IPAddress
    source_port: int
    user_name: str
    command: str
    protocol: str
    dest_host: str | None
    domain: str | None
    dest_ip: IPAddress | None
    dest_port: int | None
    registered_domain: str | None
    status: str
    reply_code: int | None
    close_reason: str
    connect_ms: float | None
    ttfb_ms: float | None
    duration_ms: float
    bytes_out: int
    bytes_in: int
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class InterimReport:
    """Bytes an open connection has moved so far (cumulative since it started).

    Only the rollups take these, in the minute of `reported_at`; `traffic_logs` still gets
    one row per connection when its final event arrives. Cumulative counts make a report
    idempotent: the rollups get the growth since the largest count already seen.
    """

    event_id: uuid.UUID
    node_id: str
    started_at: datetime
    reported_at: datetime
    source_ip: IPAddress
    user_name: str
    domain: str | None
    registered_domain: str | None
    bytes_out: int
    bytes_in: int


@dataclass(frozen=True, slots=True)
class NodeReport:
    """A proxy node's heartbeat: what `proxy_nodes` keeps for it."""

    node_id: str
    version: str
    started_at: datetime
    last_seen: datetime
    policy_version: str
    active_connections: int


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row of a batch that was not written, and why."""

    event_id: uuid.UUID
    kind: Literal["event", "interim"]
    reason: str


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one `insert_batch` did.

    `inserted` rows are new; `duplicates` were already stored (a retried batch, a replayed
    spool); `expired` are older than the retention and were skipped; `rejected` failed the
    row checks and were not written, while the batch's other rows were.
    """

    inserted: int
    duplicates: int
    interim_applied: int
    expired: int
    rejected: tuple[RejectedRow, ...] = ()


@dataclass(frozen=True, slots=True)
class MaintenanceResult:
    """The partitions one maintenance pass created and dropped, by table name.

    `skipped`: another process (a second collector) was running a pass, so this one did
    nothing."""

    created: tuple[str, ...]
    dropped: tuple[str, ...]
    progress_purged: int
    nodes_purged: int
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class StatsFilter:
    """The time window and the filters every stats and logs query takes.

    The window is half-open, [since, until). Stats served from the per-minute rollups count
    whole minutes: the repository widens the window to minute boundaries for every stats
    query, whichever table answers it, so the two paths agree.
    """

    since: datetime
    until: datetime
    user: str | None = None
    source_ip: IPAddress | None = None
    domain: str | None = None
    node: str | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: the items, and how many there are in all."""

    items: tuple[T, ...]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True, slots=True)
class DomainStat:
    """An item of /stats/top-domains (`domain` is the registered domain when grouped so)."""

    domain: str
    connections: int
    bytes_in: int
    bytes_out: int
    bytes_total: int
    avg_connect_ms: float | None


@dataclass(frozen=True, slots=True)
class ClientStat:
    """An item of /stats/source-ips (with `users`) or /stats/users (with `source_ips`)."""

    key: str
    connections: int
    bytes_in: int
    bytes_out: int
    bytes_total: int
    distinct: int


@dataclass(frozen=True, slots=True)
class TrafficPoint:
    """One bucket of /stats/traffic."""

    ts: datetime
    connections: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class TrafficSeries:
    """The /stats/traffic answer: every bucket of the window, zeros included."""

    interval: TrafficInterval
    points: tuple[TrafficPoint, ...]


@dataclass(frozen=True, slots=True)
class HistogramBucket:
    """How many connect latencies fell at or under `le_ms` (and over the previous bound)."""

    le_ms: float  # math.inf for the last bucket
    count: int


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """The /stats/latency answer: percentiles are interpolated within histogram buckets."""

    count: int
    avg_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    histogram: tuple[HistogramBucket, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class DomainLatency:
    """An item of /stats/latency?group_by=domain."""

    domain: str
    latency: LatencyStats


@dataclass(frozen=True, slots=True)
class StatusCount:
    """An item of /stats/statuses."""

    status: str
    connections: int


@dataclass(frozen=True, slots=True)
class LogPage:
    """A page of /logs, newest first; `next_cursor` continues after its last item."""

    items: tuple[StoredEvent, ...]
    total: int
    limit: int
    offset: int
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """An item of /nodes."""

    node_id: str
    version: str
    started_at: datetime
    last_seen: datetime
    policy_version: str
    active_connections: int
