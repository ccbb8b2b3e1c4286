"""Normalization: the wire's `traffic.v1` messages into the storage layer's rows.

Pure: a message, the stream's node id and the collector's clock go in, a frozen row or the
reasons it is unacceptable come out; nothing here does I/O or reads a clock. Rules:

- Addresses arrive as 4 or 16 bytes and leave as `ipaddress` objects; an IPv4-mapped IPv6
  address (a dual-stack listener's view of an IPv4 client) becomes the IPv4 address.
- Names are lower-cased and IDNA-encoded (UTS #46: `Bücher.example` -> `xn--bcher-kva.example`),
  a trailing root dot dropped. `registered_domain` is the registrable part by the Public
  Suffix List bundled with the `publicsuffixlist` package (read from the wheel, never fetched).
  A "domain" that is an IP literal in text is an IP literal: no domain, no registered domain.
- Times are UTC, truncated to microseconds (PostgreSQL's precision). A time before 2000 (an
  unset clock) or further ahead of the collector's clock than the allowed skew is rejected,
  as is a connection that ends before it starts.
- Every enum must be a known, specified value; counts must fit PostgreSQL's bigint; latencies
  must be finite and non-negative; an all-zero trace id (OpenTelemetry's "invalid") is none.

Each bad field adds a reason that starts with the field's name ("source_ip: 5 bytes,
expected 4 or 16"); an item with any reason is not stored, and the batch's others are.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from asyncpg.pgproto.pgproto import UUID as _FastUUID

from socks5_analytics.domains import (
    DomainAnswer,
    SuffixList,
    canonical_domain,
    could_be_ip,
    default_suffix_list,
    domain_answer,
)
from socks5_analytics.storage.models import InterimReport, StoredEvent
from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb

__all__ = [
    "DomainRules",
    "Invalid",
    "NormalizedBatch",
    "SuffixList",
    "canonical_domain",
    "canonical_ip",
    "default_suffix_list",
    "normalize_batch",
    "normalize_event",
    "normalize_interim",
]

IPAddress = IPv4Address | IPv6Address

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Nothing this product records happened before this; an earlier time is an unset clock.
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_EARLIEST_SECONDS = 946_684_800  # _EARLIEST as seconds since the epoch
_MICROSECOND = timedelta(microseconds=1)
_TIMESTAMP_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, protobuf's own limit
_BIGINT_MAX = (1 << 63) - 1
_MAX_NAME = 255  # user and dest_host, as traffic_logs takes them
_MAX_NODE_ID = 128
# Distinct names (and addresses) remembered, least recently used first out: a proxy fleet
# sees the same few thousand names again and again, and one entry is a few hundred bytes.
CACHE_SIZE = 65_536

_COMMANDS: dict[int, str] = {
    pb.COMMAND_CONNECT: "connect",
    pb.COMMAND_BIND: "bind",
    pb.COMMAND_UDP_ASSOCIATE: "udp_associate",
}
_PROTOCOLS: dict[int, str] = {pb.PROTOCOL_TCP: "tcp", pb.PROTOCOL_UDP: "udp"}
_STATUSES: dict[int, str] = {
    pb.STATUS_OK: "ok",
    pb.STATUS_AUTH_FAILED: "auth_failed",
    pb.STATUS_DENIED_WHITELIST: "denied_whitelist",
    pb.STATUS_DENIED_DESTINATION: "denied_destination",
    pb.STATUS_RATE_LIMITED: "rate_limited",
    pb.STATUS_DNS_FAILED: "dns_failed",
    pb.STATUS_REFUSED: "refused",
    pb.STATUS_UNREACHABLE: "unreachable",
    pb.STATUS_TIMEOUT: "timeout",
    pb.STATUS_ERROR: "error",
}
_CLOSE_REASONS: dict[int, str] = {
    pb.CLOSE_REASON_CLIENT: "client",
    pb.CLOSE_REASON_DESTINATION: "destination",
    pb.CLOSE_REASON_IDLE_TIMEOUT: "idle_timeout",
    pb.CLOSE_REASON_SHUTDOWN: "shutdown",
    pb.CLOSE_REASON_REVOKED: "revoked",
    pb.CLOSE_REASON_ERROR: "error",
}


@dataclass(frozen=True, slots=True)
class Invalid:
    """An event or interim report of a batch that will not be stored, and why."""

    index: int
    interim: bool
    event_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class NormalizedBatch:
    """A batch's rows, each with its position in the message, and the items refused."""

    events: tuple[StoredEvent, ...]
    event_positions: tuple[int, ...]
    interims: tuple[InterimReport, ...]
    interim_positions: tuple[int, ...]
    invalid: tuple[Invalid, ...]


HostAnswer = tuple[str | None, str | None]  # (dest_host, reason)


@dataclass(slots=True)
class DomainRules:
    """How names are judged: the suffix list and the clock skew allowed.

    `domain`, `host` and `ip` are `domain_answer`, `host_answer` and `canonical_ip` behind
    bounded LRU caches (`cache_size` entries each): a proxy sees the same names and addresses
    again and again, and IDNA, the suffix list and address parsing are most of what a new
    one costs. Every answer is a function of its argument, so the caches change no result.
    """

    suffixes: SuffixList
    max_clock_skew: timedelta = timedelta(minutes=5)
    cache_size: int = CACHE_SIZE
    domain: functools._lru_cache_wrapper[DomainAnswer] = field(
        init=False, repr=False, compare=False)
    host: functools._lru_cache_wrapper[HostAnswer] = field(init=False, repr=False, compare=False)
    ip: functools._lru_cache_wrapper[IPAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cached = functools.lru_cache(maxsize=self.cache_size)
        self.domain = cached(functools.partial(domain_answer, self.suffixes))
        self.host = cached(functools.partial(host_answer, self.domain))
        self.ip = cached(canonical_ip)


def host_answer(domain: Callable[[str], DomainAnswer], text: str) -> HostAnswer:
    """(dest_host, reason): an IP literal in canonical text, else a canonical name (uncached).

    `domain` judges names (`DomainRules.domain`, so that both caches share its work).
    """
    if could_be_ip(text):
        try:
            return str(canonical_ip(ip_address(text).packed)), None
        except ValueError:
            pass  # not an address after all: judged as a name below
    name, _, reason = domain(text)
    return (None, reason) if reason is not None else (name or text, None)


def canonical_ip(raw: bytes) -> IPAddress:
    """An address from its 4 or 16 network-order bytes; IPv4-mapped IPv6 becomes IPv4."""
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        address = IPv6Address(raw)
        mapped = address.ipv4_mapped
        return mapped if mapped is not None else address
    raise ValueError(f"{len(raw)} bytes, expected 4 or 16")


@dataclass(frozen=True, slots=True)
class _Clock:
    """The collector's clock as one batch's items are judged against it."""

    now: datetime
    skew: timedelta
    latest_us: int  # now + skew, in microseconds since the epoch

    @classmethod
    def of(cls, now: datetime, skew: timedelta) -> _Clock:
        return cls(now, skew, (now + skew - _EPOCH) // _MICROSECOND)


def _time(stamp: Any, name: str, present: Callable[[str], bool], clock: _Clock,
          problems: list[str]) -> datetime | None:
    """A Timestamp as UTC microseconds; the usual good case is checked on integers first."""
    seconds, nanos = stamp.seconds, stamp.nanos
    micros = nanos // 1000
    if (0 <= nanos <= 999_999_999 and seconds >= _EARLIEST_SECONDS
            and seconds * 1_000_000 + micros <= clock.latest_us):
        return _EPOCH + timedelta(0, seconds, micros)
    if not present(name):
        problems.append(f"{name}: missing")
        return None
    if not 0 <= nanos <= 999_999_999 or not 0 <= seconds <= _TIMESTAMP_MAX_SECONDS:
        problems.append(f"{name}: not a valid timestamp ({seconds}s {nanos}ns)")
        return None
    moment = _EPOCH + timedelta(seconds=seconds, microseconds=micros)
    if moment < _EARLIEST:
        problems.append(f"{name}: {moment.isoformat()} is before 2000 (an unset clock?)")
    else:
        problems.append(
            f"{name}: {moment.isoformat()} is ahead of the collector's clock by more than "
            f"{clock.skew.total_seconds():g} s"
        )
    return None


def _ip(raw: bytes, name: str, rules: DomainRules, problems: list[str]) -> IPAddress | None:
    try:
        return rules.ip(raw)
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        return None


def _ms(value: float, name: str, problems: list[str]) -> float:
    if not (value >= 0 and value != math.inf):  # NaN fails both comparisons
        problems.append(f"{name}: {value!r} is not a finite number >= 0")
    return value


def _count(value: int, name: str, problems: list[str]) -> int:
    if value > _BIGINT_MAX:
        problems.append(f"{name}: {value} is over 2^63-1")
    return value


def _text(value: str, name: str, longest: int, problems: list[str]) -> str:
    if len(value) > longest:
        problems.append(f"{name}: {len(value)} characters, at most {longest}")
    elif "\x00" in value:
        problems.append(f"{name}: contains a NUL character")
    return value


def _enum(value: int, table: dict[int, str], name: str, problems: list[str]) -> str:
    known = table.get(value)
    if known is None:
        problems.append(f"{name}: {value} is not a known value" if value
                        else f"{name}: unspecified")
        return ""
    return known


def _event_id(raw: bytes, problems: list[str]) -> uuid.UUID:
    """The event id; asyncpg's UUID (a `uuid.UUID`, equal and hashing alike) is made ten
    times faster and is what its COPY encoder writes without converting."""
    if len(raw) != 16:
        problems.append(f"event_id: {len(raw)} bytes, expected 16")
        return _NO_ID
    made: uuid.UUID = _FastUUID(raw)
    return made


_NO_ID = uuid.UUID(int=0)


def _names(text: str, rules: DomainRules, problems: list[str]) -> tuple[str | None, str | None]:
    """(domain, registered_domain) of the name the client sent ("" when none)."""
    if not text:
        return None, None
    domain, registered, reason = rules.domain(text)
    if reason is not None:
        problems.append(f"domain: {reason}")
    return domain, registered


def _dest_host(text: str, rules: DomainRules, problems: list[str]) -> str | None:
    if not text:
        return None
    host, reason = rules.host(text)
    if reason is not None:
        problems.append(f"dest_host: {reason}")
    return host


def normalize_event(
    message: pb.ConnectionEvent, *, node_id: str, now: datetime, rules: DomainRules
) -> StoredEvent | str:
    """The row of a finished connection, or the reasons (naming fields) it has none.

    `node_id` is the stream's node, used when the event does not name one itself.
    """
    return _event(message, node_id, rules, _Clock.of(now, rules.max_clock_skew))


def _event(message: pb.ConnectionEvent, node_id: str, rules: DomainRules,
           clock: _Clock) -> StoredEvent | str:
    # One pass over the fields in the order the reasons are listed. An unset optional
    # string reads as "", which means "none" for dest_host and domain alike.
    problems: list[str] = []
    present = message.HasField
    event_id = _event_id(message.event_id, problems)
    node = message.node_id or node_id
    if len(node) > _MAX_NODE_ID:
        problems.append(f"node_id: {len(node)} characters, at most {_MAX_NODE_ID}")
    started_at = _time(message.started_at, "started_at", present, clock, problems)
    ended_at = _time(message.ended_at, "ended_at", present, clock, problems)
    if started_at is not None and ended_at is not None and ended_at < started_at:
        problems.append(f"ended_at: {ended_at.isoformat()} is before started_at")
    source_ip = _ip(message.source_ip, "source_ip", rules, problems)
    source_port = message.source_port
    if source_port > 65535:
        problems.append(f"source_port: {source_port} is over 65535")
    user = _text(message.user, "user", _MAX_NAME, problems)
    command = _enum(message.command, _COMMANDS, "command", problems)
    protocol = _enum(message.protocol, _PROTOCOLS, "protocol", problems)
    dest_host = _dest_host(message.dest_host, rules, problems)
    domain, registered = _names(message.domain, rules, problems)
    raw_dest = message.dest_ip
    dest_ip = _ip(raw_dest, "dest_ip", rules, problems) if raw_dest else None
    dest_port = message.dest_port if present("dest_port") else None
    if dest_port is not None and dest_port > 65535:
        problems.append(f"dest_port: {dest_port} is over 65535")
    status = _enum(message.status, _STATUSES, "status", problems)
    reply_code = message.reply_code if present("reply_code") else None
    if reply_code is not None and reply_code > 255:
        problems.append(f"reply_code: {reply_code} is over 255")
    close_reason = _enum(message.close_reason, _CLOSE_REASONS, "close_reason", problems)
    connect_ms = (_ms(message.connect_ms, "connect_ms", problems)
                  if present("connect_ms") else None)
    ttfb_ms = _ms(message.ttfb_ms, "ttfb_ms", problems) if present("ttfb_ms") else None
    duration_ms = _ms(message.duration_ms, "duration_ms", problems)
    bytes_out = _count(message.bytes_out, "bytes_out", problems)
    bytes_in = _count(message.bytes_in, "bytes_in", problems)
    trace_id: str | None = None
    raw_trace = message.trace_id
    if raw_trace:
        if len(raw_trace) != 16:
            problems.append(f"trace_id: {len(raw_trace)} bytes, expected 16")
        elif any(raw_trace):
            trace_id = raw_trace.hex()
    if problems:
        return "; ".join(problems)
    assert started_at is not None and ended_at is not None and source_ip is not None
    return StoredEvent(
        event_id=event_id,
        node_id=node,
        started_at=started_at,
        ended_at=ended_at,
        source_ip=source_ip,
        source_port=source_port,
        user_name=user,
        command=command,
        protocol=protocol,
        dest_host=dest_host,
        domain=domain,
        dest_ip=dest_ip,
        dest_port=dest_port,
        registered_domain=registered,
        status=status,
        reply_code=reply_code,
        close_reason=close_reason,
        connect_ms=connect_ms,
        ttfb_ms=ttfb_ms,
        duration_ms=duration_ms,
        bytes_out=bytes_out,
        bytes_in=bytes_in,
        trace_id=trace_id,
    )


def normalize_interim(
    message: pb.InterimReport, *, node_id: str, now: datetime, rules: DomainRules
) -> InterimReport | str:
    """The rollup input of an open connection's counts, or the reasons it has none."""
    return _interim(message, node_id, rules, _Clock.of(now, rules.max_clock_skew))


def _interim(message: pb.InterimReport, node_id: str, rules: DomainRules,
             clock: _Clock) -> InterimReport | str:
    problems: list[str] = []
    present = message.HasField
    event_id = _event_id(message.event_id, problems)
    started_at = _time(message.started_at, "started_at", present, clock, problems)
    reported_at = _time(message.reported_at, "reported_at", present, clock, problems)
    if started_at is not None and reported_at is not None and reported_at < started_at:
        problems.append(f"reported_at: {reported_at.isoformat()} is before started_at")
    source_ip = _ip(message.source_ip, "source_ip", rules, problems)
    user = _text(message.user, "user", _MAX_NAME, problems)
    domain, registered = _names(message.domain, rules, problems)
    bytes_out = _count(message.bytes_out, "bytes_out", problems)
    bytes_in = _count(message.bytes_in, "bytes_in", problems)
    if problems:
        return "; ".join(problems)
    assert started_at is not None and reported_at is not None and source_ip is not None
    return InterimReport(
        event_id=event_id,
        node_id=node_id,
        started_at=started_at,
        reported_at=reported_at,
        source_ip=source_ip,
        user_name=user,
        domain=domain,
        registered_domain=registered,
        bytes_out=bytes_out,
        bytes_in=bytes_in,
    )


def normalize_batch(
    events: Sequence[pb.ConnectionEvent],
    interims: Sequence[pb.InterimReport],
    *,
    node_id: str,
    now: datetime,
    rules: DomainRules,
) -> NormalizedBatch:
    """Every item of a batch: the rows to store and the items refused, by position."""
    clock = _Clock.of(now, rules.max_clock_skew)
    rows: list[StoredEvent] = []
    row_positions: list[int] = []
    reports: list[InterimReport] = []
    report_positions: list[int] = []
    invalid: list[Invalid] = []
    for index, message in enumerate(events):
        row = _event(message, node_id, rules, clock)
        if isinstance(row, str):
            invalid.append(Invalid(index, False, _readable_id(message.event_id), row))
        else:
            rows.append(row)
            row_positions.append(index)
    for index, interim in enumerate(interims):
        report = _interim(interim, node_id, rules, clock)
        if isinstance(report, str):
            invalid.append(Invalid(index, True, _readable_id(interim.event_id), report))
        else:
            reports.append(report)
            report_positions.append(index)
    return NormalizedBatch(
        events=tuple(rows),
        event_positions=tuple(row_positions),
        interims=tuple(reports),
        interim_positions=tuple(report_positions),
        invalid=tuple(invalid),
    )


def _readable_id(raw: bytes) -> bytes:
    return raw if len(raw) == 16 else b""
