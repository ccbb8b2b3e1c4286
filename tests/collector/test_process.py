"""The collector as a real process: kill -9 in the middle of a load, SIGTERM's orderly stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from dbtools import counted_connections
from ingest_client import batch, make_event, open_session

from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]


class CollectorProcess:
    """`python -m collector` on port 0; the address is read back from its log."""

    def __init__(self, process: asyncio.subprocess.Process, port: int,
                 metrics: str | None = None) -> None:
        self.process = process
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.metrics = metrics  # host:port of its Prometheus endpoint

    async def scrape(self) -> str:
        """Its /metrics text."""
        assert self.metrics is not None
        url = f"http://{self.metrics}/metrics"
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10)
                                       .read().decode())


Spawn = Callable[[], Any]


@pytest.fixture
async def spawn(database_url: str, tmp_path: Path) -> AsyncIterator[Spawn]:
    processes: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []

    async def start() -> CollectorProcess:
        env = {**os.environ, "S5A_DATABASE__URL": database_url,
               "S5A_COLLECTOR__LISTEN": "127.0.0.1:0", "S5A_LOG__FORMAT": "json",
               "S5A_COLLECTOR__METRICS_LISTEN": "127.0.0.1:0",
               "S5A_COLLECTOR__SHUTDOWN_GRACE": "5", "PYTHONPATH": str(ROOT)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "collector", cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        assert process.stderr is not None
        while line := await asyncio.wait_for(process.stderr.readline(), 30):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # gRPC core's own lines
            if record.get("message") == "collector listening":
                port = int(record["address"].rsplit(":", 1)[1])
                drains.append(asyncio.create_task(_drain(process.stderr)))
                return CollectorProcess(process, port, record.get("metrics"))
        raise AssertionError(f"the collector exited: {await process.wait()}")

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await asyncio.gather(*drains, return_exceptions=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def _batches(count: int, size: int) -> list[list[pb.ConnectionEvent]]:
    return [[make_event(source_port=n) for n in range(size)] for _ in range(count)]


async def test_kill_9_mid_load_then_resend_makes_no_duplicates(
    spawn: Spawn, db: asyncpg.Connection
) -> None:
    batches = _batches(20, 200)
    acked: set[int] = set()
    first = await spawn()
    async with grpc.aio.insecure_channel(first.target) as channel:
        session = await open_session(channel)
        for number, events in enumerate(batches, start=1):
            await session.send(batch(number, events))
        acked.add((await session.recv()).ack.sequence)  # the load is flowing
        first.process.kill()  # SIGKILL: no flush, no goodbye, writes cut mid-transaction
        await first.process.wait()
        while True:
            try:
                response = await session.call.read()
            except grpc.aio.AioRpcError:
                break
            if response is grpc.aio.EOF:
                break
            acked.add(response.ack.sequence)
    unacked = [events for number, events in enumerate(batches, start=1) if number not in acked]
    assert unacked, "everything was acked before the kill; the test proves nothing"

    second = await spawn()
    async with grpc.aio.insecure_channel(second.target) as channel:
        session = await open_session(channel)  # a new stream: sequences start again at 1
        for number, events in enumerate(unacked, start=1):
            await session.send(batch(number, events))
        responses = [await session.recv() for _ in unacked]
        assert await session.finish() == grpc.StatusCode.OK
    assert [r.ack.sequence for r in responses] == list(range(1, len(unacked) + 1))
    assert sum(r.ack.inserted + r.ack.duplicates for r in responses) == 200 * len(unacked)
    total = 200 * len(batches)
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == total
    assert await db.fetchval("SELECT count(DISTINCT event_id) FROM traffic_logs") == total
    assert await counted_connections(db) == total
    second.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(second.process.wait(), 30) == 0


async def test_sigterm_acks_what_it_took_and_exits_cleanly(
    spawn: Spawn, db: asyncpg.Connection
) -> None:
    collector = await spawn()
    batches = _batches(10, 100)
    acked: dict[int, int] = {}
    async with grpc.aio.insecure_channel(collector.target) as channel:
        session = await open_session(channel)
        for number, events in enumerate(batches, start=1):
            await session.send(batch(number, events))
        first = await session.recv()
        acked[first.ack.sequence] = first.ack.inserted
        collector.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (response := await session.call.read()) is not grpc.aio.EOF:
                acked[response.ack.sequence] = response.ack.inserted
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.wait_for(collector.process.wait(), 30) == 0
    # Acks came in order, each for a committed batch; the rest the node still has.
    assert sorted(acked) == list(range(1, len(acked) + 1))
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") >= 100 * len(acked)


async def test_a_running_collector_keeps_the_partitions(
    spawn: Spawn, db: asyncpg.Connection
) -> None:
    """Its maintenance pass runs at start (then every `database.maintenance_interval`): the
    days ahead get their partitions, and a day older than the retention is dropped."""
    today = datetime.now(UTC).date()
    expired = today - timedelta(days=40)  # the default retention keeps 30 days
    await db.execute("SELECT s5a_create_day_partitions($1::date, $1::date)", expired)
    old = f"traffic_logs_p{expired:%Y%m%d}"
    ahead = f"traffic_logs_p{today + timedelta(days=3):%Y%m%d}"
    assert await db.fetchval("SELECT to_regclass($1)", old) is not None
    assert await db.fetchval("SELECT to_regclass($1)", ahead) is None
    collector = await spawn()
    async with asyncio.timeout(30):
        while (await db.fetchval("SELECT to_regclass($1)", ahead) is None
               or await db.fetchval("SELECT to_regclass($1)", old) is not None):
            await asyncio.sleep(0.05)  # polling the pass's effect, with the deadline above
    metrics = await collector.scrape()
    assert 's5a_collector_maintenance_passes_total{result="ok"} 1.0' in metrics
    dropped = re.search(r'^s5a_collector_partitions_total\{action="dropped"\} (\S+)$', metrics,
                        re.MULTILINE)
    assert dropped is not None and float(dropped[1]) >= 1
    last_ok = re.search(r"^s5a_collector_maintenance_last_ok_timestamp_seconds (\S+)$",
                        metrics, re.MULTILINE)
    assert last_ok is not None and abs(float(last_ok[1]) - time.time()) < 60
    collector.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(collector.process.wait(), 30) == 0
