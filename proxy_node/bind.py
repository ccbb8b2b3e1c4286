"""BIND (RFC 1928 §4): wait for one inbound connection on the client's behalf.

The listening socket is bound on the address this host would use to reach DST.ADDR (the
address the application server is told to connect to), on a fresh port. When DST.ADDR is a
specific IP, or a name (resolved to its addresses), only a connection from one of those
addresses is taken; others are closed and the wait goes on.
"""

from __future__ import annotations

import asyncio
import socket

from proxy_node.errors import UpstreamTimeout
from proxy_node.request import plain_ip, sockaddr_for

__all__ = ["accept_one", "open_listener"]


def _route_source(ip: str, fallback: str) -> str:
    """The local address the kernel would use towards `ip` (a UDP connect sends nothing)."""
    family, addr = sockaddr_for(ip, 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            return str(probe.getsockname()[0])
    except OSError:
        return fallback


def open_listener(expected: frozenset[str] | None, control_local_ip: str) -> socket.socket:
    """A listening socket for the inbound connection the client expects: on the address
    that routes to the expected host (one of the control connection's family if any)."""
    host = control_local_ip
    if expected:
        v6 = ":" in control_local_ip
        target = min(expected, key=lambda ip: ((":" in ip) != v6, ip))
        host = _route_source(target, control_local_ip)
    family, addr = sockaddr_for(host, 0)
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind(addr)
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


async def accept_one(
    listener: socket.socket, expected: frozenset[str] | None, timeout: float
) -> tuple[socket.socket, str, int]:
    """The first inbound connection from an `expected` address (any when None), within
    `timeout`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            while True:
                sock, addr = await loop.sock_accept(listener)
                peer_ip = plain_ip(addr[0])
                if expected is None or peer_ip in expected:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return sock, peer_ip, addr[1]
                sock.close()
    except TimeoutError as exc:
        raise UpstreamTimeout(f"no inbound connection within {timeout:g} s") from exc
