"""The TCP relay: moves bytes both ways between the client and the destination.

Two independent flows (upload, download) over raw non-blocking sockets, driven by the node's
edge-triggered `Poller` (each socket registered once), with flow control: a flow whose
destination cannot take more stops reading its source until the backlog drains, then reads
again by itself (an edge-triggered source gives no second notice). A flow starts by copying
through one shared buffer (no allocation per chunk) and, once it has carried `SPLICE_AFTER`
bytes, switches to `os.splice` through a pipe so bulk data never enters Python. EOF on one
side is passed on as a half-close (`shutdown(SHUT_WR)`); the relay ends when both flows are
done, on a reset, or after an idle timeout (a shorter one once half-closed).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Literal

from proxy_node.events import ConnectionRecord
from proxy_node.limits import TokenBucket
from proxy_node.poller import CLOSING, READABLE, WRITABLE, Poller

__all__ = ["SPLICE_AFTER", "RelayBuffer", "RelayMode", "TcpRelay", "splice_supported"]

RelayMode = Literal["auto", "splice", "copy"]

SPLICE_AFTER = 1 << 20
_PIPE_SIZE = 1 << 20
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_RESET_LINGER = struct.pack("ii", 1, 0)
_RETRY = (BlockingIOError, InterruptedError)
# Reads per turn before yielding to other connections (4 MiB in copy mode); the flow then
# continues by itself on the next loop iteration.
_READS_PER_WAKEUP = 16


def splice_supported() -> bool:
    """Whether this platform has os.splice (Linux, Python 3.10+)."""
    return hasattr(os, "splice")


class RelayBuffer:
    """One read buffer per event loop: a copy flow uses it only inside one callback."""

    __slots__ = ("data", "view")

    def __init__(self, size: int = 256 * 1024) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)


class _Flow:
    """One direction: read from `src`, write to `dst`.

    `pull()` moves what `src` has (until EAGAIN, EOF, a full `dst` or the bandwidth cap);
    `push()` flushes a backlog once `dst` is writable, then pulls again.
    """

    __slots__ = (
        "bucket",
        "count",
        "done",
        "download",
        "dst",
        "dst_fd",
        "eof",
        "in_pipe",
        "paused",
        "pending",
        "pipe_r",
        "pipe_w",
        "relay",
        "splicing",
        "src",
        "src_fd",
    )

    def __init__(self, relay: TcpRelay, src: socket.socket, dst: socket.socket,
                 *, download: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.download = download
        self.count = 0
        self.pending = b""
        self.eof = False
        self.done = False
        self.paused = False  # waiting for the bandwidth cap's tokens
        self.splicing = False
        self.pipe_r = -1
        self.pipe_w = -1
        self.in_pipe = 0
        self.bucket: TokenBucket | None = None  # a user's bandwidth cap, if any

    def pull(self, edge: int = CLOSING) -> None:
        """Move what the source has, unless this flow is waiting for something.

        `edge` is the readiness mask that prompted the call: without CLOSING bits in it, a
        short read means the socket is empty and no EAGAIN read is needed (see poller.py).
        Called for any other reason (start, backlog cleared, pause over), it reads on to
        EAGAIN, since an edge may have been passed up meanwhile.
        """
        if self.eof or self.pending or self.in_pipe or self.paused or self.relay.closed:
            return
        if self.splicing:
            self._splice()
        else:
            self._copy(not edge & CLOSING)

    def push(self) -> None:
        """The destination became writable: flush the backlog, then read again."""
        if self.relay.closed:
            return
        if self.pending:
            self._flush()
        elif self.in_pipe and self._drain_pipe():
            self._backlog_cleared()

    def _allowance(self, wanted: int) -> int:
        """How many bytes the bandwidth cap lets this flow read now (0: it paused)."""
        bucket = self.bucket
        if bucket is None:
            return wanted
        available = bucket.available(time.monotonic())
        if available > 0:
            return min(wanted, available)
        self.paused = True
        self.relay.loop.call_later(bucket.wait_time(min(wanted, bucket.burst)), self._resume)
        return 0

    def _resume(self) -> None:
        self.paused = False
        self.pull()

    def _yield_turn(self) -> None:
        """Read enough for one turn: let other connections run, then go on."""
        self.relay.loop.call_soon(self.pull)

    # -- copy mode ------------------------------------------------------------------------

    def _copy(self, short_read_empties: bool) -> None:
        """Read and forward until the socket has nothing left (EAGAIN), an EOF or an error.

        Draining matters twice: the poller is edge-triggered, and when data and a reset
        arrive together the reset is only seen by reading past the data.
        """
        relay = self.relay
        buffer = relay.buffer
        for _ in range(_READS_PER_WAKEUP):
            if self.bucket is None:
                wanted = len(buffer.data)
            else:
                wanted = self._allowance(len(buffer.data))
                if not wanted:
                    return
            try:
                received = self.src.recv_into(buffer.data, wanted)
            except _RETRY:
                return
            except OSError:
                relay.abort(self.src)
                return
            if received == 0:
                self._on_eof()
                return
            if self.bucket is not None:
                self.bucket.consume(received)
            relay.last_activity = relay.loop.time()
            if self.download and relay.record.first_byte_mono is None:
                relay.record.first_byte_mono = time.monotonic()
            try:
                sent = self.dst.send(buffer.view[:received])
            except _RETRY:
                sent = 0
            except OSError:
                relay.abort(self.dst)
                return
            self.count += sent
            if sent < received:
                self.pending = buffer.view[sent:received].tobytes()
                return  # the destination's next writable edge calls push()
            if relay.mode == "auto" and self.count >= SPLICE_AFTER:
                self._start_splice()
                return
            if received < wanted and short_read_empties:
                return
        self._yield_turn()

    def _flush(self) -> None:
        relay = self.relay
        try:
            sent = self.dst.send(self.pending)
        except _RETRY:
            return
        except OSError:
            relay.abort(self.dst)
            return
        self.count += sent
        relay.last_activity = relay.loop.time()
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = b""
        if relay.mode == "auto" and self.count >= SPLICE_AFTER and not self.eof:
            self._start_splice()
        else:
            self._backlog_cleared()

    def _backlog_cleared(self) -> None:
        if self.eof:
            self._finish()
        else:
            self.pull()

    # -- splice mode ----------------------------------------------------------------------

    def _start_splice(self) -> None:
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.relay.mode = "copy"  # out of file descriptors: keep copying
            self.pull()
            return
        try:
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default 64 KiB pipe still works
        self.splicing = True
        self.pull()

    def _splice(self) -> None:
        """Splice until the socket has nothing left, an EOF or an error (see _copy)."""
        relay = self.relay
        for _ in range(_READS_PER_WAKEUP):
            wanted = self._allowance(_PIPE_SIZE)
            if not wanted:
                return
            try:
                moved = os.splice(self.src_fd, self.pipe_w, wanted, flags=_SPLICE_FLAGS)
            except _RETRY:
                return
            except OSError:
                relay.abort(self.src)
                return
            if moved == 0:
                self._on_eof()
                return
            if self.bucket is not None:
                self.bucket.consume(moved)
            relay.last_activity = relay.loop.time()
            if self.download and relay.record.first_byte_mono is None:
                relay.record.first_byte_mono = time.monotonic()
            self.in_pipe += moved
            if not self._drain_pipe():
                return  # the destination's next writable edge calls push()
        self._yield_turn()

    def _drain_pipe(self) -> bool:
        """Move the pipe's bytes to `dst`; True once the pipe is empty."""
        while self.in_pipe:
            try:
                moved = os.splice(self.pipe_r, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
            except _RETRY:
                return False
            except OSError:
                self.relay.abort(self.dst)
                return False
            self.in_pipe -= moved
            self.count += moved
        return True

    # -- end of stream --------------------------------------------------------------------

    def _on_eof(self) -> None:
        self.eof = True
        if self.relay.first_eof is None:
            self.relay.first_eof = self.src
        if not self.pending and not self.in_pipe:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side is already gone; the other flow will notice
        self.done = True
        self.relay.flow_done()

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class TcpRelay:
    """Both flows of one connection, its idle timer and its end."""

    __slots__ = (
        "buffer", "client", "closed", "down", "first_eof", "half_close_timeout",
        "idle_timeout", "last_activity", "loop", "mode", "on_close", "poller", "record",
        "timer", "up", "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        record: ConnectionRecord,
        *,
        poller: Poller,
        buffer: RelayBuffer,
        mode: RelayMode,
        idle_timeout: float,
        half_close_timeout: float,
        on_close: Callable[[TcpRelay, str], None],
    ) -> None:
        self.loop = loop
        self.poller = poller
        self.client = client
        self.upstream = upstream
        self.record = record
        self.buffer = buffer
        self.mode: RelayMode = mode if splice_supported() else "copy"
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.on_close = on_close
        self.up = _Flow(self, client, upstream, download=False)
        self.down = _Flow(self, upstream, client, download=True)
        self.first_eof: socket.socket | None = None
        self.closed = False
        self.last_activity = loop.time()
        self.timer: asyncio.TimerHandle | None = None

    def start(self, early_data: bytes = b"", *, client_empty: bool = False) -> None:
        """Begin relaying; `early_data` is what the client pipelined after its request.

        Both sources are read at once (edges that came during the handshake were consumed
        by it and will not be reported again), except the client's when the handshake
        knows it left the socket empty (`client_empty`).
        """
        loop = self.loop
        self.poller.redirect(self.up.src_fd, self._on_client_ready)  # both already watched
        self.poller.redirect(self.down.src_fd, self._on_upstream_ready)
        self.timer = loop.call_at(self.last_activity + self._check_every(), self._on_timer)
        if early_data:
            try:
                sent = self.upstream.send(early_data)
            except _RETRY:
                sent = 0
            except OSError:
                self.abort(self.upstream)
                return
            self.up.count += sent
            if sent < len(early_data):
                self.up.pending = early_data[sent:]
        if self.mode == "splice":
            self.up._start_splice()
            self.down._start_splice()
        else:
            if not client_empty:
                self.up.pull()
            self.down.pull()

    def _on_client_ready(self, mask: int) -> None:
        if mask & READABLE:
            self.up.pull(mask)
        if mask & WRITABLE:
            self.down.push()

    def _on_upstream_ready(self, mask: int) -> None:
        if mask & READABLE:
            self.down.pull(mask)
        if mask & WRITABLE:
            self.up.push()

    def _on_timer(self) -> None:
        """Check the idle (or, once half-closed, the shorter half-close) limit.

        The timer fires at least every min(idle, half-close) seconds, so a half-close needs
        no timer of its own: the next check already applies the shorter limit.
        """
        half_closed = self.up.done or self.down.done
        limit = self.half_close_timeout if half_closed else self.idle_timeout
        deadline = self.last_activity + limit
        now = self.loop.time()
        if now >= deadline:
            self.close("idle_timeout")
        else:
            self.timer = self.loop.call_at(min(deadline, now + self._check_every()),
                                           self._on_timer)

    def _check_every(self) -> float:
        return min(self.idle_timeout, self.half_close_timeout)

    def flow_done(self) -> None:
        """One direction has ended; close when both have."""
        if self.up.done and self.down.done:
            self.close("client" if self.first_eof is self.client else "destination")

    def abort(self, failed: socket.socket) -> None:
        """A socket reported an error: reset the other side too, so it sees no clean EOF."""
        other = self.upstream if failed is self.client else self.client
        try:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
        except OSError:
            pass
        self.close("client" if failed is self.client else "destination")

    def close(self, reason: str) -> None:
        """Stop both flows, release every descriptor, report once."""
        if self.closed:
            return
        self.closed = True
        self.poller.discard(self.client)
        self.poller.discard(self.upstream)
        self.up.close_pipe()
        self.down.close_pipe()
        if self.timer is not None:
            self.timer.cancel()
        self.record.bytes_out += self.up.count
        self.record.bytes_in += self.down.count
        self.on_close(self, reason)
