"""Small helpers for tests that use the session's PostgreSQL (tests/conftest.py): making
databases, and a valid stored event to vary.

A module of its own (not conftest) so that test modules can import it by a unique name.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from ipaddress import ip_address
from typing import Any, TypeVar

import asyncpg

from socks5_analytics.storage import StoredEvent
from socks5_analytics.storage.embedded import EmbeddedPostgres

T = TypeVar("T")


def run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a loop of its own (for sync, wide-scoped fixtures)."""

    async def runner() -> T:
        return await make()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()


async def admin_sql(server: EmbeddedPostgres, sql: str) -> None:
    """Run one statement as the server's superuser (CREATE/DROP DATABASE)."""
    connection = await asyncpg.connect(server.dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def stored_event(started_at: datetime, **changes: Any) -> StoredEvent:
    """A valid event: a 30 s HTTPS connection of alice's, with `changes` applied."""
    fields: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "node_id": "node-a",
        "started_at": started_at,
        "ended_at": started_at + timedelta(seconds=30),
        "source_ip": ip_address("192.0.2.10"),
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


async def counted_connections(db: Any) -> int:
    """Connections the totals count: rolled forward into the minute tier, or still queued
    (a batch's rollups are rolled forward after its commit, in the background)."""
    return int(await db.fetchval(
        "SELECT (SELECT coalesce(sum(connections), 0) FROM rollup_totals) + "
        "(SELECT count(*) FROM rollup_queue WHERE node_id IS NOT NULL AND connections > 0)"))
