"""A database outage: acks are held (never faked), reading stops, everything lands after."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from ingest_client import StartCollector, batch, eventually, make_event, open_session
from tcp_cutter import TcpCutter

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def cutter(database_url: str) -> AsyncIterator[TcpCutter]:
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    forwarder = TcpCutter(parts.hostname, parts.port)
    await forwarder.start()
    yield forwarder
    await forwarder.close()


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()


async def test_acks_wait_for_the_database(start_collector: StartCollector, cutter: TcpCutter,
                                          database_url: str, db: asyncpg.Connection) -> None:
    server = await start_collector(url=_through(database_url, cutter.port))
    assert server.address is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.address[1]}") as channel:
        session = await open_session(channel)
        assert (await session.deliver(1, [make_event()])).ack.inserted == 1
        cutter.cut()
        held = [make_event() for _ in range(40)]
        await session.send(batch(2, held[:20]))
        await session.send(batch(3, held[20:]))
        answer = asyncio.ensure_future(session.recv())
        await eventually(lambda: asyncio.sleep(0, server.publisher.database_down))
        assert not answer.done()  # no ack while nothing could be committed
        cutter.restore()
        first = await answer
        second = await session.recv()
        assert [(r.ack.sequence, r.ack.inserted) for r in (first, second)] == [(2, 20), (3, 20)]
        assert not server.publisher.database_down
        stored = await db.fetchval(
            "SELECT count(*) FROM traffic_logs WHERE event_id = ANY($1::uuid[])",
            [uuid.UUID(bytes=e.event_id) for e in held])
        assert stored == 40
        assert await session.finish() == grpc.StatusCode.OK


async def test_a_full_queue_stops_reading(start_collector: StartCollector, cutter: TcpCutter,
                                          database_url: str, db: asyncpg.Connection) -> None:
    server = await start_collector(url=_through(database_url, cutter.port),
                                   queue_max_events=200, stream_max_pending=4)
    assert server.address is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.address[1]}") as channel:
        session = await open_session(channel)
        cutter.cut()
        sent = 0
        blocked: asyncio.Future[None] | None = None
        for sequence in range(1, 2001):  # bounded: 2000 batches of ~16 kB
            events = [make_event(user="u" * 200) for _ in range(50)]
            write = asyncio.ensure_future(session.send(batch(sequence, events)))
            done, _ = await asyncio.wait({write}, timeout=1.0)
            sent = sequence
            if not done:
                blocked = write  # gRPC flow control: the collector stopped reading
                break
        assert blocked is not None, "the client could write 2000 batches into a dead database"
        assert server.publisher.held_rows <= 200
        cutter.restore()
        await blocked
        acked = [(await session.recv()).ack for _ in range(sent)]
        assert [a.sequence for a in acked] == list(range(1, sent + 1))
        assert sum(a.inserted for a in acked) == 50 * sent
        assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 50 * sent
        assert await session.finish() == grpc.StatusCode.OK
