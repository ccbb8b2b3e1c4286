"""fill_event against an independent reference, over generated events: the same bytes on the
wire whatever the fields (addresses repeat, so the address cache is exercised too)."""

from __future__ import annotations

import calendar
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_node import convert
from proxy_node.convert import fill_event
from proxy_node.events import CLOSE_REASONS, STATUSES, ConnectionEvent
from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest

_ADDRESSES = ["192.0.2.7", "10.0.0.1", "2001:db8::7", "::1", "198.51.100.255", "fe80::1"]
_times = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_optional_ms = st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False)


@st.composite
def events(draw: st.DrawFn) -> ConnectionEvent:
    started = draw(_times)
    return ConnectionEvent(
        uuid.UUID(int=draw(st.integers(0, 2**128 - 1))),
        draw(st.text(max_size=20)),
        started,
        started + timedelta(microseconds=draw(st.integers(0, 10**12))),
        draw(st.sampled_from(_ADDRESSES)),
        draw(st.integers(0, 65535)),
        draw(st.text(max_size=10)),
        draw(st.sampled_from(["connect", "bind", "udp_associate"])),
        draw(st.sampled_from(["tcp", "udp"])),
        draw(st.none() | st.text(max_size=30)),
        draw(st.none() | st.text(max_size=30)),
        draw(st.none() | st.sampled_from(_ADDRESSES)),
        draw(st.none() | st.integers(0, 65535)),
        None,
        draw(st.sampled_from(sorted(STATUSES))),
        draw(st.none() | st.integers(0, 255)),
        draw(st.sampled_from(sorted(CLOSE_REASONS))),
        draw(_optional_ms),
        draw(_optional_ms),
        draw(st.floats(min_value=0, max_value=1e9, allow_nan=False)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.none() | st.binary(min_size=16, max_size=16).map(bytes.hex)),
        draw(st.none() | st.binary(min_size=8, max_size=8).map(bytes.hex)),
    )


def _timestamp(moment: datetime) -> dict[str, int]:
    return {"seconds": calendar.timegm(moment.utctimetuple()), "nanos": moment.microsecond * 1000}


def _reference(event: ConnectionEvent) -> pb.ConnectionEvent:
    """Built another way: keyword construction, calendar.timegm, ipaddress packing."""
    import ipaddress

    def packed(address: str | None) -> bytes:
        return ipaddress.ip_address(address).packed if address else b""

    fields = {
        "event_id": event.event_id.bytes,
        "node_id": event.node_id,
        "started_at": _timestamp(event.started_at),
        "ended_at": _timestamp(event.ended_at),
        "source_ip": packed(event.source_ip),
        "source_port": event.source_port,
        "user": event.user,
        "command": pb.Command.Value("COMMAND_" + event.command.upper()),
        "protocol": pb.Protocol.Value("PROTOCOL_" + event.protocol.upper()),
        "dest_ip": packed(event.dest_ip),
        "status": pb.Status.Value("STATUS_" + event.status.upper()),
        "close_reason": pb.CloseReason.Value("CLOSE_REASON_" + event.close_reason.upper()),
        "duration_ms": event.duration_ms,
        "bytes_out": event.bytes_out,
        "bytes_in": event.bytes_in,
        "trace_id": bytes.fromhex(event.trace_id) if event.trace_id else b"",
        "span_id": bytes.fromhex(event.span_id) if event.span_id else b"",
    }
    for name in ("dest_host", "domain", "dest_port", "reply_code", "connect_ms", "ttfb_ms"):
        if getattr(event, name) is not None:
            fields[name] = getattr(event, name)
    return pb.ConnectionEvent(**fields)


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), min_size=1, max_size=8))
def test_a_filled_batch_is_byte_for_byte_the_reference(batch_events: list[ConnectionEvent]) -> None:
    batch = ingest.Batch()
    for event in batch_events:
        fill_event(batch.events.add(), event)
    reference = ingest.Batch(events=[_reference(event) for event in batch_events])
    assert batch.SerializeToString() == reference.SerializeToString()


def test_the_address_cache_stays_bounded() -> None:
    convert._cached_ip_bytes.cache_clear()
    for n in range(convert._IP_CACHE_MAX + 10):
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        expected = bytes([10, n >> 16 & 255, n >> 8 & 255, n & 255])
        assert convert._cached_ip_bytes(address) == expected
    assert convert._cached_ip_bytes.cache_info().currsize <= convert._IP_CACHE_MAX
    assert convert._cached_ip_bytes(None) == b"" and convert._cached_ip_bytes("") == b""
