"""The ingest stream over a real grpc.aio channel into a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from dbtools import counted_connections
from ingest_client import (
    StartCollector,
    batch,
    eventually,
    heartbeat,
    hello,
    make_event,
    make_interim,
    open_session,
    raw_stream,
)

from collector.server import CollectorServer
from collector.servicer import reason_limit, shorten
from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest
from socks5_analytics.stubs.traffic.v1.ingest_pb2_grpc import IngestServiceStub


async def _count(db: asyncpg.Connection, ids: list[bytes]) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM traffic_logs WHERE event_id = ANY($1::uuid[])",
        [uuid.UUID(bytes=raw) for raw in ids],
    )
    return count


async def test_ack_comes_after_the_commit(channel: grpc.aio.Channel,
                                          db: asyncpg.Connection) -> None:
    session = await open_session(channel)
    events = [make_event() for _ in range(50)]
    response = await session.deliver(1, events, [make_interim()])
    assert response.WhichOneof("kind") == "ack"
    assert (response.ack.sequence, response.ack.inserted, response.ack.duplicates) == (1, 50, 0)
    # The ack means committed: another connection sees every row at once.
    assert await _count(db, [e.event_id for e in events]) == 50
    row = await db.fetchrow("SELECT * FROM traffic_logs WHERE event_id = $1",
                            uuid.UUID(bytes=events[0].event_id))
    assert (row["domain"], row["registered_domain"], str(row["source_ip"])) == (
        "www.example.co.uk", "example.co.uk", "10.0.0.7")
    assert await session.finish() == grpc.StatusCode.OK


async def test_resent_batch_is_acked_as_duplicates(channel: grpc.aio.Channel,
                                                   db: asyncpg.Connection) -> None:
    events = [make_event() for _ in range(20)]
    first = await open_session(channel)
    assert (await first.deliver(1, events)).ack.inserted == 20
    await first.finish()
    # A reconnect after a lost ack: the same events again, on a new stream, from sequence 1.
    again = await open_session(channel)
    response = await again.deliver(1, [*events[:10], make_event()])
    assert (response.ack.inserted, response.ack.duplicates) == (1, 10)
    assert await _count(db, [e.event_id for e in events]) == 20
    totals = await counted_connections(db)
    assert totals == 21  # the duplicates added nothing to the rollups either
    await again.finish()


async def test_rejection_lists_the_invalid_and_stores_the_rest(
    channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    good = [make_event(), make_event()]
    bad_ip = make_event(source_ip=b"\x01\x02\x03")
    bad_status = make_event(status=pb.STATUS_UNSPECIFIED)
    session = await open_session(channel)
    response = await session.deliver(
        1, [good[0], bad_ip, good[1], bad_status],
        [make_interim(), make_interim(event_id=b"")],
    )
    assert response.WhichOneof("kind") == "rejection"
    rejection = response.rejection
    assert (rejection.sequence, rejection.inserted, rejection.duplicates) == (1, 2, 0)
    assert [(i.index, i.interim, i.event_id, i.reason) for i in rejection.invalid] == [
        (1, False, bad_ip.event_id, "source_ip: 3 bytes, expected 4 or 16"),
        (3, False, bad_status.event_id, "status: unspecified"),
        (1, True, b"", "event_id: 0 bytes, expected 16"),
    ]
    assert await _count(db, [e.event_id for e in good]) == 2
    # The stream goes on after a rejection.
    assert (await session.deliver(2, [make_event()])).ack.inserted == 1
    await session.finish()


def _bad_in_every_way() -> pb.ConnectionEvent:
    """An event of 150 bytes whose reason runs to 418: 13 fields wrong."""
    return make_event(started_at=None, source_ip=b"\x01\x02\x03", source_port=99_999,
                      command=pb.COMMAND_UNSPECIFIED, protocol=pb.PROTOCOL_UNSPECIFIED,
                      dest_ip=b"\x01", dest_port=99_999, status=pb.STATUS_UNSPECIFIED,
                      reply_code=99_999, close_reason=pb.CLOSE_REASON_UNSPECIFIED,
                      connect_ms=-1.0, ttfb_ms=-1.0, duration_ms=float("nan"))


async def test_a_batch_of_invalid_items_is_answered_within_the_nodes_limit(
    channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    """10,000 items (the limit), all but 10 invalid in many ways: the Rejection still fits in
    the 4 MiB a node's channel takes, lists every invalid item, and the good ones are stored
    once."""
    good = [make_event() for _ in range(10)]
    bad = [_bad_in_every_way() for _ in range(9_990)]
    session = await open_session(channel)
    response = await session.deliver(1, [*good, *bad])
    assert response.WhichOneof("kind") == "rejection"
    rejection = response.rejection
    assert rejection.ByteSize() < 4 * 1024 * 1024
    assert (rejection.inserted, rejection.duplicates) == (10, 0)
    assert [item.index for item in rejection.invalid] == list(range(10, 10_000))
    reasons = [item.reason for item in rejection.invalid]
    assert all(reason.endswith("…") for reason in reasons)  # shortened, as they must be here
    assert all(reason.startswith("started_at: missing; source_ip: 3 bytes") for reason in reasons)
    assert await _count(db, [e.event_id for e in good]) == 10
    assert (await session.deliver(2, [make_event()])).ack.inserted == 1
    await session.finish()


async def test_heartbeats_reach_proxy_nodes(channel: grpc.aio.Channel,
                                            collector: CollectorServer,
                                            db: asyncpg.Connection) -> None:
    session = await open_session(channel, "node-hb")
    await session.send(heartbeat(7, "p2"))
    assert (await session.deliver(1, [make_event()])).ack.sequence == 1
    # Heartbeats are written every nodes_flush_interval (0.1 s here).
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM proxy_nodes WHERE node_id = 'node-hb' AND active_connections = 7"))
    assert (row["active_connections"], row["policy_version"], row["version"]) == (7, "p2", "test")
    await session.finish()


async def _status(call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


async def test_garbage_bytes_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    call = raw_stream(channel)
    await call.write(hello().SerializeToString())
    await call.write(b"\xff\xff\xff\xff garbage")  # valid gRPC framing, not a protobuf
    code, details = await _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an IngestRequest" in details


async def test_message_without_kind_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    call = raw_stream(channel)
    await call.write(b"")  # an IngestRequest with nothing set
    assert (await _status(call))[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_node_id_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    call = IngestServiceStub(channel).Stream()
    await call.write(hello(""))
    assert (await _status(call))[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_before_hello_is_failed_precondition(channel: grpc.aio.Channel) -> None:
    call = IngestServiceStub(channel).Stream()
    await call.write(batch(1, [make_event()]))
    code, details = await _status(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == "the first message must be a Hello, got a batch"


async def test_second_hello_is_failed_precondition(channel: grpc.aio.Channel) -> None:
    session = await open_session(channel)
    await session.send(hello())
    assert (await _status(session.call))[0] == grpc.StatusCode.FAILED_PRECONDITION


async def test_wrong_sequence_is_out_of_range(channel: grpc.aio.Channel) -> None:
    session = await open_session(channel)
    assert (await session.deliver(1, [make_event()])).ack.sequence == 1
    await session.send(batch(3, [make_event()]))
    code, details = await _status(session.call)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert details == "batch sequence 3, expected 2"


async def test_oversized_message_is_resource_exhausted(start_collector: StartCollector) -> None:
    server = await start_collector(max_message_bytes=64 * 1024)
    assert server.address is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.address[1]}") as channel:
        session = await open_session(channel)
        huge = [make_event(user="u" * 200) for _ in range(400)]  # about 120 kB
        await session.send(batch(1, huge))
        assert (await _status(session.call))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The collector is still there for the next stream.
        again = await open_session(channel)
        assert (await again.deliver(1, [make_event()])).ack.inserted == 1
        await again.finish()


async def test_too_many_items_is_resource_exhausted(start_collector: StartCollector) -> None:
    server = await start_collector(max_batch_items=10)
    assert server.address is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.address[1]}") as channel:
        session = await open_session(channel)
        await session.send(batch(1, [make_event() for _ in range(11)]))
        code, details = await _status(session.call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "batch 1 has 11 items, at most 10"


async def test_no_hello_in_time_is_deadline_exceeded(start_collector: StartCollector) -> None:
    server = await start_collector(hello_timeout=0.2)
    assert server.address is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.address[1]}") as channel:
        silent = IngestServiceStub(channel).Stream()
        code, details = await _status(silent)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert details == "no Hello within 0.2 s"


async def test_bad_streams_do_not_disturb_the_others(channel: grpc.aio.Channel,
                                                     db: asyncpg.Connection) -> None:
    good = await open_session(channel, "good")
    sent: list[bytes] = []
    bad_calls = []
    for sequence in range(1, 11):
        garbage = raw_stream(channel)
        await garbage.write(hello("bad").SerializeToString())
        await garbage.write(b"\x0a\xff")  # a truncated field
        bad_calls.append(garbage)
        events = [make_event() for _ in range(10)]
        sent.extend(e.event_id for e in events)
        assert (await good.deliver(sequence, events)).ack.inserted == 10
    codes = await asyncio.gather(*(call.code() for call in bad_calls))
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert await good.finish() == grpc.StatusCode.OK
    assert await _count(db, sent) == 100


async def test_many_streams_share_one_write(collector: CollectorServer,
                                            channel: grpc.aio.Channel,
                                            db: asyncpg.Connection) -> None:
    sessions = [await open_session(channel, f"node-{n}") for n in range(8)]
    batches = [[make_event(node_id=f"node-{n}") for _ in range(25)] for n in range(8)]
    writes_before = collector.publisher.writes
    for session, events in zip(sessions, batches, strict=True):
        await session.send(batch(1, events))
    responses = await asyncio.gather(*(s.recv() for s in sessions))
    assert [r.ack.inserted for r in responses] == [25] * 8
    assert collector.publisher.writes - writes_before < 8  # gathered, not one write each
    assert await db.fetchval("SELECT count(DISTINCT node_id) FROM traffic_logs") == 8
    for session in sessions:
        await session.finish()


async def test_two_collectors_on_one_database(start_collector: StartCollector,
                                              db: asyncpg.Connection) -> None:
    first, second = await start_collector(), await start_collector()
    events = [make_event() for _ in range(100)]
    results = []
    for server in (first, second):
        assert server.address is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.address[1]}") as channel:
            session = await open_session(channel)
            # Both get the whole batch (a failover resend), concurrently with each other.
            results.append(asyncio.ensure_future(session.deliver(1, events)))
            await asyncio.wait_for(asyncio.shield(results[-1]), 30)
            await session.finish()
    acks = [r.result().ack for r in results]
    assert sum(a.inserted for a in acks) == 100
    assert sum(a.duplicates for a in acks) == 100
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 100
    assert await counted_connections(db) == 100


async def test_stop_answers_what_it_took_then_unavailable(
    collector: CollectorServer, channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    session = await open_session(channel)
    events = [make_event() for _ in range(30)]
    await session.send(batch(1, events))
    response = await session.recv()
    assert response.ack.inserted == 30
    collector.servicer.begin_stop()
    code = await session.call.code()
    assert code == grpc.StatusCode.UNAVAILABLE
    # While it stops, a new stream is refused at once, so the node fails over.
    call = IngestServiceStub(channel).Stream()
    await call.write(hello())
    assert (await _status(call)) == (grpc.StatusCode.UNAVAILABLE, "the collector is stopping")
    await collector.stop(2.0)


def test_ingest_response_kinds_are_the_contract() -> None:
    assert [f.name for f in ingest.IngestResponse.DESCRIPTOR.oneofs_by_name["kind"].fields] == [
        "ack", "rejection"]


pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("items", "budget", "limit"), [
    (0, 4_000_000, 1024),          # nothing to shorten
    (1, 4_000_000, 1024),          # at most 1 KiB however much room
    (10_000, 4_000_000, 360),      # 400 bytes an item, less the item's own fields
    (60_000, 4_000_000, 26),
    (1_000_000, 4_000_000, 24),    # never under 24 bytes: the field comes first
])
def test_reason_limit(items: int, budget: int, limit: int) -> None:
    assert reason_limit(items, budget) == limit


@pytest.mark.parametrize(("reason", "limit", "shortened"), [
    ("status: unspecified", 100, "status: unspecified"),
    ("status: unspecified", 19, "status: unspecified"),
    ("status: unspecified", 10, "status:…"),
    ("user: 'é' " * 3, 12, "user: 'é…"),
    ("user: 'é' " * 3, 11, "user: '…"),  # never half of a UTF-8 character
])
def test_shorten(reason: str, limit: int, shortened: str) -> None:
    assert shorten(reason, limit) == shortened
    assert len(shorten(reason, limit).encode()) <= limit
