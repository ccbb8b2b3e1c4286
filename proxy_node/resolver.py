"""Name resolution for destinations: asynchronous, with a timeout and a small positive cache.

getaddrinfo gives no TTL, so answers are kept for a fixed, configurable time (0 turns the
cache off); failures are never cached.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict
from typing import Protocol

from proxy_node.errors import ResolutionFailed

__all__ = ["CachingResolver", "Resolver", "SockAddr"]

SockAddr = tuple[int, tuple[str, int] | tuple[str, int, int, int]]


class Resolver(Protocol):
    """Turns a host name into addresses to try, in order."""

    async def resolve(self, host: str, port: int, *, udp: bool = False) -> list[SockAddr]:
        """(family, sockaddr) pairs; raise ResolutionFailed when there are none."""


class CachingResolver:
    """getaddrinfo on the loop's resolver threads, with a timeout and an LRU cache."""

    def __init__(self, *, timeout: float, ttl: float, size: int) -> None:
        self._timeout = timeout
        self._ttl = ttl
        self._size = size
        self._cache: OrderedDict[tuple[str, int, bool], tuple[float, list[SockAddr]]] = (
            OrderedDict()
        )

    async def resolve(self, host: str, port: int, *, udp: bool = False) -> list[SockAddr]:
        """Resolve `host`, trying the cache first."""
        key = (host, port, udp)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1]
        loop = asyncio.get_running_loop()
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        try:
            async with asyncio.timeout(self._timeout):
                infos = await loop.getaddrinfo(host, port, type=kind)
        except TimeoutError as exc:
            raise ResolutionFailed(f"resolving {host} timed out") from exc
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolutionFailed(f"cannot resolve {host}") from exc
        addresses: list[SockAddr] = [(family, addr) for family, _, _, _, addr in infos]
        if not addresses:
            raise ResolutionFailed(f"no addresses for {host}")
        if self._ttl > 0 and self._size > 0:
            self._cache[key] = (now + self._ttl, addresses)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return addresses
