"""The connection event: one per proxied TCP connection or UDP association (DESIGN.md).

A `ConnectionRecord` is filled in while a session runs (cheap attribute writes on the hot
path); `finish()` turns it into the immutable event handed to the sink.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, NamedTuple

__all__ = [
    "CLOSE_REASONS",
    "STATUSES",
    "ConnectionEvent",
    "ConnectionRecord",
    "InterimSample",
    "uuid7",
]

STATUSES = frozenset(
    {"ok", "auth_failed", "denied_whitelist", "denied_destination", "rate_limited",
     "dns_failed", "refused", "unreachable", "timeout", "error"}
)
CLOSE_REASONS = frozenset(
    {"client", "destination", "idle_timeout", "shutdown", "revoked", "error"}
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit millisecond timestamp, then random bits."""
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    # Uniqueness, not secrecy, is what an idempotency key needs; getrandbits avoids a
    # syscall per event and is reseeded in forked workers.
    rand = random.getrandbits(76)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76 | ((rand >> 64) & 0x0FFF) << 64
    value |= 0b10 << 62 | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    return uuid.UUID(int=value)


class ConnectionEvent(NamedTuple):
    """Every field of DESIGN.md's event table, under the same names (immutable; a tuple
    because one is built per connection and a frozen dataclass costs several times more)."""

    event_id: uuid.UUID
    node_id: str
    started_at: datetime
    ended_at: datetime
    source_ip: str
    source_port: int
    user: str
    command: str
    protocol: str
    dest_host: str | None
    domain: str | None
    dest_ip: str | None
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
    trace_id: str | None
    span_id: str | None = None  # for linking the collector's spans; not a stored field

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping of the design's fields: ISO 8601 UTC times, UUID as text."""
        data = self._asdict()
        del data["span_id"]
        data["event_id"] = str(self.event_id)
        data["started_at"] = _iso(self.started_at)
        data["ended_at"] = _iso(self.ended_at)
        return data

    def to_json_line(self, registered_domain: str | None = None) -> str:
        """`to_json_dict()` as one JSON line, built directly: the sink writes one per
        connection, and a general encoder over a fresh dict cost twice as much.
        `registered_domain`, when given, is written instead of the event's own (None)."""
        if registered_domain is None:
            registered_domain = self.registered_domain
        return (
            f'{{"event_id": "{self.event_id}", "node_id": {_quote(self.node_id)}, '
            f'"started_at": "{_iso(self.started_at)}", "ended_at": "{_iso(self.ended_at)}", '
            f'"source_ip": {_quote(self.source_ip)}, "source_port": {self.source_port}, '
            f'"user": {_quote(self.user)}, "command": {_quote(self.command)}, '
            f'"protocol": {_quote(self.protocol)}, "dest_host": {_text(self.dest_host)}, '
            f'"domain": {_text(self.domain)}, "dest_ip": {_text(self.dest_ip)}, '
            f'"dest_port": {_number(self.dest_port)}, '
            f'"registered_domain": {_text(registered_domain)}, '
            f'"status": {_quote(self.status)}, "reply_code": {_number(self.reply_code)}, '
            f'"close_reason": {_quote(self.close_reason)}, '
            f'"connect_ms": {_number(self.connect_ms)}, "ttfb_ms": {_number(self.ttfb_ms)}, '
            f'"duration_ms": {float(self.duration_ms)!r}, "bytes_out": {self.bytes_out}, '
            f'"bytes_in": {self.bytes_in}, "trace_id": {_text(self.trace_id)}}}\n'
        )


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _number(value: float | None) -> str:
    """JSON for an optional int or (finite) float, as the json module writes it."""
    if value is None:
        return "null"
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


class InterimSample(NamedTuple):
    """Cumulative bytes of a connection still open (DESIGN.md: interim byte counts)."""

    event_id: uuid.UUID
    started_at: datetime
    reported_at: datetime
    source_ip: str
    user: str
    domain: str | None
    bytes_out: int
    bytes_in: int


class ConnectionRecord:
    """The mutable state of one session's event, filled in as the session goes."""

    __slots__ = (
        "accepted_mono",
        "bytes_in",
        "bytes_out",
        "close_reason",
        "command",
        "connected_mono",
        "dest_host",
        "dest_ip",
        "dest_port",
        "domain",
        "event_id",
        "first_byte_mono",
        "protocol",
        "replied_mono",
        "reply_code",
        "request_mono",
        "source_ip",
        "source_port",
        "span_id",
        "started_wall_us",
        "status",
        "trace_id",
        "user",
    )

    def __init__(self, source_ip: str, source_port: int, accepted_mono: float) -> None:
        self.started_wall_us = time.time_ns() // 1000
        self.accepted_mono = accepted_mono
        self.source_ip = source_ip
        self.source_port = source_port
        self.user = ""
        self.command = "connect"
        self.protocol = "tcp"
        self.dest_host: str | None = None
        self.domain: str | None = None
        self.dest_ip: str | None = None
        self.dest_port: int | None = None
        self.status = "error"
        self.reply_code: int | None = None
        self.close_reason = "client"
        self.request_mono: float | None = None
        self.connected_mono: float | None = None
        self.replied_mono: float | None = None
        self.first_byte_mono: float | None = None
        self.bytes_out = 0
        self.bytes_in = 0
        self.event_id: uuid.UUID | None = None
        self.trace_id: str | None = None
        self.span_id: str | None = None

    @property
    def started_at(self) -> datetime:
        """When the connection was accepted."""
        return _EPOCH + timedelta(microseconds=self.started_wall_us)

    def interim(self, bytes_out: int, bytes_in: int) -> InterimSample:
        """A sample of this open connection's cumulative bytes, taken now."""
        if self.event_id is None:
            self.event_id = uuid7(self.started_wall_us // 1000)
        return InterimSample(
            event_id=self.event_id,
            started_at=self.started_at,
            reported_at=datetime.now(UTC),
            source_ip=self.source_ip,
            user=self.user,
            domain=self.domain,
            bytes_out=bytes_out,
            bytes_in=bytes_in,
        )

    def finish(self, *, node_id: str, now_mono: float) -> ConnectionEvent:
        """Freeze the record into the event the sink receives."""
        duration_ms = max(0.0, (now_mono - self.accepted_mono) * 1000.0)
        started = _EPOCH + timedelta(microseconds=self.started_wall_us)
        connect_ms = ttfb_ms = None
        if self.request_mono is not None and self.connected_mono is not None:
            connect_ms = round((self.connected_mono - self.request_mono) * 1000.0, 3)
        if self.replied_mono is not None and self.first_byte_mono is not None:
            ttfb_ms = round(max(0.0, self.first_byte_mono - self.replied_mono) * 1000.0, 3)
        # Positional: keyword construction of a 24-field tuple costs twice as much.
        return ConnectionEvent(
            self.event_id or uuid7(self.started_wall_us // 1000),
            node_id,
            started,
            started + timedelta(microseconds=int(duration_ms * 1000)),
            self.source_ip,
            self.source_port,
            self.user,
            self.command,
            self.protocol,
            self.dest_host,
            self.domain,
            self.dest_ip,
            self.dest_port,
            None,  # registered_domain: the collector (or the file sink) derives it
            self.status,
            self.reply_code,
            self.close_reason,
            connect_ms,
            ttfb_ms,
            round(duration_ms, 3),
            self.bytes_out,
            self.bytes_in,
            self.trace_id,
            self.span_id,
        )
