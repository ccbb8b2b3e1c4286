"""Test data for the storage tests: valid events and interim reports, changed at will."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from dbtools import stored_event

from socks5_analytics.storage import InterimReport, StoredEvent

NOW = datetime(2026, 3, 10, 12, 30, 15, tzinfo=UTC)


def make_event(**changes: Any) -> StoredEvent:
    """A valid event (a 30 s HTTPS connection that ended at NOW), with `changes` applied."""
    return stored_event(changes.pop("started_at", NOW - timedelta(seconds=30)), **changes)


def make_interim(event: StoredEvent, *, at: datetime, bytes_in: int,
                 bytes_out: int = 0) -> InterimReport:
    """An interim report of `event`'s connection with cumulative counts at `at`."""
    return InterimReport(
        event_id=event.event_id, node_id=event.node_id, started_at=event.started_at,
        reported_at=at, source_ip=event.source_ip, user_name=event.user_name,
        domain=event.domain, registered_domain=event.registered_domain,
        bytes_out=bytes_out, bytes_in=bytes_in,
    )
