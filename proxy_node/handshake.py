"""The handshake phases: method negotiation, RFC 1929 authentication, the request.

A `HandshakeReader` keeps whatever the client sent beyond the message being parsed, so a
handshake split into single bytes and one pipelined with the data after it read the same.
On every failure the client gets the reply the RFC asks for before the exception leaves.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from proxy_node.auth import choose_method
from proxy_node.errors import ProxyError
from proxy_node.events import ConnectionRecord
from proxy_node.poller import CLOSING
from proxy_node.wire import (
    AuthMethod,
    AuthRequest,
    WireError,
    encode_auth_reply,
    encode_method_selection,
    parse_auth_request,
    parse_greeting,
)

__all__ = ["AuthFailed", "ClientClosed", "HandshakeReader", "NoAcceptableMethod", "negotiate"]

T = TypeVar("T")
_RECV_SIZE = 4096


class ClientClosed(ProxyError):
    """The client closed or reset the connection in the middle of the handshake."""


class NoAcceptableMethod(ProxyError):
    """None of the methods the client offered is acceptable (0xFF sent)."""


class AuthFailed(ProxyError):
    """Wrong username or password, or a disabled user (RFC 1929 failure sent)."""


class HandshakeReader:
    """Reads handshake messages from a non-blocking socket, keeping any surplus bytes.

    The socket is watched edge-triggered by the node's `Poller`, which calls `on_ready`.
    A read is tried first unless the socket is known to be empty (`drained`: a short read
    and no edge since); then the next edge is awaited. A write is always tried first.
    """

    __slots__ = ("buffer", "closing", "drained", "loop", "sock", "waiter")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.drained = False
        self.closing = False  # an edge said the peer closed or reset: read to the end

    def on_ready(self, mask: int) -> None:
        """The poller's handler: note the edge, wake whoever waits on the socket."""
        self.drained = False
        if mask & CLOSING:
            self.closing = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _ready(self) -> None:
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    async def read(self, parse: Callable[[bytearray], tuple[T, int] | None]) -> T:
        """The next message; raise ClientClosed at EOF, WireError if malformed.

        The socket read is inlined rather than delegated to `recv()`: one coroutine less
        per message, three per connection."""
        buffer = self.buffer
        while True:
            parsed = parse(buffer)
            if parsed is not None:
                message, used = parsed
                del buffer[:used]
                return message
            if self.drained:
                waiter = self.waiter = self.loop.create_future()
                try:
                    await waiter
                finally:
                    self.waiter = None
                continue
            try:
                data = self.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                self.drained = True
                continue
            except OSError as exc:
                raise ClientClosed(exc.strerror or "reset") from exc
            if not data:
                raise ClientClosed("EOF during handshake")
            if len(data) < _RECV_SIZE and not self.closing:
                self.drained = True  # saves the EAGAIN read (a syscall and an exception)
            buffer += data

    async def recv(self) -> bytes:
        """Some bytes, waiting for the socket only after EAGAIN; ClientClosed at EOF."""
        while True:
            try:
                data = self.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                await self._ready()
                continue
            except OSError as exc:
                raise ClientClosed(exc.strerror or "reset") from exc
            if not data:
                raise ClientClosed("EOF during handshake")
            return data

    async def wait_closed(self) -> None:
        """Return once the client closes or resets its side of the connection. What it sends
        meanwhile stays in the socket, unread (the kernel's buffer bounds it), for the relay
        to read first."""
        while not self.closing:
            try:
                if not self.sock.recv(1, socket.MSG_PEEK):
                    return  # EOF
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return  # reset
            await self._ready()

    async def send(self, data: bytes) -> None:
        """Send a whole reply; handshake replies are tiny, so this rarely waits."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self._ready()
                continue
            except OSError as exc:
                raise ClientClosed(exc.strerror or "reset") from exc
            view = view[sent:]

    def take_surplus(self) -> bytes:
        """Bytes the client sent after its request (to be relayed first)."""
        surplus = bytes(self.buffer)
        self.buffer.clear()
        return surplus


async def negotiate(
    reader: HandshakeReader,
    record: ConnectionRecord,
    *,
    acceptable: Sequence[AuthMethod],
    check: Callable[[AuthRequest], Awaitable[bool]],
) -> None:
    """Method selection (the first of `acceptable` the client offers), then, for
    username/password, the RFC 1929 exchange; `check` decides and sets the status."""
    greeting = await reader.read(parse_greeting)
    method = choose_method(greeting.methods, acceptable)
    await reader.send(encode_method_selection(method))
    if method == AuthMethod.NO_ACCEPTABLE_METHODS:
        record.status = "auth_failed"
        raise NoAcceptableMethod("no acceptable authentication method offered")
    if method != AuthMethod.USERNAME_PASSWORD:
        return
    try:
        credentials = await reader.read(parse_auth_request)
    except WireError:
        await reader.send(encode_auth_reply(False))
        raise
    record.user = credentials.username.decode("utf-8", "replace")
    ok = await check(credentials)
    await reader.send(encode_auth_reply(ok))
    if not ok:
        raise AuthFailed(f"authentication failed for {record.user!r}")
