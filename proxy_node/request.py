"""The request phase: what the client asked for, and reaching it (CONNECT's dialer).

`destination()` is pure: it turns the request's address into the event's `dest_host` and
`domain` (lower-cased, IDNA) and tells whether a name must be resolved. `dial()` resolves,
asks the rule set, and connects, trying each address in turn within one timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

import idna

from proxy_node.errors import (
    ResolutionFailed,
    UpstreamError,
    UpstreamTimeout,
    translate_os_error,
)
from proxy_node.poller import WRITABLE, Poller
from proxy_node.resolver import Resolver, SockAddr
from proxy_node.rules import RuleSet
from proxy_node.wire import AddressType, Request

__all__ = ["Destination", "destination", "dial", "plain_ip", "resolve_allowed", "sockaddr_for"]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where the client wants to go: `host` is a canonical IP or an ASCII domain."""

    host: str
    port: int
    is_domain: bool


def plain_ip(address: str) -> str:
    """An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, or `::ffff:102:304` as Python spells
    it) as plain IPv4; any other address unchanged."""
    if address.startswith("::ffff:"):
        if "." in address:
            return address[7:]
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return address


def destination(request: Request) -> Destination:
    """Normalize the requested address; raise ResolutionFailed for an unusable name."""
    if request.address_type != AddressType.DOMAINNAME:
        return Destination(plain_ip(request.host), request.port, False)
    name = request.host.rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id is not None:
                # `fe80::1%eth0` names an interface of the proxy's host: not a destination.
                raise ResolutionFailed("a scoped IPv6 address is not a destination")
            ip = ip.ipv4_mapped or ip  # already parsed: no need for plain_ip's text check
        return Destination(str(ip), request.port, False)
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ResolutionFailed(f"not a valid internationalized name: {exc}") from exc
    if not name or len(name) > 253:
        raise ResolutionFailed("not a valid host name")
    return Destination(name, request.port, True)


def sockaddr_for(ip: str, port: int) -> SockAddr:
    """The (family, sockaddr) of an IP literal."""
    if ":" in ip:
        return socket.AF_INET6, (ip, port, 0, 0)
    return socket.AF_INET, (ip, port)


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


class _Expired(Exception):
    """The dial's deadline passed (kept apart from OSError: TimeoutError is one)."""


class _Deadline:
    """One timer for a whole dial; wakes the connect being waited on when it fires."""

    __slots__ = ("expired", "waiter")

    def __init__(self) -> None:
        self.expired = False
        self.waiter: asyncio.Future[int] | None = None

    def fire(self) -> None:
        self.expired = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Expired())

    def wake(self, mask: int) -> None:
        """The poller's handler while connecting."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(mask)


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple[Any, ...],
                   deadline: _Deadline, poller: Poller) -> None:
    """Connect a non-blocking socket, left watched by `poller`; OSError on failure."""
    if deadline.expired:
        raise _Expired
    try:
        sock.connect(addr)
        connected = True
    except (BlockingIOError, InterruptedError):
        connected = False
    # Watched only now: registering reports the current state, so an edge that came
    # before this line is not lost.
    poller.watch(sock.fileno(), deadline.wake)
    if connected:
        return
    while True:
        waiter = deadline.waiter = loop.create_future()
        try:
            mask = await waiter
        finally:
            deadline.waiter = None
        if mask & WRITABLE:
            break
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def resolve_allowed(command: str, host: str, port: int, *, resolver: Resolver,
                          rules: RuleSet) -> list[SockAddr]:
    """The addresses of a name the rules let `command` use: the name is judged before any
    DNS query, then each address it resolves to (ConnectionNotAllowed when none is left)."""
    rules.check_domain(command, host, port)
    candidates = await resolver.resolve(host, port)
    return rules.allowed_addresses(command, host, port, candidates)


async def dial(
    dest: Destination,
    *,
    resolver: Resolver,
    rules: RuleSet,
    timeout: float,
    poller: Poller,
    command: str = "connect",
) -> tuple[socket.socket, str]:
    """A connected non-blocking TCP socket to `dest` (watched by `poller`) and the IP it is
    connected to, or an UpstreamError. One timer bounds the connection attempts (not the
    DNS lookup)."""
    loop = asyncio.get_running_loop()
    if dest.is_domain:
        candidates = await resolve_allowed(command, dest.host, dest.port, resolver=resolver,
                                           rules=rules)
    else:
        candidates = rules.allowed_addresses(command, None, dest.port,
                                             [sockaddr_for(dest.host, dest.port)])
    failure: UpstreamError | None = None
    deadline = _Deadline()
    timer = loop.call_at(loop.time() + timeout, deadline.fire)
    tried: str | None = None
    try:
        for family, addr in candidates:
            tried = addr[0]
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            try:
                if not _NONBLOCK:
                    sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await _connect(loop, sock, addr, deadline, poller)
            except OSError as exc:
                poller.discard(sock)
                failure = translate_os_error(exc)
                failure.address = plain_ip(tried)
                continue
            except BaseException:
                poller.discard(sock)
                raise
            if family == socket.AF_INET:  # the address text is already canonical
                return sock, addr[0]
            try:  # IPv6 text comes in many spellings: the kernel's is canonical
                return sock, plain_ip(sock.getpeername()[0])
            except BaseException:
                poller.discard(sock)
                raise
    except _Expired:
        timed_out = UpstreamTimeout(f"no connection within {timeout:g} s")
        timed_out.address = None if tried is None else plain_ip(tried)
        raise timed_out from TimeoutError()
    finally:
        timer.cancel()
    assert failure is not None
    raise failure
