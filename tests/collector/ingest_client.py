"""A small test client of `traffic.v1.IngestService` over the generated stub, and event makers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest
from socks5_analytics.stubs.traffic.v1.ingest_pb2_grpc import IngestServiceStub

# start_collector(**collector_settings) -> CollectorServer (the conftest fixture).
StartCollector = Callable[..., Any]

METHOD = "/traffic.v1.IngestService/Stream"


def stamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def make_event(**fields: Any) -> pb.ConnectionEvent:
    """A valid event of a finished CONNECT, one second long, ending now; fields override."""
    now = datetime.now(UTC).replace(microsecond=0)
    values: dict[str, Any] = {
        "event_id": uuid.uuid4().bytes,
        "node_id": "node-a",
        "started_at": stamp(now - timedelta(seconds=1)),
        "ended_at": stamp(now),
        "source_ip": bytes([10, 0, 0, 7]),
        "source_port": 40000,
        "user": "alice",
        "command": pb.COMMAND_CONNECT,
        "protocol": pb.PROTOCOL_TCP,
        "dest_host": "www.example.co.uk",
        "domain": "www.example.co.uk",
        "dest_ip": bytes([93, 184, 216, 34]),
        "dest_port": 443,
        "status": pb.STATUS_OK,
        "reply_code": 0,
        "close_reason": pb.CLOSE_REASON_CLIENT,
        "connect_ms": 12.5,
        "ttfb_ms": 30.0,
        "duration_ms": 1000.0,
        "bytes_out": 100,
        "bytes_in": 2000,
    }
    values.update(fields)
    return pb.ConnectionEvent(**{k: v for k, v in values.items() if v is not None})


def make_interim(**fields: Any) -> pb.InterimReport:
    """A valid interim report of a connection open for a minute; fields override."""
    now = datetime.now(UTC).replace(microsecond=0)
    values: dict[str, Any] = {
        "event_id": uuid.uuid4().bytes,
        "started_at": stamp(now - timedelta(minutes=1)),
        "reported_at": stamp(now),
        "source_ip": bytes([10, 0, 0, 7]),
        "user": "alice",
        "domain": "download.example.com",
        "bytes_out": 10,
        "bytes_in": 5000,
    }
    values.update(fields)
    return pb.InterimReport(**{k: v for k, v in values.items() if v is not None})


def hello(node_id: str = "node-a", **fields: Any) -> ingest.IngestRequest:
    """The first message of a stream."""
    return ingest.IngestRequest(hello=ingest.Hello(
        node_id=node_id, version=fields.pop("version", "test"), boot_id=uuid.uuid4().bytes,
        policy_version=fields.pop("policy_version", "p1"),
        started_at=stamp(datetime.now(UTC)), **fields,
    ))


def batch(sequence: int, events: Iterable[pb.ConnectionEvent] = (),
          interims: Iterable[pb.InterimReport] = ()) -> ingest.IngestRequest:
    """A batch message."""
    return ingest.IngestRequest(batch=ingest.Batch(sequence=sequence, events=list(events),
                                                   interims=list(interims)))


def heartbeat(active: int, policy_version: str = "p1") -> ingest.IngestRequest:
    """A heartbeat message."""
    return ingest.IngestRequest(heartbeat=ingest.Heartbeat(
        active_connections=active, policy_version=policy_version,
        sent_at=stamp(datetime.now(UTC))))


class Session:
    """One open stream: write requests, read responses, finish."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(self, request: ingest.IngestRequest) -> None:
        await self.call.write(request)

    async def recv(self) -> ingest.IngestResponse:
        response = await self.call.read()
        assert response is not grpc.aio.EOF, f"stream ended: {await self.call.code()}"
        return response  # type: ignore[no-any-return]

    async def deliver(self, sequence: int, events: Sequence[pb.ConnectionEvent] = (),
                      interims: Sequence[pb.InterimReport] = ()) -> ingest.IngestResponse:
        await self.send(batch(sequence, events, interims))
        return await self.recv()

    async def finish(self) -> grpc.StatusCode:
        await self.call.done_writing()
        return await self.call.code()  # type: ignore[no-any-return]


async def open_session(channel: grpc.aio.Channel, node_id: str = "node-a") -> Session:
    """A stream that has said Hello."""
    session = Session(IngestServiceStub(channel).Stream())
    await session.send(hello(node_id))
    return session


def raw_stream(channel: grpc.aio.Channel) -> Any:
    """A stream of raw bytes on the same method: for messages the stub could not make."""
    return channel.stream_stream(METHOD, request_serializer=None,
                                 response_deserializer=ingest.IngestResponse.FromString)()


async def eventually(probe: Any, *, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `probe()` (a coroutine function) until it returns something truthy, or fail."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"still {value!r} after {timeout} s")
        await asyncio.sleep(interval)
