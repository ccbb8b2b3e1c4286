"""Two collectors on one database; the one a node streams to stops mid-load: the node fails
over to the other and every event is stored exactly once."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from ingest_client import StartCollector

from proxy_node.events import ConnectionEvent, ConnectionRecord
from proxy_node.exporter import GrpcExporter, NodeIdentity
from socks5_analytics.config import EventSinkSettings
from socks5_analytics.logs import get_logger

TOTAL = 3000


def _event(index: int) -> ConnectionEvent:
    record = ConnectionRecord("192.0.2.50", 10000 + index % 50000, time.monotonic())
    record.status, record.reply_code = "ok", 0
    record.dest_host = record.domain = f"site{index % 17}.example"
    record.dest_ip, record.dest_port = "198.51.100.9", 443
    record.bytes_out, record.bytes_in = index, 2 * index
    return record.finish(node_id="failover-node", now_mono=time.monotonic())


async def _stored(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM traffic_logs WHERE node_id = 'failover-node'")
    return count


async def test_node_fails_over_and_nothing_is_lost_or_doubled(
    start_collector: StartCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    first = await start_collector()
    second = await start_collector()
    settings = EventSinkSettings(
        sink="grpc",
        collectors=[("127.0.0.1", first.address[1]), ("127.0.0.1", second.address[1])],
        spool_dir=tmp_path / "spool", flush_interval=0.02, batch_max_events=100,
        backoff_initial=0.02, backoff_max=0.2, drain_timeout=5.0,
    )
    exporter = GrpcExporter(
        settings, identity=NodeIdentity("failover-node", "0.1.0", b"\x03" * 16,
                                        datetime.now(UTC)),
        status=lambda: (0, "p"), log=get_logger("test"),
    )
    await exporter.start()
    try:
        for index in range(TOTAL // 2):
            exporter.emit(_event(index))
        deadline = time.monotonic() + 20
        while await _stored(db) == 0:  # the first half is flowing to the first collector
            assert time.monotonic() < deadline, "nothing stored"
            await asyncio.sleep(0.02)
        await first.stop(0.0)  # abrupt: unanswered batches must be resent elsewhere
        for index in range(TOTAL // 2, TOTAL):
            exporter.emit(_event(index))
        deadline = time.monotonic() + 30
        while await _stored(db) < TOTAL:
            assert time.monotonic() < deadline, f"only {await _stored(db)} of {TOTAL} stored"
            await asyncio.sleep(0.05)
    finally:
        await exporter.close()
    assert await _stored(db) == TOTAL
    distinct = await db.fetchval(
        "SELECT count(DISTINCT event_id) FROM traffic_logs WHERE node_id = 'failover-node'")
    assert distinct == TOTAL
    total_out = await db.fetchval(
        "SELECT sum(bytes_out) FROM traffic_logs WHERE node_id = 'failover-node'")
    assert total_out == sum(range(TOTAL))
    assert exporter.dropped == 0
