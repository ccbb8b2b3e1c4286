"""The listening side of a proxy node: accept, cap, hand off to sessions, shut down in order.

All shared state lives on one `ProxyServer` object (no globals). Accepting is a readiness
callback that takes up to a batch of connections per wake-up; a connection over the cap is
reset at once rather than queued. Shutdown is one sequence: stop accepting, let live
sessions drain for the grace period, abort the rest, then report.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from proxy_node.auth import Authenticator
from proxy_node.gatekeeper import Admission, Gatekeeper
from proxy_node.poller import Poller
from proxy_node.relay import RelayBuffer
from proxy_node.resolver import Resolver
from proxy_node.session import HANDSHAKE_TIMEOUT, Session
from proxy_node.sink import EventSink
from proxy_node.tracing import end_span, start_span
from socks5_analytics.config import ProxySettings

if TYPE_CHECKING:  # imported lazily at run time: prometheus_client must see the worker setup
    from proxy_node.metrics import ProxyMetrics

__all__ = ["ProxyServer", "open_listening_socket"]

_ACCEPT_BATCH = 128
_RESET_LINGER = struct.pack("ii", 1, 0)
_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def open_listening_socket(host: str, port: int, *, reuse_port: bool,
                          listen: bool = True) -> socket.socket:
    """A non-blocking TCP listener (or, with listen=False, a port reservation)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        if listen:
            sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxyServer:
    """One proxy node's accept loop and its live sessions."""

    def __init__(
        self,
        settings: ProxySettings,
        *,
        node_id: str,
        sink: EventSink,
        authenticator: Authenticator,
        rules: Gatekeeper,
        resolver: Resolver,
        log: Any,
        metrics: ProxyMetrics | None = None,
        tracer: Any = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracer  # None: tracing off, and no tracing call is made
        self.node_id = node_id
        self.sink = sink
        self.authenticator = authenticator
        self.rules = rules
        self.resolver = resolver
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.buffer = RelayBuffer()
        self.poller = Poller(self.loop, log)
        self.sessions: set[Session] = set()
        # Sessions still in their handshake, in accept order, which is also the order of
        # their deadlines (one timeout for all): the sweep only looks at the front.
        self.handshaking: dict[Session, None] = {}
        self._sweep_every = min(1.0, max(0.05, settings.handshake_timeout / 20))
        self._sweeper: asyncio.TimerHandle | None = None
        self.refused_over_capacity = 0
        self.started_at = time.time()
        self._listener: socket.socket | None = None
        self._family = int(socket.AF_INET)
        self._drained: asyncio.Event | None = None
        self._last_refusal_log = 0.0
        self._last_throttle_log = 0.0

    @property
    def active_connections(self) -> int:
        """Sessions from accept to close."""
        return len(self.sessions)

    def serve(self, listener: socket.socket) -> tuple[str, int]:
        """Start accepting on `listener`; returns the address it is bound to."""
        self._listener = listener
        self._family = int(listener.family)
        self.loop.add_reader(listener.fileno(), self._on_accept)
        self._sweeper = self.loop.call_later(self._sweep_every, self._expire_handshakes)
        host, port = listener.getsockname()[:2]
        return host, port

    @property
    def capacity(self) -> int:
        """The cap on concurrent connections in force: the lower of the config's and the
        policy's."""
        return min(self.settings.max_connections, self.rules.max_connections)

    def _on_accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        cap = self.capacity
        loop = self.loop
        family = self._family
        for _ in range(_ACCEPT_BATCH):
            try:
                # The raw accept: socket.accept() converts the family to an enum per call.
                fd, peer = listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self._pause_accepting(exc)
                return
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            if len(self.sessions) >= cap:
                self._refuse(sock)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(self, sock, peer, time.monotonic())
            self.poller.watch(sock.fileno(), session.reader.on_ready)
            if self.tracer is not None:
                session.span = start_span(self.tracer, session.record)
            source_ip = session.record.source_ip
            session.denial = self.rules.admit_source(source_ip)
            if session.denial is None:
                session.admission = Admission(source_ip)
            self.sessions.add(session)
            self.handshaking[session] = None
            session.task = loop.create_task(session.run())

    def _expire_handshakes(self) -> None:
        """Abort the sessions whose handshake outlived `handshake_timeout`."""
        horizon = time.monotonic() - self.settings.handshake_timeout
        expired = []
        for session in self.handshaking:
            if session.record.accepted_mono > horizon:
                break
            expired.append(session)
        for session in expired:
            del self.handshaking[session]
            session.abort(HANDSHAKE_TIMEOUT)
        self._sweeper = self.loop.call_later(self._sweep_every, self._expire_handshakes)

    def _refuse(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
        sock.close()
        self.refused_over_capacity += 1
        if self.metrics is not None:
            self.metrics.refused.inc()
        now = time.monotonic()
        if now - self._last_refusal_log >= 10:
            self._last_refusal_log = now
            self.log.warning("connection refused: at max_connections",
                             max_connections=self.capacity,
                             refused_total=self.refused_over_capacity)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting briefly instead of spinning on the error."""
        listener = self._listener
        if listener is None:
            return
        self.log.error("accept failed; pausing for 100 ms", error=exc.strerror)
        self.loop.remove_reader(listener.fileno())
        self.loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._on_accept)

    async def report_interims(self, interval: float) -> None:
        """Every `interval`, the byte counts of connections open longer than that."""
        while True:
            await asyncio.sleep(interval)
            horizon = time.monotonic() - interval
            for session in list(self.sessions):
                if session.record.accepted_mono <= horizon:
                    sample = session.interim_sample()
                    if sample is not None:
                        self.sink.emit_interim(sample)

    def note_auth_throttled(self, source_ip: str, **span_ids: str) -> None:
        """Log (at most every 10 s per node) that a source is being throttled; `span_ids`:
        the throttled connection's trace_id and span_id, when it is traced."""
        now = time.monotonic()
        if now - self._last_throttle_log >= 10:
            self._last_throttle_log = now
            self.log.warning("authentication throttled: too many failures", source_ip=source_ip,
                             per_minute=self.rules.policy.limits.auth_failures_per_minute_per_ip,
                             **span_ids)

    def revoke(self) -> int:
        """Close the live sessions the policy now in force no longer allows."""
        revoked = [s for s in list(self.sessions) if not s.ended and not s.still_allowed()]
        for session in revoked:
            session.abort("revoked")
        if revoked and self.metrics is not None:
            self.metrics.revoked.inc(len(revoked))
        return len(revoked)

    def session_ended(self, session: Session) -> None:
        """Emit the session's event and forget it."""
        self.sessions.discard(session)
        if session.admission is not None:
            self.rules.release(session.admission)
        record = session.record
        if session.span is not None:
            end_span(session.span, record)
        event = record.finish(node_id=self.node_id, now_mono=time.monotonic())
        self.sink.emit(event)
        if self.metrics is not None:
            self.metrics.connection_ended(record, event.duration_ms / 1000.0)
        if self._drained is not None and not self.sessions:
            self._drained.set()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, wait up to `grace` seconds for sessions to end, abort the rest."""
        listener, self._listener = self._listener, None
        if self._sweeper is not None:
            self._sweeper.cancel()
        if listener is not None:
            self.loop.remove_reader(listener.fileno())
            listener.close()
        self._drained = asyncio.Event()
        if self.sessions:
            self.log.info("draining", active_connections=len(self.sessions), grace_s=grace)
            try:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
            except TimeoutError:
                self.log.warning("grace period over; closing connections",
                                 active_connections=len(self.sessions))
        for session in list(self.sessions):
            session.abort("shutdown")
        tasks = [s.task for s in self.sessions if s.task is not None and not s.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.poller.close()
