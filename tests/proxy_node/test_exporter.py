"""The gRPC exporter against a real grpc.aio server that plays the collector.

The fake collector records what it commits and can withhold answers, break streams or be
stopped, so delivery, resending, spooling and replay are observable from outside.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from proxy_node.events import ConnectionEvent, ConnectionRecord
from proxy_node.exporter import (
    GrpcExporter,
    NodeIdentity,
    encode_batch_request,
    segment_bytes_for,
)
from proxy_node.spool import Spool
from socks5_analytics.config import EventSinkSettings
from socks5_analytics.logs import get_logger
from socks5_analytics.stubs.traffic.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc


class FakeCollector(ingest_pb2_grpc.IngestServiceServicer):
    """Commits batches in memory, acking each after 'commit' unless told to hold."""

    def __init__(self) -> None:
        self.committed: dict[bytes, event_pb2.ConnectionEvent] = {}
        self.interims: list[event_pb2.InterimReport] = []
        self.hellos: list[ingest_pb2.Hello] = []
        self.heartbeats: list[ingest_pb2.Heartbeat] = []
        self.batches_seen = 0
        self.hold = asyncio.Event()
        self.hold.set()  # set = answer; clear = withhold answers
        self.break_after: int | None = None  # abort the stream after this many batches

    async def Stream(
        self, request_iterator: AsyncIterator[ingest_pb2.IngestRequest], context: Any
    ) -> AsyncIterator[ingest_pb2.IngestResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "hello":
                self.hellos.append(request.hello)
            elif kind == "heartbeat":
                self.heartbeats.append(request.heartbeat)
            elif kind == "batch":
                self.batches_seen += 1
                if self.break_after is not None and self.batches_seen > self.break_after:
                    self.break_after = None
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
                await self.hold.wait()
                fresh = 0
                for event in request.batch.events:
                    fresh += event.event_id not in self.committed
                    self.committed[event.event_id] = event
                self.interims.extend(request.batch.interims)
                yield ingest_pb2.IngestResponse(ack=ingest_pb2.Ack(
                    sequence=request.batch.sequence, inserted=fresh,
                    duplicates=len(request.batch.events) - fresh))


async def _start_collector(collector: FakeCollector, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(collector, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


def _event(index: int, dest_ip: str = "198.51.100.1") -> ConnectionEvent:
    record = ConnectionRecord("192.0.2.7", 40000 + index, time.monotonic())
    record.status = "ok"
    record.reply_code = 0
    record.dest_host = record.domain = f"host{index}.example"
    record.dest_ip = dest_ip
    record.dest_port = 443
    record.bytes_out, record.bytes_in = index, 2 * index
    return record.finish(node_id="node-a", now_mono=time.monotonic())


def _exporter(tmp_path: Path, port: int, **overrides: Any) -> GrpcExporter:
    options: dict[str, Any] = {
        "sink": "grpc",
        "collectors": [("127.0.0.1", port)],
        "spool_dir": tmp_path / "spool",
        "flush_interval": 0.02,
        "heartbeat_interval": 0.05,
        "backoff_initial": 0.02,
        "backoff_max": 0.1,
        "drain_timeout": 2.0,
    }
    settings = EventSinkSettings(**{**options, **overrides})
    identity = NodeIdentity("node-a", "0.1.0", b"\x01" * 16, datetime.now(UTC))
    return GrpcExporter(settings, identity=identity, status=lambda: (3, "policy-1"),
                        log=get_logger("test"))


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _with_collector(
    body: Callable[[FakeCollector, int], Awaitable[None]],
) -> None:
    collector = FakeCollector()
    server, port = await _start_collector(collector)
    try:
        await body(collector, port)
    finally:
        await server.stop(None)


def test_batch_request_framing_parses_as_the_real_message() -> None:
    body = ingest_pb2.Batch(events=[event_pb2.ConnectionEvent(event_id=b"x" * 16)])
    raw = encode_batch_request(body.SerializeToString(), 300)
    parsed = ingest_pb2.IngestRequest.FromString(raw)
    assert parsed.WhichOneof("kind") == "batch"
    assert parsed.batch.sequence == 300
    assert parsed.batch.events[0].event_id == b"x" * 16


async def test_events_are_delivered_with_every_field(tmp_path: Path) -> None:
    async def body(collector: FakeCollector, port: int) -> None:
        exporter = _exporter(tmp_path, port)
        await exporter.start()
        events = [_event(i) for i in range(1200)]
        for event in events:
            exporter.emit(event)
        await _until(lambda: len(collector.committed) == 1200)
        await _until(lambda: bool(collector.heartbeats))
        await exporter.close()
        first = collector.committed[events[5].event_id.bytes]
        assert first.node_id == "node-a"
        assert first.bytes_out == 5 and first.bytes_in == 10
        assert first.domain == "host5.example" and first.dest_port == 443
        assert first.source_ip == bytes([192, 0, 2, 7])
        assert first.status == event_pb2.STATUS_OK and first.reply_code == 0
        assert not first.HasField("ttfb_ms")
        assert collector.hellos[0].node_id == "node-a"
        assert collector.hellos[0].policy_version == "policy-1"
        assert collector.heartbeats[0].active_connections == 3
        assert exporter.dropped == 0

    await _with_collector(body)


async def test_an_event_the_wire_cannot_carry_is_refused_alone(tmp_path: Path) -> None:
    """One event whose address has no wire form (a scoped IPv6 literal) is counted as
    refused and logged; the events around it, and every later one, are still delivered.
    Before, the batcher died on it and exported nothing more."""
    async def body(collector: FakeCollector, port: int) -> None:
        exporter = _exporter(tmp_path, port)
        await exporter.start()
        bad = _event(0, dest_ip="fe80::1%eth0")
        events = [_event(i) for i in range(1, 100)]
        for event in (*events[:50], bad, *events[50:]):
            exporter.emit(event)
        await _until(lambda: len(collector.committed) == 99)
        later = _event(100)
        exporter.emit(later)
        await _until(lambda: later.event_id.bytes in collector.committed)
        await exporter.close()
        assert bad.event_id.bytes not in collector.committed
        assert (exporter.rejected, exporter.dropped) == (1, 0)

    await _with_collector(body)


async def test_unanswered_batches_are_resent_after_the_stream_breaks(tmp_path: Path) -> None:
    async def body(collector: FakeCollector, port: int) -> None:
        collector.break_after = 1
        exporter = _exporter(tmp_path, port, batch_max_events=50)
        await exporter.start()
        for i in range(500):
            exporter.emit(_event(i))
        await _until(lambda: len(collector.committed) == 500)
        assert len(collector.hellos) >= 2  # it reconnected
        await exporter.close()

    await _with_collector(body)


async def test_collector_down_spools_then_replays_in_order(tmp_path: Path) -> None:
    collector = FakeCollector()
    server, port = await _start_collector(collector)
    await server.stop(None)  # the collector is down when the events happen
    exporter = _exporter(tmp_path, port, batch_max_events=100)
    await exporter.start()
    events = [_event(i) for i in range(1000)]
    for event in events:
        exporter.emit(event)
    spool = tmp_path / "spool"
    await _until(lambda: sum(p.stat().st_size for p in spool.glob("*.seg")) > 0)
    await _until(lambda: not exporter._events)
    server, _ = await _start_collector(collector, port)  # back on the same port
    try:
        await _until(lambda: len(collector.committed) == 1000, timeout=20)
        order = [uuid.UUID(bytes=key) for key in collector.committed]
        assert order == [event.event_id for event in events]
        await exporter.close()
    finally:
        await server.stop(None)


async def test_spool_survives_a_restart(tmp_path: Path) -> None:
    collector = FakeCollector()
    server, port = await _start_collector(collector)
    await server.stop(None)
    first = _exporter(tmp_path, port, drain_timeout=0.2)
    await first.start()
    for i in range(300):
        first.emit(_event(i))
    await first.close()  # collector still down: everything goes to the spool
    assert not collector.committed
    server, _ = await _start_collector(collector, port)
    try:
        second = _exporter(tmp_path, port)
        await second.start()
        await _until(lambda: len(collector.committed) == 300, timeout=20)
        await second.close()
    finally:
        await server.stop(None)
    leftover = sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.seg"))
    assert leftover == 0, "acknowledged segments are deleted"


async def test_full_spool_drops_and_counts(tmp_path: Path) -> None:
    collector = FakeCollector()
    server, port = await _start_collector(collector)
    await server.stop(None)
    exporter = _exporter(tmp_path, port, spool_max_bytes=1 << 20, batch_max_events=100,
                         drain_timeout=0)
    await exporter.start()
    for i in range(20_000):  # far more than 1 MiB of events
        exporter.emit(_event(i))
        if i % 1000 == 0:
            await asyncio.sleep(0)
    await _until(lambda: not exporter._events, timeout=20)
    await exporter.close()
    spooled = sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.seg"))
    assert spooled <= 1 << 20
    assert 0 < exporter.dropped < 20_000


async def test_emit_never_waits_even_with_answers_withheld(tmp_path: Path) -> None:
    async def body(collector: FakeCollector, port: int) -> None:
        collector.hold.clear()
        exporter = _exporter(tmp_path, port, buffer_events=1000)
        await exporter.start()
        for i in range(5000):  # emit is synchronous: it cannot wait for the network
            exporter.emit(_event(i))
        assert exporter.dropped >= 4000  # the memory bound holds: excess is counted
        collector.hold.set()
        await _until(lambda: len(collector.committed) == 5000 - exporter.dropped, timeout=20)
        await exporter.close()

    await _with_collector(body)


@pytest.mark.parametrize("events", [0, 1, 7])
async def test_close_with_collector_up_delivers_everything(tmp_path: Path, events: int) -> None:
    async def body(collector: FakeCollector, port: int) -> None:
        exporter = _exporter(tmp_path, port, flush_interval=5.0)  # only close() flushes
        await exporter.start()
        for i in range(events):
            exporter.emit(_event(i))
        await _until(lambda: exporter.connected)
        await exporter.close()
        assert len(collector.committed) == events

    await _with_collector(body)


async def test_close_leaves_no_task_behind(tmp_path: Path) -> None:
    async def body(collector: FakeCollector, port: int) -> None:
        before = asyncio.all_tasks()
        exporter = _exporter(tmp_path, port)
        await exporter.start()
        await _until(lambda: exporter.connected)
        exporter.emit(_event(1))
        await exporter.close()  # drains: sends, waits for the ack, idles, is cancelled
        assert len(collector.committed) == 1
        await asyncio.sleep(0)
        # the exporter's own tasks and the waits they start (the server's are not its)
        left = [t for t in asyncio.all_tasks() - before
                if t.get_coro().__qualname__.startswith(("GrpcExporter.", "Event."))]
        assert left == [], f"tasks still pending after close: {left}"

    await _with_collector(body)


class RecordingLog:
    """A logger that keeps (level, message, fields) for the test to read."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Callable[..., None]:
        def log(message: str, **fields: Any) -> None:
            self.lines.append((level, message, fields))
        return log

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._record(level)

    def named(self, message: str) -> list[dict[str, Any]]:
        return [fields for _, text, fields in self.lines if text == message]


def _logged_exporter(tmp_path: Path, port: int, log: RecordingLog,
                     **overrides: Any) -> GrpcExporter:
    exporter = _exporter(tmp_path, port, **overrides)
    exporter.log = log
    return exporter


async def test_every_outage_is_logged_and_backs_off_from_the_start(tmp_path: Path) -> None:
    """A stream that was up and breaks is a new outage: logged, retried at once."""
    async def body(collector: FakeCollector, port: int) -> None:
        log = RecordingLog()
        exporter = _logged_exporter(tmp_path, port, log, batch_max_events=50,
                                    backoff_initial=0.05, backoff_max=5.0)
        await exporter.start()
        for round_ in range(3):
            collector.break_after = collector.batches_seen + 1
            for i in range(100):
                exporter.emit(_event(round_ * 100 + i))
            expected = (round_ + 1) * 100
            await _until(lambda expected=expected: len(collector.committed) == expected
                         and exporter.connected, timeout=5)
        await exporter.close()
        failures = log.named("collector stream failed")
        assert len(failures) == 3, failures
        assert all(fields["attempt"] == 0 for fields in failures)

    await _with_collector(body)


async def test_drops_from_a_full_buffer_are_logged_within_seconds(tmp_path: Path) -> None:
    async def body(collector: FakeCollector, port: int) -> None:
        collector.hold.clear()
        log = RecordingLog()
        exporter = _logged_exporter(tmp_path, port, log, buffer_events=1000)
        await exporter.start()
        for i in range(5000):
            exporter.emit(_event(i))
        dropped = exporter.dropped
        assert dropped >= 4000
        await _until(lambda: bool(log.named("events dropped")), timeout=3)
        [line] = log.named("events dropped")
        assert (line["dropped_total"], line["buffer_full"], line["spool_full"]) == (
            dropped, dropped, 0)
        collector.hold.set()
        await exporter.close()

    await _with_collector(body)


@pytest.mark.parametrize(("max_bytes", "segment"), [
    (1 << 20, 128 * 1024),        # the smallest spool: eight segments
    (1 << 30, 4 * 1024 * 1024),   # the default: segments of at most 4 MiB
    (100 * 1024, 64 * 1024),      # never under 64 KiB
])
def test_segment_bytes_for(max_bytes: int, segment: int) -> None:
    assert segment_bytes_for(max_bytes) == segment


def test_a_spool_being_replayed_frees_room_as_it_goes(tmp_path: Path) -> None:
    """Acknowledged records free their room a segment at a time: with segments as large as
    the spool, it stays full while replayed under load and new batches are dropped."""
    def fill_then_replay_half(segment_bytes: int) -> bool:
        spool = Spool(tmp_path / str(segment_bytes), max_bytes=1 << 20,
                      segment_bytes=segment_bytes, fsync="never")
        record = b"x" * 10_000
        while spool.append(record):
            pass
        last = None
        for _ in range(60):  # about 600 KB replayed and acknowledged
            read = spool.read_next()
            assert read is not None
            last = read[0]
        assert last is not None
        spool.ack(last)
        room = spool.append(record)
        spool.close()
        return room

    assert fill_then_replay_half(segment_bytes_for(1 << 20))
    assert not fill_then_replay_half(4 * 1024 * 1024)  # the old segment size


_CHILD = """
import asyncio, sys, time
from datetime import UTC, datetime
from pathlib import Path
from proxy_node.events import ConnectionRecord
from proxy_node.exporter import GrpcExporter, NodeIdentity
from socks5_analytics.config import EventSinkSettings
from socks5_analytics.logs import get_logger

port, spool, count = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

async def main():
    settings = EventSinkSettings(sink="grpc", collectors=[("127.0.0.1", port)],
                                 spool_dir=spool, flush_interval=0.02, batch_max_events=50,
                                 backoff_initial=0.05, backoff_max=0.1)
    identity = NodeIdentity("node-a", "0.1.0", b"\\x01" * 16, datetime.now(UTC))
    exporter = GrpcExporter(settings, identity=identity, status=lambda: (0, "p"),
                            log=get_logger("child"))
    await exporter.start()
    while not exporter.connected:  # so that the batches go out from memory, not the spool
        await asyncio.sleep(0.01)
    for index in range(count):
        record = ConnectionRecord("192.0.2.7", 40000 + index, time.monotonic())
        record.status, record.reply_code = "ok", 0
        exporter.emit(record.finish(node_id="node-a", now_mono=time.monotonic()))
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


async def test_a_crash_during_an_outage_loses_nothing_sent(tmp_path: Path) -> None:
    """Batches sent but not yet answered are held in memory; once the stream breaks they
    go to the spool, so a node killed (SIGKILL) during the outage loses none of them: the
    next start delivers them. Before, they stayed in memory only, and were lost."""
    import signal
    import subprocess
    import sys

    count = 300  # 6 batches: all in flight at once (the window is 8)
    collector = FakeCollector()
    collector.hold.clear()  # the collector takes the batches and never answers
    server, port = await _start_collector(collector)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(port), str(tmp_path / "spool"),
                              str(count)], cwd=root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        # The collector reads the first batch and waits; the child sends the other five
        # meanwhile (gRPC buffers them), and keeps all six in flight.
        await _until(lambda: collector.batches_seen >= 1, timeout=30)
        await asyncio.sleep(1.0)
        await server.stop(None)  # the outage: the stream breaks with 6 batches unanswered
        spool = tmp_path / "spool"

        def spooled() -> int:
            return sum(p.stat().st_size for p in spool.glob("*.seg"))

        await _until(lambda: spooled() > count * 20, timeout=30)
        await asyncio.sleep(0.5)  # let the last batch's write finish
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert not collector.committed
    collector = FakeCollector()
    server, port = await _start_collector(collector)
    try:
        second = _exporter(tmp_path, port)
        await second.start()
        await _until(lambda: len(collector.committed) == count, timeout=20)
        await second.close()
    finally:
        await server.stop(None)
