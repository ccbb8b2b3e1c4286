"""Edge-triggered readiness for the proxy's TCP sockets: one registration per socket, from
accept (or connect) to close.

The event loop's own readers are added and removed each time a coroutine waits on a socket or
a relay switches direction: a short CONNECT cost about 18 `epoll_ctl` calls and as many
trips through the loop's Python-level bookkeeping. Here every socket is registered once,
edge-triggered for reading and writing, in an epoll set of our own whose descriptor the event
loop watches; closing the socket removes it. In exchange, a handler must read (or write)
until EAGAIN before it waits for the next edge, and must tolerate a spurious call.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["CLOSING", "READABLE", "WRITABLE", "Handler", "Poller"]

Handler = Callable[[int], None]

_EPOLLIN = getattr(select, "EPOLLIN", 0x001)
_EPOLLOUT = getattr(select, "EPOLLOUT", 0x004)
_EPOLLERR = getattr(select, "EPOLLERR", 0x008)
_EPOLLHUP = getattr(select, "EPOLLHUP", 0x010)
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_EPOLLET = getattr(select, "EPOLLET", 1 << 31)

_MASK = _EPOLLIN | _EPOLLOUT | _EPOLLRDHUP | _EPOLLET
# The bits after which a read (or a write) can make progress or will report the error.
READABLE = _EPOLLIN | _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR
WRITABLE = _EPOLLOUT | _EPOLLHUP | _EPOLLERR
# The peer closed or reset. Without these bits in the edge, a read shorter than asked for
# has emptied the socket (TCP returns all it has), and the next arrival brings a new edge;
# with them, the end may be waiting behind the data, so reading goes on to EOF or EAGAIN.
CLOSING = _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR
_BATCH = 256


class Poller:
    """Calls `handler(mask)` when a watched socket becomes readable or writable."""

    __slots__ = ("_epoll", "_handlers", "_log", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, log: Any = None) -> None:
        self._loop = loop
        self._log = log
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, fd: int, handler: Handler) -> None:
        """Register a socket that was just accepted, connected or opened, for `handler`.

        Always asks the kernel (a stale entry for a reused descriptor number must not
        leave a new socket unwatched)."""
        try:
            self._epoll.register(fd, _MASK)
        except FileExistsError:  # watched before and forgotten without a close
            self._epoll.modify(fd, _MASK)
        self._handlers[fd] = handler

    def redirect(self, fd: int, handler: Handler) -> None:
        """Deliver a watched socket's readiness to another handler (no syscall)."""
        if fd not in self._handlers:
            raise KeyError(f"descriptor {fd} is not watched")
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Stop delivering `fd`'s readiness (the kernel's registration stays until the
        socket is closed; `discard()` does both)."""
        self._handlers.pop(fd, None)

    def discard(self, sock: socket.socket) -> None:
        """Forget the socket, then close it (which removes the kernel's registration)."""
        fd = sock.fileno()
        if fd >= 0:
            self._handlers.pop(fd, None)
        sock.close()

    def close(self) -> None:
        """Stop watching everything."""
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._handlers.clear()

    def _dispatch(self) -> None:
        # Poll until nothing is left: a handler's own writes on loopback make other sockets
        # ready at once, and the event loop does not always report the epoll descriptor
        # again promptly when it stays readable.
        poll = self._epoll.poll
        handlers = self._handlers
        while True:
            try:
                events = poll(0, _BATCH)
            except (InterruptedError, ValueError):  # ValueError: closed during shutdown
                return
            if not events:
                return
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(mask)
                except Exception:  # one broken handler must not lose the batch's edges
                    if self._log is not None:
                        self._log.exception("readiness handler failed", fd=fd)
