"""The `traffic.v1.IngestService/Stream` conversation, one stream at a time.

Thin: each message is decoded, checked against the conversation's rules, normalized and
handed to the publisher; each batch is answered, in order, from the publisher's future.
Two tasks per stream: the reader (which stops reading while the stream has
`stream_max_pending` unanswered batches or the publisher is full: that is the back-pressure)
and the answerer. A broken rule ends the stream with the status the proto names; the
batches already taken are still committed (a resend after reconnect is then a duplicate).

The request deserializer is the identity: a message that does not decode is ours to judge
(INVALID_ARGUMENT), rather than gRPC's generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from collector.errors import PublisherClosedError, UnstorableBatchError
from collector.metrics import CollectorMetrics
from collector.normalize import DomainRules, NormalizedBatch, normalize_batch
from collector.publisher import Outcome, Publisher
from socks5_analytics.logs import get_logger
from socks5_analytics.storage import NodeReport
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest

__all__ = ["SERVICE_NAME", "IngestServicer", "StreamLimits", "method_handlers"]

SERVICE_NAME = "traffic.v1.IngestService"

log = get_logger("collector.servicer")

_MAX_NODE_ID = 128
_MAX_LABEL = 256  # version and policy_version


class StreamError(Exception):
    """A broken rule of the conversation: ends the stream with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What one stream may do."""

    hello_timeout: float = 10.0
    max_batch_items: int = 10_000
    max_pending: int = 16


@dataclass(frozen=True, slots=True)
class _Node:
    node_id: str
    version: str
    started_at: datetime
    policy_version: str


@dataclass(frozen=True, slots=True)
class _Pending:
    sequence: int
    batch: NormalizedBatch
    done: asyncio.Future[Outcome]
    span: Any = None  # the batch's span, ended once the batch is answered


_MAX_LINKS = 128


def batch_span(tracer: Any, batch: ingest.Batch, node_id: str) -> Any:
    """The batch's span: a child of the node's export span (its traceparent), linked to the
    connections it carries, so one trace leads from a connection to its database write."""
    from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = None
    if batch.traceparent:
        parent = TraceContextTextMapPropagator().extract({"traceparent": batch.traceparent})
    links = [
        Link(SpanContext(int.from_bytes(e.trace_id, "big"), int.from_bytes(e.span_id, "big"),
                         is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        for e in batch.events[:_MAX_LINKS]
        if len(e.trace_id) == 16 and len(e.span_id) == 8 and any(e.trace_id) and any(e.span_id)
    ]
    return tracer.start_span(
        "collector.batch", context=parent, kind=SpanKind.CONSUMER, links=links,
        attributes={"messaging.batch.message_count": len(batch.events) + len(batch.interims),
                    "socks5.node_id": node_id, "socks5.batch.sequence": batch.sequence},
    )


def _decode(raw: bytes) -> ingest.IngestRequest:
    request = ingest.IngestRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the message is not an IngestRequest: {exc}") from exc
    return request


def _time(stamp: Any, fallback: datetime) -> datetime:
    if not (0 < stamp.seconds <= 253_402_300_799 and 0 <= stamp.nanos < 1_000_000_000):
        return fallback
    moment: datetime = stamp.ToDatetime(tzinfo=UTC)
    return moment


def _hello(request: ingest.IngestRequest, now: datetime) -> _Node:
    kind = request.WhichOneof("kind")
    if kind is None:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "the message sets no kind")
    if kind != "hello":
        raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the first message must be a Hello, got a {kind}")
    hello = request.hello
    if not 1 <= len(hello.node_id) <= _MAX_NODE_ID:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"hello.node_id: {len(hello.node_id)} characters, expected 1-128")
    for name in ("version", "policy_version"):
        if len(getattr(hello, name)) > _MAX_LABEL:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"hello.{name}: over {_MAX_LABEL} characters")
    return _Node(hello.node_id, hello.version, _time(hello.started_at, now),
                 hello.policy_version)


# A node's channel takes answers of up to 4 MiB (gRPC's default); a Rejection must fit in
# one, or the node could never get its batch answered and would resend it forever.
RESPONSE_BUDGET = 4 * 1024 * 1024 - 64 * 1024
# What an InvalidItem costs besides its reason: the index, the flag, a 16-byte event id and
# the field tags and lengths.
_ITEM_OVERHEAD = 40
_REASON_MIN, _REASON_MAX = 24, 1024


def reason_limit(invalid_items: int, budget: int = RESPONSE_BUDGET) -> int:
    """The bytes of reason each of `invalid_items` may keep so that their Rejection fits in
    `budget`: all of a reason (up to 1 KiB) for a few items, less for many (never under 24:
    the field it names comes first)."""
    if invalid_items <= 0:
        return _REASON_MAX
    share = budget // invalid_items - _ITEM_OVERHEAD
    return max(_REASON_MIN, min(_REASON_MAX, share))


def shorten(reason: str, limit: int) -> str:
    """`reason` cut to at most `limit` UTF-8 bytes, marked with "…" when cut."""
    encoded = reason.encode()
    if len(encoded) <= limit:
        return reason
    return encoded[:limit - 3].decode(errors="ignore") + "…"


def _response(sequence: int, batch: NormalizedBatch, outcome: Outcome) -> bytes:
    limit = reason_limit(len(batch.invalid) + len(outcome.rejected))
    invalid = [
        ingest.InvalidItem(index=item.index, interim=item.interim, event_id=item.event_id,
                           reason=shorten(item.reason, limit))
        for item in batch.invalid
    ]
    if outcome.rejected:
        # Rows the repository refused, found by event id among the rows we sent it.
        positions = {
            ("event", row.event_id): index
            for row, index in zip(batch.events, batch.event_positions, strict=True)
        }
        positions.update({
            ("interim", row.event_id): index
            for row, index in zip(batch.interims, batch.interim_positions, strict=True)
        })
        for rejected in outcome.rejected:
            invalid.append(ingest.InvalidItem(
                index=positions.get((rejected.kind, rejected.event_id), 0),
                interim=rejected.kind == "interim",
                event_id=rejected.event_id.bytes,
                reason=shorten(rejected.reason, limit),
            ))
    if invalid:
        response = ingest.IngestResponse(rejection=ingest.Rejection(
            sequence=sequence, inserted=outcome.inserted, duplicates=outcome.duplicates,
            invalid=invalid,
        ))
    else:
        response = ingest.IngestResponse(ack=ingest.Ack(
            sequence=sequence, inserted=outcome.inserted, duplicates=outcome.duplicates,
        ))
    encoded: bytes = response.SerializeToString()
    return encoded


class _Stream:
    """One node's stream: its reader and its answerer."""

    def __init__(self, servicer: IngestServicer, messages: AsyncIterator[bytes],
                 context: grpc.aio.ServicerContext[bytes, bytes], node: _Node) -> None:
        self.servicer = servicer
        self.messages = messages
        self.context = context
        self.node = node
        self.pending: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(servicer.limits.max_pending)
        self.reader: asyncio.Task[None] | None = None
        self.answerer: asyncio.Task[None] | None = None

    def heartbeat(self, *, active_connections: int, policy_version: str,
                  now: datetime) -> None:
        self.servicer.publisher.note_node(NodeReport(
            node_id=self.node.node_id, version=self.node.version,
            started_at=self.node.started_at, last_seen=now,
            policy_version=policy_version, active_connections=active_connections,
        ))

    async def read(self) -> None:
        servicer = self.servicer
        expected = 1
        while True:
            # Waiting here, not reading, is what makes gRPC's flow control push back.
            await self.slots.acquire()
            try:
                raw = await anext(self.messages)
            except StopAsyncIteration:
                self.pending.put_nowait(None)  # the node is done: answer what is left
                return
            request = _decode(raw)
            kind = request.WhichOneof("kind")
            if kind == "batch":
                batch = request.batch
                if batch.sequence != expected:
                    raise StreamError(grpc.StatusCode.OUT_OF_RANGE,
                                      f"batch sequence {batch.sequence}, expected {expected}")
                items = len(batch.events) + len(batch.interims)
                if items > servicer.limits.max_batch_items:
                    raise StreamError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"batch {batch.sequence} has {items} items, at most "
                        f"{servicer.limits.max_batch_items}",
                    )
                normalized = normalize_batch(batch.events, batch.interims,
                                             node_id=self.node.node_id,
                                             now=servicer.clock(), rules=servicer.rules)
                metrics = servicer.metrics
                if metrics is not None:
                    metrics.events_received.inc(items)
                    if normalized.invalid:
                        metrics.rejected([item.reason for item in normalized.invalid])
                span = None
                if servicer.tracer is not None:
                    span = batch_span(servicer.tracer, batch, self.node.node_id)
                try:
                    done = await servicer.publisher.submit(
                        normalized.events, normalized.interims,
                        span_context=span.get_span_context() if span is not None else None,
                    )
                except PublisherClosedError as exc:
                    if span is not None:
                        span.end()
                    raise StreamError(grpc.StatusCode.UNAVAILABLE,
                                      "the collector is stopping") from exc
                self.pending.put_nowait(_Pending(batch.sequence, normalized, done, span))
                expected += 1
                continue
            self.slots.release()
            if kind == "heartbeat":
                beat = request.heartbeat
                self.heartbeat(active_connections=beat.active_connections,
                               policy_version=beat.policy_version[:_MAX_LABEL],
                               now=servicer.clock())
            elif kind == "hello":
                raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                  "a second Hello on the same stream")
            else:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "the message sets no kind")

    async def answer(self) -> None:
        while True:
            pending = await self.pending.get()
            if pending is None:
                return
            metrics = self.servicer.metrics
            try:
                outcome = await pending.done
            except UnstorableBatchError as exc:
                if metrics is not None:
                    metrics.batches.labels("failed").inc()
                if pending.span is not None:
                    pending.span.record_exception(exc)
                    pending.span.end()
                raise StreamError(grpc.StatusCode.INTERNAL,
                                  f"batch {pending.sequence} could not be stored; resend it "
                                  f"later: {exc}") from exc
            except PublisherClosedError as exc:
                raise StreamError(grpc.StatusCode.UNAVAILABLE,
                                  "the collector is stopping") from exc
            await self.context.write(_response(pending.sequence, pending.batch, outcome))
            rejected = bool(pending.batch.invalid or outcome.rejected)
            if metrics is not None:
                metrics.batches.labels("rejection" if rejected else "ack").inc()
            if pending.span is not None:
                pending.span.set_attribute("socks5.batch.inserted", outcome.inserted)
                pending.span.set_attribute("socks5.batch.duplicates", outcome.duplicates)
                pending.span.end()
            self.slots.release()

    async def run(self) -> None:
        """Read and answer until the node half-closes (then answer the rest) or a rule breaks."""
        reader = self.reader = asyncio.create_task(self.read())
        answerer = self.answerer = asyncio.create_task(self.answer())
        try:
            # Returns once the answerer is through (after the reader's end marker) or
            # either task failed.
            await asyncio.wait({reader, answerer}, return_when=asyncio.FIRST_EXCEPTION)
            for task in (reader, answerer):
                if task.done() and not task.cancelled():
                    error = task.exception()
                    if error is not None:
                        raise error
            if self.servicer.stopping:
                raise StreamError(grpc.StatusCode.UNAVAILABLE, "the collector is stopping")
        finally:
            for task in (reader, answerer):
                task.cancel()
            await asyncio.gather(reader, answerer, return_exceptions=True)

    def stop_reading(self) -> None:
        """Take no more batches (shutdown); the ones taken are still answered."""
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()
            self.pending.put_nowait(None)


class IngestServicer:
    """Serves `traffic.v1.IngestService`; keeps the live streams for an orderly stop."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        rules: DomainRules,
        limits: StreamLimits = StreamLimits(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: CollectorMetrics | None = None,
        tracer: Any = None,
    ) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.tracer = tracer  # None: tracing off
        self.rules = rules
        self.limits = limits
        self.clock = clock
        self.stopping = False
        self._streams: set[_Stream] = set()
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    @property
    def active_streams(self) -> int:
        """Streams open right now."""
        return len(self._streams)

    async def Stream(
        self, request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        """One node's stream: Hello, then batches and heartbeats (see ingest.proto)."""
        peer = context.peer()
        node_id: str | None = None
        try:
            if self.stopping:
                raise StreamError(grpc.StatusCode.UNAVAILABLE, "the collector is stopping")
            messages = aiter(request_iterator)
            try:
                raw = await asyncio.wait_for(anext(messages), self.limits.hello_timeout)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise StreamError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no Hello within {self.limits.hello_timeout:g} s",
                ) from exc
            node = _hello(_decode(raw), self.clock())
            node_id = node.node_id
            stream = _Stream(self, messages, context, node)
            stream.heartbeat(active_connections=0, policy_version=node.policy_version,
                             now=self.clock())
            log.info("stream opened", peer=peer, node_id=node_id, version=node.version)
            self._streams.add(stream)
            self._no_streams.clear()
            try:
                await stream.run()
            finally:
                self._streams.discard(stream)
                if not self._streams:
                    self._no_streams.set()
            log.info("stream closed", peer=peer, node_id=node_id)
        except StreamError as exc:
            level = log.info if exc.code == grpc.StatusCode.UNAVAILABLE else log.warning
            level("stream ended", peer=peer, node_id=node_id, code=exc.code.name,
                  details=exc.details)
            await context.abort(exc.code, exc.details)

    def begin_stop(self) -> None:
        """Refuse new streams and stop reading the live ones; answers still go out."""
        self.stopping = True
        for stream in list(self._streams):
            stream.stop_reading()

    async def wait_closed(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the live streams to send their last answers."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), timeout)


def method_handlers(servicer: IngestServicer) -> grpc.GenericRpcHandler:
    """The service's handler: raw bytes in (we decode), serialized responses out."""
    handler = grpc.stream_stream_rpc_method_handler(servicer.Stream)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": handler})

