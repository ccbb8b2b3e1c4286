"""Proxy events to their `traffic.v1` wire form. Pure functions, no I/O.

Addresses become 4 or 16 bytes in network order, times `Timestamp`s, names enums; the
collector's normalizer is the inverse.
"""

from __future__ import annotations

import functools
import socket
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from proxy_node.events import ConnectionEvent, InterimSample
from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb

__all__ = ["event_to_proto", "fill_event", "interim_to_proto", "ip_bytes", "timestamp"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_COMMANDS = {
    "connect": pb.COMMAND_CONNECT,
    "bind": pb.COMMAND_BIND,
    "udp_associate": pb.COMMAND_UDP_ASSOCIATE,
}
_PROTOCOLS = {"tcp": pb.PROTOCOL_TCP, "udp": pb.PROTOCOL_UDP}
_STATUSES = {
    "ok": pb.STATUS_OK,
    "auth_failed": pb.STATUS_AUTH_FAILED,
    "denied_whitelist": pb.STATUS_DENIED_WHITELIST,
    "denied_destination": pb.STATUS_DENIED_DESTINATION,
    "rate_limited": pb.STATUS_RATE_LIMITED,
    "dns_failed": pb.STATUS_DNS_FAILED,
    "refused": pb.STATUS_REFUSED,
    "unreachable": pb.STATUS_UNREACHABLE,
    "timeout": pb.STATUS_TIMEOUT,
    "error": pb.STATUS_ERROR,
}
_CLOSE_REASONS = {
    "client": pb.CLOSE_REASON_CLIENT,
    "destination": pb.CLOSE_REASON_DESTINATION,
    "idle_timeout": pb.CLOSE_REASON_IDLE_TIMEOUT,
    "shutdown": pb.CLOSE_REASON_SHUTDOWN,
    "revoked": pb.CLOSE_REASON_REVOKED,
    "error": pb.CLOSE_REASON_ERROR,
}


def ip_bytes(address: str | None) -> bytes:
    """4 bytes for IPv4, 16 for IPv6, empty for None."""
    if not address:
        return b""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address)
    return socket.inet_pton(socket.AF_INET, address)


# The same few clients and destinations recur: a cache hit costs a third of an inet_pton.
# Bounded like access.py's memoized address parsing, so ever new addresses keep working.
_IP_CACHE_MAX = 4096
_cached_ip_bytes = functools.lru_cache(maxsize=_IP_CACHE_MAX)(ip_bytes)


def _seconds_nanos(moment: datetime) -> tuple[int, int]:
    """An aware datetime as exact Timestamp fields (nanos in [0, 1e9), even before 1970)."""
    seconds, micros = divmod((moment - _EPOCH) // _MICROSECOND, 1_000_000)
    return seconds, micros * 1000


def timestamp(moment: datetime) -> Timestamp:
    """An exact protobuf Timestamp of an aware datetime."""
    seconds, nanos = _seconds_nanos(moment)
    return Timestamp(seconds=seconds, nanos=nanos)


def event_to_proto(event: ConnectionEvent) -> pb.ConnectionEvent:
    """The wire form of a finished connection's event."""
    message = pb.ConnectionEvent()
    fill_event(message, event)
    return message


def fill_event(message: pb.ConnectionEvent, event: ConnectionEvent) -> None:
    """Write `event` into an empty message, e.g. one just added to a batch: building it
    in place saves a copy and two Timestamp objects per event (6.6 -> 4.3 µs); the times
    inline, each sub-message fetched once and addresses cached save 0.65 µs more (3.5 µs,
    500 events in a row, with serialization)."""
    message.event_id = event.event_id.bytes
    message.node_id = event.node_id
    micros = (event.started_at - _EPOCH) // _MICROSECOND  # exact, also before 1970
    time = message.started_at
    time.seconds, time.nanos = micros // 1_000_000, micros % 1_000_000 * 1000
    micros = (event.ended_at - _EPOCH) // _MICROSECOND
    time = message.ended_at
    time.seconds, time.nanos = micros // 1_000_000, micros % 1_000_000 * 1000
    message.source_ip = _cached_ip_bytes(event.source_ip)
    message.source_port = event.source_port
    message.user = event.user
    message.command = _COMMANDS[event.command]
    message.protocol = _PROTOCOLS[event.protocol]
    message.dest_ip = _cached_ip_bytes(event.dest_ip)
    message.status = _STATUSES[event.status]
    message.close_reason = _CLOSE_REASONS[event.close_reason]
    message.duration_ms = event.duration_ms
    message.bytes_out = event.bytes_out
    message.bytes_in = event.bytes_in
    if event.dest_host is not None:
        message.dest_host = event.dest_host
    if event.domain is not None:
        message.domain = event.domain
    if event.dest_port is not None:
        message.dest_port = event.dest_port
    if event.reply_code is not None:
        message.reply_code = event.reply_code
    if event.connect_ms is not None:
        message.connect_ms = event.connect_ms
    if event.ttfb_ms is not None:
        message.ttfb_ms = event.ttfb_ms
    if event.trace_id:
        message.trace_id = bytes.fromhex(event.trace_id)
    if event.span_id:
        message.span_id = bytes.fromhex(event.span_id)


def interim_to_proto(sample: InterimSample) -> pb.InterimReport:
    """The wire form of an open connection's cumulative byte counts."""
    message = pb.InterimReport(
        event_id=sample.event_id.bytes,
        started_at=timestamp(sample.started_at),
        reported_at=timestamp(sample.reported_at),
        source_ip=ip_bytes(sample.source_ip),
        user=sample.user,
        bytes_out=sample.bytes_out,
        bytes_in=sample.bytes_in,
    )
    if sample.domain is not None:
        message.domain = sample.domain
    return message
