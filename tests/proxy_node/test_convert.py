"""Proxy events in their traffic.v1 wire form: every field, optional ones absent when None."""

from __future__ import annotations

import ipaddress
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from proxy_node.convert import event_to_proto, fill_event
from proxy_node.events import ConnectionEvent
from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest

STARTED = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
BEFORE_EPOCH = datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def _event(**changes: object) -> ConnectionEvent:
    event = ConnectionEvent(
        uuid.UUID("0192f3a8-7b1c-7def-8abc-0123456789ab"), "node-a", STARTED,
        STARTED + timedelta(microseconds=2_500_001), "2001:db8::7", 40000, "alice", "connect",
        "tcp", "example.com", "example.com", "93.184.216.34", 443, None, "ok", 0, "client",
        1.25, 3.5, 2500.001, 1234, 56789, "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    return event._replace(**changes)


CASES = {
    "every field": _event(),
    "failed, nothing optional": _event(dest_host=None, domain=None, dest_ip=None,
                                       dest_port=None, reply_code=None, connect_ms=None,
                                       ttfb_ms=None, trace_id=None, span_id=None,
                                       status="dns_failed", close_reason="error"),
    "udp association": _event(command="udp_associate", protocol="udp", source_ip="10.1.2.3"),
    "before the epoch": _event(started_at=BEFORE_EPOCH, ended_at=BEFORE_EPOCH),
}


def _micros(timestamp: object) -> int:
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1000  # type: ignore[attr-defined]


@pytest.mark.parametrize("event", CASES.values(), ids=CASES.keys())
def test_every_field(event: ConnectionEvent) -> None:
    message = event_to_proto(event)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert message.event_id == event.event_id.bytes
    assert message.node_id == event.node_id and message.user == event.user
    assert _micros(message.started_at) == (event.started_at - epoch) // timedelta(microseconds=1)
    assert _micros(message.ended_at) == (event.ended_at - epoch) // timedelta(microseconds=1)
    assert 0 <= message.started_at.nanos < 10**9 and message.started_at.nanos % 1000 == 0
    assert ipaddress.ip_address(message.source_ip) == ipaddress.ip_address(event.source_ip)
    assert message.source_port == event.source_port
    assert pb.Command.Name(message.command) == "COMMAND_" + event.command.upper()
    assert pb.Protocol.Name(message.protocol) == "PROTOCOL_" + event.protocol.upper()
    assert pb.Status.Name(message.status) == "STATUS_" + event.status.upper()
    assert pb.CloseReason.Name(message.close_reason) == "CLOSE_REASON_" + event.close_reason.upper()
    assert (message.duration_ms, message.bytes_out, message.bytes_in) == (
        event.duration_ms, event.bytes_out, event.bytes_in)
    optional = {"dest_host": event.dest_host, "domain": event.domain,
                "dest_port": event.dest_port, "reply_code": event.reply_code,
                "connect_ms": event.connect_ms, "ttfb_ms": event.ttfb_ms}
    for name, value in optional.items():
        assert message.HasField(name) == (value is not None), name
        if value is not None:
            assert getattr(message, name) == value
    assert message.dest_ip == (ipaddress.ip_address(event.dest_ip).packed if event.dest_ip
                               else b"")
    assert message.trace_id == (bytes.fromhex(event.trace_id) if event.trace_id else b"")
    assert message.span_id == (bytes.fromhex(event.span_id) if event.span_id else b"")


def test_filled_in_a_batch_serializes_like_a_standalone_message() -> None:
    batch = ingest.Batch()
    for event in CASES.values():
        fill_event(batch.events.add(), event)
    assert [m.SerializeToString() for m in batch.events] == [
        event_to_proto(event).SerializeToString() for event in CASES.values()]
