"""The gRPC event exporter: the proxy's events to the collectors, with nothing lost but
what a crash finds only in memory (see docs/exporter.md).

`emit()` is a non-waiting append to a bounded in-memory buffer (never blocking the relay).
A batcher turns the buffer into serialized batches every `flush_interval` or every
`batch_max_events`. A batch goes straight to the stream while the collector keeps up;
otherwise (collector slow or down, or older batches already spooled) it goes to the disk
spool, which is replayed in order once the collector is back. Sent batches stay in memory
until the collector acknowledges their commit; when the stream breaks, the ones memory alone
holds go to the spool, and everything is resent on the next stream; event ids make
resending harmless. Collector addresses are tried in turn, with
exponential backoff and jitter. On shutdown the exporter drains what it can within
`drain_timeout` and spools the rest for the next start. What is dropped when even the
spool is full is counted and logged once per interval.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from proxy_node.convert import fill_event, interim_to_proto, timestamp
from proxy_node.events import ConnectionEvent, InterimSample
from proxy_node.spool import Spool, SpoolPosition
from socks5_analytics.config import EventSinkSettings, format_address
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest

__all__ = ["GrpcExporter", "NodeIdentity", "encode_batch_request"]

_METHOD = "/traffic.v1.IngestService/Stream"
_DROP_LOG_INTERVAL = 10.0
_MAX_LINKS = 128


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What the Hello says about this node."""

    node_id: str
    version: str
    boot_id: bytes
    started_at: datetime


@dataclass(slots=True)
class _Batch:
    payload: bytes  # a serialized traffic.v1.Batch without its sequence number
    events: int
    position: SpoolPosition | None  # where it ends in the spool, if it came from there
    sequence: int = 0


def segment_bytes_for(max_bytes: int) -> int:
    """Spool segment size for a spool of `max_bytes`: an eighth of it (at most 4 MiB, at
    least 64 KiB). Acknowledged records free their room a whole segment at a time, so a
    segment as large as the spool would keep it full while it is replayed under load."""
    return max(64 * 1024, min(4 * 1024 * 1024, max_bytes // 8))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_batch_request(payload: bytes, sequence: int) -> bytes:
    """An IngestRequest{batch} from a spooled Batch body, without re-parsing it.

    Protobuf fields may come in any order, so `sequence` (field 1, varint) is prepended to
    the stored body, and the result is wrapped as field 2 (length-delimited) of the request.
    """
    body = b"\x08" + _varint(sequence) + payload
    return b"\x12" + _varint(len(body)) + body


class _StreamBroken(Exception):
    """The stream ended or misbehaved; reconnect."""


class GrpcExporter:
    """An EventSink that streams batches to collectors over gRPC."""

    def __init__(
        self,
        settings: EventSinkSettings,
        *,
        identity: NodeIdentity,
        status: Callable[[], tuple[int, str]],
        log: Any,
        tracer: Any = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.status = status  # () -> (active connections, policy version)
        self.log = log
        self.tracer = tracer
        self.targets = [format_address(host, port) for host, port in settings.collectors]
        # Running totals for the metrics: sent, acked, rejected, resent, spooled.
        self.batch_counts = {"sent": 0, "acked": 0, "rejected": 0, "resent": 0, "spooled": 0}
        self.dropped = 0
        self.rejected = 0
        self.delivered = 0
        self._events: deque[ConnectionEvent] = deque()
        self._interims: deque[InterimSample] = deque()
        self._ready: deque[_Batch] = deque()  # batched in memory, not yet sent
        self._inflight: deque[_Batch] = deque()  # sent, waiting for the collector's answer
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._spool: Spool | None = None
        self._spool_unread = False
        self._wake_batcher = asyncio.Event()
        self._work = asyncio.Event()  # something to send
        self._window = asyncio.Event()  # room in the in-flight window
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._reported_dropped = 0
        self.dropped_spool_full = 0  # of `dropped`; the rest found the memory buffer full
        self._reported_spool_full = 0
        self._stream_opened = False
        self.connected = False

    @property
    def buffered(self) -> int:
        """Events and interim reports waiting in memory."""
        return len(self._events) + len(self._interims)

    @property
    def spool_bytes(self) -> int:
        """Bytes in the disk spool."""
        return self._spool.size if self._spool is not None else 0

    # -- the sink interface (called on the loop, must never wait) ----------------------------

    def emit(self, event: ConnectionEvent) -> None:
        """Buffer a finished connection's event; drop and count it when the buffer is full."""
        if len(self._events) + len(self._interims) >= self.settings.buffer_events:
            self.dropped += 1
            return
        self._events.append(event)
        if len(self._events) >= self.settings.batch_max_events:
            self._wake_batcher.set()

    def emit_interim(self, sample: InterimSample) -> None:
        """Buffer an open connection's byte counts."""
        if len(self._events) + len(self._interims) >= self.settings.buffer_events:
            self.dropped += 1
            return
        self._interims.append(sample)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (replaying what a previous run left) and start delivering."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        self._spool = await loop.run_in_executor(self._io, lambda: Spool(
            settings.spool_dir,
            max_bytes=settings.spool_max_bytes,
            segment_bytes=segment_bytes_for(settings.spool_max_bytes),
            fsync=settings.spool_fsync,
            fsync_interval=settings.spool_fsync_interval,
        ))
        self._spool_unread = await self._in_io(self._spool.has_unread)
        if self._spool_unread:
            self.log.info("replaying spooled events", spool_bytes=self._spool.size)
            self._work.set()
        self._tasks = [
            loop.create_task(self._batcher(), name="exporter-batcher"),
            loop.create_task(self._deliver(), name="exporter-deliver"),
            loop.create_task(self._sync_spool(), name="exporter-spool-sync"),
            loop.create_task(self._report_drops(), name="exporter-drop-report"),
        ]

    async def close(self) -> None:
        """Deliver what can be delivered within `drain_timeout`, spool the rest, stop."""
        self._closing = True
        self._flush_memory()
        deadline = time.monotonic() + self.settings.drain_timeout
        while (self._ready or self._inflight or self._spool_unread) and self.connected:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        leftovers = [b for b in (*self._inflight, *self._ready) if b.position is None]
        for batch in leftovers:
            await self._spool_batch(batch)
        if self._spool is not None:
            await self._in_io(self._spool.close)
        self._io.shutdown(wait=True)
        if self.dropped != self._reported_dropped:
            self.log.warning("events dropped", dropped_total=self.dropped,
                             dropped_since=self.dropped - self._reported_dropped)

    # -- batching --------------------------------------------------------------------------

    def _take_batch(self) -> _Batch | None:
        limit = self.settings.batch_max_events
        events, interims = self._events, self._interims
        if not events and not interims:
            return None
        batch = ingest.Batch()
        count = 0
        add_event = batch.events.add
        while events and count < limit:
            event = events.popleft()
            try:
                fill_event(add_event(), event)
            except (ValueError, OSError, KeyError, TypeError) as exc:
                # A field the wire format cannot carry: that event is refused here, as the
                # collector would refuse it, and the batch (and the batcher) go on.
                del batch.events[-1]
                self.rejected += 1
                self.log.error("event not exportable", event_id=str(event.event_id),
                               error=f"{type(exc).__name__}: {exc}")
                continue
            count += 1
        while interims and count < limit:
            batch.interims.append(interim_to_proto(interims.popleft()))
            count += 1
        if self.tracer is not None:
            batch.traceparent = self._export_span(batch)
        return _Batch(batch.SerializeToString(), count, None)

    def _export_span(self, batch: ingest.Batch) -> str:
        """A span for handing this batch over: a child of its first traced connection's span
        (so that connection, this batch and its write share one trace), linked to every
        traced connection's span; returns its W3C traceparent for the collector to continue."""
        from opentelemetry.trace import (
            Link,
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            TraceFlags,
            set_span_in_context,
        )

        contexts = [
            SpanContext(int.from_bytes(e.trace_id, "big"), int.from_bytes(e.span_id, "big"),
                        is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
            for e in batch.events[:_MAX_LINKS] if e.trace_id and e.span_id
        ]
        parent = set_span_in_context(NonRecordingSpan(contexts[0])) if contexts else None
        span = self.tracer.start_span("socks5.export", context=parent, kind=SpanKind.PRODUCER,
                                      links=[Link(context) for context in contexts],
                                      attributes={"messaging.batch.message_count":
                                                  len(batch.events) + len(batch.interims)})
        context = span.get_span_context()
        span.end()
        if not context.trace_flags.sampled:
            return ""
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"

    def _flush_memory(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._ready.append(batch)
        self._work.set()

    async def _batcher(self) -> None:
        interval = self.settings.flush_interval
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # that comes as the wait ends, and close() would wait for this loop forever.
            try:
                async with asyncio.timeout(interval):
                    await self._wake_batcher.wait()
            except TimeoutError:
                pass
            self._wake_batcher.clear()
            while (batch := self._take_batch()) is not None:
                await self._route(batch)

    async def _route(self, batch: _Batch) -> None:
        """Keep a batch in memory while the collector keeps up; otherwise spool it."""
        room = self.settings.max_inflight_batches
        if self.connected and not self._spool_unread and len(self._ready) < room:
            self._ready.append(batch)
            self._work.set()
        else:
            await self._spool_batch(batch)

    async def _spool_batch(self, batch: _Batch) -> None:
        spool = self._spool
        if spool is None or not await self._in_io(spool.append, batch.payload):
            self._count_dropped(batch.events)
            return
        self.batch_counts["spooled"] += 1
        self._spool_unread = True
        self._work.set()

    def _count_dropped(self, count: int) -> None:
        self.dropped += count
        self.dropped_spool_full += count

    async def _report_drops(self) -> None:
        """Log every drop, whatever its cause: within a second of the first, then at most
        once every `_DROP_LOG_INTERVAL` seconds, each line counting what the last one did
        not (the metric has every drop at once)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if (self.dropped != self._reported_dropped
                    and now - self._last_drop_log >= _DROP_LOG_INTERVAL):
                self._last_drop_log = now
                spool_full = self.dropped_spool_full - self._reported_spool_full
                self.log.error(
                    "events dropped", dropped_total=self.dropped,
                    dropped_since=self.dropped - self._reported_dropped,
                    buffer_full=self.dropped - self._reported_dropped - spool_full,
                    spool_full=spool_full, buffer_events=self.settings.buffer_events,
                    spool_max_bytes=self.settings.spool_max_bytes)
                self._reported_dropped = self.dropped
                self._reported_spool_full = self.dropped_spool_full

    async def _sync_spool(self) -> None:
        while True:
            await asyncio.sleep(self.settings.spool_fsync_interval)
            if self._spool is not None:
                await self._in_io(self._spool.sync)

    async def _in_io(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    # -- delivery --------------------------------------------------------------------------

    async def _next_batch(self) -> _Batch | None:
        """The next batch to send: spooled ones first (they are older), then memory."""
        if self._spool_unread and self._spool is not None:
            record = await self._in_io(self._spool.read_next)
            if record is not None:
                position, payload = record
                return _Batch(payload, 0, position)
            self._spool_unread = False
        if self._ready:
            return self._ready.popleft()
        return None

    async def _deliver(self) -> None:
        attempt = 0
        index = 0
        while True:
            target = self.targets[index % len(self.targets)]
            self._stream_opened = False
            try:
                await self._stream(target)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the task's top: any failure means reconnect, never stop
                self.connected = False
                await self._spool_memory()
                if self._stream_opened:
                    # A stream that was up: a new outage, logged, retried from the start of
                    # the backoff (not where the last outage left it).
                    attempt = 0
                if isinstance(exc, grpc.aio.AioRpcError):
                    detail = exc.code().name
                elif isinstance(exc, (_StreamBroken, OSError, asyncio.InvalidStateError)):
                    detail = str(exc) or type(exc).__name__
                else:
                    self.log.exception("exporter failure; reconnecting", collector=target)
                    detail = type(exc).__name__
                if attempt == 0 or attempt % 10 == 0:
                    self.log.warning("collector stream failed", collector=target, error=detail,
                                     unacked_batches=len(self._inflight), attempt=attempt)
                index += 1
                delay = min(self.settings.backoff_max, self.settings.backoff_initial * 2**attempt)
                attempt = min(attempt + 1, 30)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _spool_memory(self) -> None:
        """The stream broke: what only memory holds (sent and unanswered, or ready to send)
        goes to the spool, so that a crash during the outage loses none of it. It is sent
        again from there, after what was spooled before it (order does not matter to the
        collector: event ids and cumulative interim counts make every order count once).
        Batches read from the spool stay in flight, to be resent first."""
        if self._spool is None:
            return
        moving = [b for b in self._inflight if b.position is None]
        moving += self._ready
        if not moving:
            return
        self._inflight = deque(b for b in self._inflight if b.position is not None)
        self._ready.clear()
        for batch in moving:
            await self._spool_batch(batch)

    def _hello(self) -> bytes:
        identity = self.identity
        _, policy_version = self.status()
        return bytes(ingest.IngestRequest(hello=ingest.Hello(
            node_id=identity.node_id,
            version=identity.version,
            boot_id=identity.boot_id,
            policy_version=policy_version,
            started_at=timestamp(identity.started_at),
        )).SerializeToString())

    def _heartbeat(self) -> bytes:
        active, policy_version = self.status()
        return bytes(ingest.IngestRequest(heartbeat=ingest.Heartbeat(
            active_connections=active,
            policy_version=policy_version,
            sent_at=timestamp(datetime.now(UTC)),
        )).SerializeToString())

    async def _stream(self, target: str) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        tls = self.settings.tls
        if tls.enabled:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            channel = grpc.aio.secure_channel(target, self._credentials(), options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        token = self.settings.token
        metadata = (("authorization", f"Bearer {token.get_secret_value()}"),) if token else None
        async with channel:
            stream = channel.stream_stream(
                _METHOD, request_serializer=None,
                response_deserializer=ingest.IngestResponse.FromString,
            )
            call = stream(metadata=metadata)
            write_lock = asyncio.Lock()

            async def write(data: bytes) -> None:
                async with write_lock:
                    await call.write(data)

            await write(self._hello())
            reader = asyncio.get_running_loop().create_task(self._read_answers(call))
            heart = asyncio.get_running_loop().create_task(self._beat(write))
            try:
                sequence = 0
                for unanswered in self._inflight:  # from the last stream: resend first
                    sequence += 1
                    unanswered.sequence = sequence
                    self.batch_counts["resent"] += 1
                    await write(encode_batch_request(unanswered.payload, sequence))
                self.connected = True
                self._stream_opened = True
                if self._inflight:
                    self.log.info("collector stream open; resending", collector=target,
                                  batches=len(self._inflight))
                else:
                    self.log.info("collector stream open", collector=target)
                while True:
                    while len(self._inflight) >= self.settings.max_inflight_batches:
                        self._window.clear()
                        await self._wait_or_broken(self._window.wait(), reader)
                    batch = await self._next_batch()
                    if batch is None:
                        self._work.clear()
                        await self._wait_or_broken(self._work.wait(), reader)
                        continue
                    sequence += 1
                    batch.sequence = sequence
                    self._inflight.append(batch)
                    self.batch_counts["sent"] += 1
                    await write(encode_batch_request(batch.payload, sequence))
            finally:
                self.connected = False
                heart.cancel()
                reader.cancel()
                call.cancel()

    def _credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials, re-read at each connect so rotated certificates are picked up."""
        tls = self.settings.tls

        def read(path: Any) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(tls.ca_file),
            private_key=read(tls.key_file),
            certificate_chain=read(tls.cert_file),
        )

    async def _wait_or_broken(self, awaitable: Any, reader: asyncio.Task[None]) -> None:
        waiter = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():  # the reader ended first, or this task is being cancelled
                waiter.cancel()
        if reader in done:
            exc = reader.exception()
            raise exc if exc is not None else _StreamBroken("collector closed the stream")

    async def _beat(self, write: Callable[[bytes], Any]) -> None:
        while True:
            await write(self._heartbeat())
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _read_answers(self, call: Any) -> None:
        while True:
            answer = await call.read()
            if answer is grpc.aio.EOF:
                return
            kind = answer.WhichOneof("kind")
            result = answer.ack if kind == "ack" else answer.rejection
            if not self._inflight or self._inflight[0].sequence != result.sequence:
                raise _StreamBroken(f"answer for batch {result.sequence} out of order")
            batch = self._inflight.popleft()
            self.delivered += result.inserted + result.duplicates
            self.batch_counts["acked" if kind == "ack" else "rejected"] += 1
            if kind == "rejection":
                self.rejected += len(result.invalid)
                self.log.warning("collector rejected events",
                                 count=len(result.invalid),
                                 reasons=sorted({item.reason for item in result.invalid})[:5])
            if batch.position is not None and self._spool is not None:
                await self._in_io(self._spool.ack, batch.position)
            self._window.set()


def new_boot_id() -> bytes:
    """16 random bytes for this process's Hello."""
    return os.urandom(16)
