"""Test data for the storage tests: valid events and interim reports, changed at will."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, ip_address
from typing import Any

from socks5_analytics.storage import InterimReport, StoredEvent

NOW = datetime(2026, 3, 10, 12, 30, 15, tzinfo=UTC)


def make_event(**changes: Any) -> StoredEvent:
    """A valid event (a 30 s HTTPS connection that ended at NOW), with `changes` applied."""
    started = changes.pop("started_at", NOW - timedelta(seconds=30))
    fields: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "node_id": "node-a",
        "started_at": started,
        "ended_at": started + timedelta(seconds=30),
        "source_ip": IPv4Address("192.0.2.10"),
        "source_port": 50_000,
        "user_name": "alice",
        "command": "connect",
        "protocol": "tcp",
        "dest_host": "www.example.com",
        "domain": "www.example.com",
        "dest_ip": ip_address("198.51.100.7"),
        "dest_port": 443,
        "registered_domain": "example.com",
        "status": "ok",
        "reply_code": 0,
        "close_reason": "client",
        "connect_ms": 12.5,
        "ttfb_ms": 30.0,
        "duration_ms": 30_000.0,
        "bytes_out": 1_000,
        "bytes_in": 50_000,
        "trace_id": None,
    }
    fields.update(changes)
    return StoredEvent(**fields)


def make_interim(event: StoredEvent, *, at: datetime, bytes_in: int,
                 bytes_out: int = 0) -> InterimReport:
    """An interim report of `event`'s connection with cumulative counts at `at`."""
    return InterimReport(
        event_id=event.event_id, node_id=event.node_id, started_at=event.started_at,
        reported_at=at, source_ip=event.source_ip, user_name=event.user_name,
        domain=event.domain, registered_domain=event.registered_domain,
        bytes_out=bytes_out, bytes_in=bytes_in,
    )
