"""BIND (RFC 1928 §4): wait for one inbound connection on the client's behalf.

The listening socket is bound on the address this host would use to reach DST.ADDR (the
address the application server is told to connect to), on a fresh port. When DST.ADDR is a
specific IP, only a connection from that IP is taken; others are closed and the wait goes on.
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


def open_listener(expected_ip: str | None, control_local_ip: str) -> socket.socket:
    """A listening socket for the inbound connection the client expects."""
    host = control_local_ip
    if expected_ip is not None:
        host = _route_source(expected_ip, control_local_ip)
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
    listener: socket.socket, expected_ip: str | None, timeout: float
) -> tuple[socket.socket, str, int]:
    """The first inbound connection from `expected_ip` (any when None), within `timeout`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            while True:
                sock, addr = await loop.sock_accept(listener)
                peer_ip = plain_ip(addr[0])
                if expected_ip is None or peer_ip == expected_ip:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return sock, peer_ip, addr[1]
                sock.close()
    except TimeoutError as exc:
        raise UpstreamTimeout(f"no inbound connection within {timeout:g} s") from exc
