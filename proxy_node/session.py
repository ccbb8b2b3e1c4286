"""One client connection, from accept to close: handshake, request, then CONNECT, BIND or
UDP ASSOCIATE. Every failure sends the reply the RFC asks for, then ends the session; every
session ends in exactly one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from proxy_node.bind import accept_one, open_listener
from proxy_node.errors import (
    ConnectionNotAllowed,
    LocalFailure,
    ProxyError,
    ResolutionFailed,
    UpstreamError,
    outcome_for,
)
from proxy_node.events import ConnectionRecord, InterimSample
from proxy_node.gatekeeper import Admission
from proxy_node.handshake import (
    AuthFailed,
    ClientClosed,
    HandshakeReader,
    NoAcceptableMethod,
    negotiate,
)
from proxy_node.relay import TcpRelay
from proxy_node.request import Destination, destination, dial, plain_ip, resolve_allowed
from proxy_node.udp import UdpAssociation
from proxy_node.wire import (
    AuthMethod,
    AuthRequest,
    Command,
    Reply,
    Request,
    WireError,
    encode_reply,
    parse_request,
)

if TYPE_CHECKING:
    from proxy_node.server import ProxyServer

__all__ = ["HANDSHAKE_TIMEOUT", "Session"]

_COMMAND_NAMES = {
    Command.CONNECT: "connect",
    Command.BIND: "bind",
    Command.UDP_ASSOCIATE: "udp_associate",
}
_UNSPECIFIED = frozenset({"0.0.0.0", "::"})
HANDSHAKE_TIMEOUT = "handshake_timeout"
_AUTH_FAILURE_REASONS = {"rate_limited": "auth_throttled", "denied_whitelist": "denied"}
_ANY_METHOD = (AuthMethod.NO_AUTHENTICATION_REQUIRED, AuthMethod.USERNAME_PASSWORD)
_PASSWORD_ONLY = (AuthMethod.USERNAME_PASSWORD,)
_NO_AUTH_ONLY = (AuthMethod.NO_AUTHENTICATION_REQUIRED,)


class Session:
    """The state of one client connection."""

    __slots__ = (
        "abort_reason", "admission", "denial", "ended", "reader", "record", "relay", "server",
        "sock", "span", "task",
    )

    def __init__(self, server: ProxyServer, sock: socket.socket, peer: tuple[str, int],
                 accepted_mono: float) -> None:
        self.server = server
        self.sock = sock
        self.record = ConnectionRecord(plain_ip(peer[0]), peer[1], accepted_mono)
        self.reader = HandshakeReader(sock, server.loop)  # the server's poller wakes it
        self.task: asyncio.Task[None] | None = None
        self.relay: TcpRelay | None = None
        self.abort_reason: str | None = None
        self.ended = False
        # Set by the server at accept: the counted admission, or why the source is refused
        # (the refusal is answered with REP 0x02 once the request has arrived).
        self.admission: Admission | None = None
        self.denial: str | None = None
        self.span: Any = None  # the session's OpenTelemetry span, when tracing is on

    def still_allowed(self) -> bool:
        """Whether the policy now in force would still admit this session."""
        return self.refusal() is None

    def refusal(self) -> str | None:
        """The status the policy now in force would refuse this session with, if any."""
        if self.admission is None:
            return None
        record = self.record
        return self.server.rules.refusal(
            self.admission,
            command=record.command,
            domain=record.domain,
            dest_ip=record.dest_ip,
            dest_port=record.dest_port,
        )

    def interim_sample(self) -> InterimSample | None:
        """Cumulative bytes so far, for a session that is relaying; None otherwise."""
        record = self.record
        if record.status != "ok" or self.ended:
            return None
        relay = self.relay
        if relay is not None:
            return record.interim(record.bytes_out + relay.up.count,
                                  record.bytes_in + relay.down.count)
        return record.interim(record.bytes_out, record.bytes_in)

    def abort(self, reason: str) -> None:
        """End the session now (shutdown, revocation), whatever phase it is in."""
        if self.relay is not None:
            self.relay.close(reason)
        elif self.task is not None and not self.task.done():
            self.abort_reason = reason
            self.task.cancel()

    async def run(self) -> None:
        """The session's task: returns once the relay (if any) has taken over."""
        record = self.record
        try:
            await self._run()
        except asyncio.CancelledError:
            if self.abort_reason == HANDSHAKE_TIMEOUT:
                record.status = "timeout"
                record.close_reason = "idle_timeout"
                self._count_failure("timeout")
            else:
                record.close_reason = self.abort_reason or "shutdown"
                if self.abort_reason == "revoked":
                    self._refuse_revoked_request()
            self._end()
        except ClientClosed:
            record.close_reason = "client"
            self._count_failure("client_closed")
            self._end()
        except NoAcceptableMethod:
            record.close_reason = "error"
            self._count_failure("no_acceptable_method")
            self._end()
        except AuthFailed:
            record.close_reason = "error"
            self._count_failure(_AUTH_FAILURE_REASONS.get(record.status, "auth_failed"))
            self._end()
        except WireError:
            record.close_reason = "error"
            self._count_failure("malformed")
            self._end()
        except ProxyError:
            record.close_reason = "error"
            if self.denial is not None:
                self._count_failure("denied")
            self._end()
        except Exception:
            self.server.log.exception("session failed", source_ip=record.source_ip,
                                      **self._span_ids())
            record.status = "error"
            record.close_reason = "error"
            self._end()

    def _refuse_revoked_request(self) -> None:
        """A request revoked before its reply (a policy change while it was being dialled)
        still gets an answer, REP 0x02, rather than a bare close (RFC 1928 section 6)."""
        record = self.record
        if record.request_mono is None or record.replied_mono is not None:
            return  # no request yet: closing is the answer a handshake gets
        record.status = self.refusal() or "denied_destination"
        record.reply_code = int(Reply.CONNECTION_NOT_ALLOWED)
        try:
            self.sock.send(encode_reply(Reply.CONNECTION_NOT_ALLOWED))
        except OSError:
            pass  # the client is gone, or cannot take 10 bytes: the close says the rest

    def _count_failure(self, reason: str) -> None:
        """A handshake that ended before the request was answered, for the metrics."""
        metrics = self.server.metrics
        if metrics is not None and self.record.replied_mono is None:
            metrics.handshake_failed(reason)

    async def _run(self) -> None:
        server = self.server
        record = self.record
        reader = self.reader
        # The handshake's deadline is kept by the server's sweep (ProxyServer.handshaking),
        # which is cheaper than a timer per connection.
        try:
            acceptable: tuple[AuthMethod, ...]
            if self.denial is not None:  # answer the request with 0x02, whatever the method
                acceptable = _ANY_METHOD
            elif server.authenticator.requires_auth:
                acceptable = _PASSWORD_ONLY
            else:
                acceptable = _NO_AUTH_ONLY
            await negotiate(reader, record, acceptable=acceptable, check=self._check_password)
            try:
                request = await reader.read(parse_request)
            except WireError as exc:
                await self._reply_failure(reader, exc)
                raise
        finally:
            server.handshaking.pop(self, None)
        record.request_mono = time.monotonic()
        record.command = _COMMAND_NAMES[request.command]
        if request.command == Command.UDP_ASSOCIATE:
            record.protocol = "udp"
        try:
            dest = destination(request)
        except ResolutionFailed as exc:
            unusable: ResolutionFailed | None = exc
        else:
            unusable = None
            if request.command != Command.UDP_ASSOCIATE:  # its DST is the client's own address
                record.dest_host = dest.host
                record.dest_port = dest.port
                record.domain = dest.host if dest.is_domain else None
        if self.denial is not None:  # what was asked is recorded, then refused
            await self._reply_failure(reader, ConnectionNotAllowed(self.denial))
            record.status = self.denial
            raise ConnectionNotAllowed(self.denial)
        try:
            if unusable is not None:
                raise unusable
            if request.command == Command.CONNECT:
                await self._connect(reader, dest)
            elif request.command == Command.BIND:
                await self._bind(reader, dest)
            else:
                await self._udp_associate(reader, request)
        except (ProxyError, WireError) as exc:
            await self._reply_failure(reader, exc)
            raise
        except OSError as exc:  # a socket of the proxy's own failed (EMFILE, ENOBUFS ...)
            await self._reply_failure(reader, exc)  # RFC 1928 §6: still a reply, 0x01
            server.log.warning("request failed locally", command=record.command,
                               error=exc.strerror or type(exc).__name__, **self._span_ids())
            raise LocalFailure(str(exc)) from exc

    def _span_ids(self) -> dict[str, str]:
        """The session span's ids, for a line logged inside it. The span is never made the
        current one (that would cost every connection two context switches), so the log
        processor cannot find them by itself."""
        record = self.record
        if record.trace_id is None or record.span_id is None:
            return {}
        return {"trace_id": record.trace_id, "span_id": record.span_id}

    async def _check_password(self, credentials: AuthRequest) -> bool:
        """RFC 1929 verification with throttling and per-user limits; sets the status."""
        server = self.server
        gate = server.rules
        record = self.record
        if self.denial is not None:
            record.status = self.denial
            return False
        if gate.auth_blocked(record.source_ip):
            record.status = "rate_limited"
            server.note_auth_throttled(record.source_ip, **self._span_ids())
            return False
        authenticator = server.authenticator
        ok = authenticator.recognized(credentials.username, credentials.password)
        if ok is None:
            # The slow hash: counted as a failure before it runs (so parallel guesses cannot
            # outrun the throttle) by the login that starts it; concurrent logins with the
            # same credentials share it instead of each counting.
            result, started = authenticator.verification(credentials.username,
                                                         credentials.password)
            if started:
                gate.auth_attempt(record.source_ip)
            ok = await asyncio.shield(result)
            if started and ok:
                gate.auth_succeeded(record.source_ip)
            elif not started and not ok:
                gate.auth_attempt(record.source_ip)
        elif not ok:
            gate.auth_attempt(record.source_ip)
        if not ok:
            record.status = "auth_failed"
            return False
        user = gate.users.get(record.user)
        if user is None:  # removed by a policy change while the hash was checked
            record.status = "auth_failed"
            return False
        if not gate.admit_user(user):
            self.denial = "rate_limited"  # authenticated; the request gets 0x02
            return True
        if self.admission is not None:
            self.admission.user = user.username
            self.admission.password_hash = user.password_hash
        return True

    async def _reply_failure(self, reader: HandshakeReader, exc: BaseException) -> None:
        reply, status = outcome_for(exc)
        self.record.status = status
        self.record.reply_code = int(reply)
        try:
            await reader.send(encode_reply(reply))
        except ClientClosed:
            pass  # the client is gone; the session ends either way

    async def _succeed(self, reader: HandshakeReader, host: str, port: int) -> None:
        await reader.send(encode_reply(Reply.SUCCEEDED, plain_ip(host), port))
        record = self.record
        record.status = "ok"
        record.reply_code = int(Reply.SUCCEEDED)
        record.replied_mono = time.monotonic()

    async def _connect(self, reader: HandshakeReader, dest: Destination) -> None:
        server = self.server
        if not dest.is_domain:  # nothing to resolve: this is the address used, even if it fails
            self.record.dest_ip = dest.host
        try:
            upstream, connected_ip = await dial(dest, resolver=server.resolver,
                                                rules=server.rules,
                                                timeout=server.settings.connect_timeout,
                                                poller=server.poller)
        except UpstreamError as exc:
            if exc.address is not None:  # a name's address that was tried (last) and failed
                self.record.dest_ip = exc.address
            raise
        try:
            record = self.record
            record.connected_mono = time.monotonic()
            record.dest_ip = connected_ip
            host, port = upstream.getsockname()[:2]
            await self._succeed(reader, host, port)
        except BaseException:
            server.poller.discard(upstream)
            raise
        self._start_relay(upstream, reader.take_surplus(), client_empty=reader.drained)

    async def _bind(self, reader: HandshakeReader, dest: Destination) -> None:
        server = self.server
        rules = server.rules
        expected: frozenset[str] | None = None  # who may connect (RFC 1928 §4: DST.ADDR)
        if dest.is_domain:
            allowed = await resolve_allowed("bind", dest.host, dest.port,
                                            resolver=server.resolver, rules=rules)
            expected = frozenset(plain_ip(addr[0]) for _, addr in allowed)
        elif dest.host not in _UNSPECIFIED:
            rules.check_destination("bind", dest.host, dest.host, dest.port)
            expected = frozenset((dest.host,))
        else:
            rules.check_command("bind")
        listener = open_listener(expected, plain_ip(self.sock.getsockname()[0]))
        try:
            host, port = listener.getsockname()[:2]
            await self._succeed(reader, host, port)
            record = self.record
            record.status = "error"  # until the second reply says otherwise
            inbound, peer_ip, peer_port = await _accept_unless_closed(
                reader, accept_one(listener, expected, server.settings.bind_timeout))
        finally:
            listener.close()
        server.poller.watch(inbound.fileno(), _ignore)  # the relay takes it over
        try:
            server.rules.check_destination("bind", peer_ip, peer_ip, peer_port)
            record.connected_mono = time.monotonic()
            record.dest_ip, record.dest_port = peer_ip, peer_port
            await self._succeed(reader, peer_ip, peer_port)
        except BaseException:
            server.poller.discard(inbound)
            raise
        self._start_relay(inbound, reader.take_surplus())

    async def _udp_associate(self, reader: HandshakeReader, request: Request) -> None:
        server = self.server
        server.rules.check_command("udp_associate")
        association = UdpAssociation(
            server.loop,
            bind_ip=plain_ip(self.sock.getsockname()[0]),
            client_ip=self.record.source_ip,
            client_port=request.port or None,
            record=self.record,
            resolver=server.resolver,
            rules=server.rules,
            idle_timeout=server.settings.udp_idle_timeout,
        )
        watcher: asyncio.Task[None] | None = None
        try:
            self.record.connected_mono = time.monotonic()
            host, port = association.bound
            await self._succeed(reader, host, port)
            association.start()
            watcher = server.loop.create_task(_until_closed(reader))
            ends: set[asyncio.Future[Any]] = {watcher, association.closed}
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            reason = association.closed.result() if association.closed.done() else "client"
            self.record.close_reason = reason
        finally:
            association.close(self.abort_reason or "shutdown")
            if watcher is not None:
                watcher.cancel()
        self._end()

    def _start_relay(self, upstream: socket.socket, early_data: bytes, *,
                     client_empty: bool = False) -> None:
        settings = self.server.settings
        self.relay = TcpRelay(
            self.server.loop,
            self.sock,
            upstream,
            self.record,
            poller=self.server.poller,
            buffer=self.server.buffer,
            mode=settings.relay,
            idle_timeout=settings.idle_timeout,
            half_close_timeout=settings.half_close_timeout,
            on_close=self._relay_closed,
        )
        if self.admission is not None:
            buckets = self.server.rules.bandwidth_buckets(self.admission)
            if buckets is not None:
                self.relay.up.bucket, self.relay.down.bucket = buckets
        self.relay.start(early_data, client_empty=client_empty)

    def _relay_closed(self, relay: TcpRelay, reason: str) -> None:
        self.record.close_reason = reason
        self.ended = True
        self.server.session_ended(self)

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.server.poller.discard(self.sock)
        self.server.session_ended(self)


def _ignore(mask: int) -> None:
    """A watched socket's handler until its relay starts (which reads it at once)."""


async def _accept_unless_closed(
    reader: HandshakeReader, accepting: Coroutine[Any, Any, tuple[socket.socket, str, int]]
) -> tuple[socket.socket, str, int]:
    """The BIND peer's connection, unless the client closes its control connection first:
    then its listener must not wait out `bind_timeout` for nobody. What the client sends
    meanwhile stays in its socket, to be relayed first."""
    loop = asyncio.get_running_loop()
    accept = loop.create_task(accepting)
    closed = loop.create_task(reader.wait_closed())
    try:
        await asyncio.wait({accept, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        if not accept.done():
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accept
    if accept.cancelled():
        raise ClientClosed("the client closed its connection while waiting for the BIND peer")
    return accept.result()


async def _until_closed(reader: HandshakeReader) -> None:
    """Read and discard until the control connection closes."""
    try:
        while True:
            await reader.recv()
    except ClientClosed:
        return
