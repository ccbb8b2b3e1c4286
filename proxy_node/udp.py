"""UDP ASSOCIATE (RFC 1928 §7): a datagram relay tied to its TCP control connection.

The client-facing socket is bound on the control connection's local address (that is the
BND.ADDR the client is told). Datagrams on it are accepted only from the client's address
(and from the port it announced, or else the first one it uses); fragments (FRAG != 0) and
malformed headers are dropped. Outbound datagrams leave from a separate socket per address
family, and only answers from a destination the client has sent to come back (an
address-and-port-dependent filter, like a careful NAT). The association ends with its
control connection or after an idle timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time

from proxy_node.errors import ProxyError
from proxy_node.events import ConnectionRecord
from proxy_node.request import plain_ip, sockaddr_for
from proxy_node.resolver import Resolver
from proxy_node.rules import RuleSet
from proxy_node.wire import AddressType, WireError, encode_udp_header, parse_udp_header

__all__ = ["UdpAssociation"]

_MAX_DATAGRAM = 65535
_RETRY = (BlockingIOError, InterruptedError)


class UdpAssociation:
    """One client's UDP relay."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        bind_ip: str,
        client_ip: str,
        client_port: int | None,
        record: ConnectionRecord,
        resolver: Resolver,
        rules: RuleSet,
        idle_timeout: float,
    ) -> None:
        self.loop = loop
        family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
        self.client_sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.client_sock.setblocking(False)
            self.client_sock.bind((bind_ip, 0))
        except BaseException:
            self.client_sock.close()  # the session answers the request with 0x01
            raise
        self.client_ip = plain_ip(client_ip)
        self.client_port = client_port
        self.client_addr: tuple[str, int] | None = None
        self.record = record
        self.resolver = resolver
        self.rules = rules
        self.idle_timeout = idle_timeout
        self.last_activity = loop.time()
        self.outbound: dict[int, socket.socket] = {}
        self.peers: set[tuple[str, int]] = set()
        self.dropped = 0
        self.closed: asyncio.Future[str] = loop.create_future()
        self.pending: set[asyncio.Task[None]] = set()

    @property
    def bound(self) -> tuple[str, int]:
        """BND.ADDR and BND.PORT for the reply."""
        host, port = self.client_sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Begin relaying datagrams."""
        self.loop.add_reader(self.client_sock.fileno(), self._on_client_datagram)
        self.loop.call_at(self.last_activity + self.idle_timeout, self._on_timer)

    async def wait_closed(self) -> str:
        """The close reason once the association is over."""
        return await self.closed

    def close(self, reason: str) -> None:
        """Release the sockets; idempotent."""
        if self.closed.done():
            return
        for sock in (self.client_sock, *self.outbound.values()):
            self.loop.remove_reader(sock.fileno())
            sock.close()
        for task in self.pending:
            task.cancel()
        self.closed.set_result(reason)

    def _on_timer(self) -> None:
        if self.closed.done():
            return
        deadline = self.last_activity + self.idle_timeout
        if self.loop.time() >= deadline:
            self.close("idle_timeout")
        else:
            self.loop.call_at(deadline, self._on_timer)

    def _from_client(self, addr: tuple[str, int]) -> bool:
        ip, port = plain_ip(addr[0]), addr[1]
        if ip != self.client_ip:
            return False
        if self.client_addr is None:
            if self.client_port and port != self.client_port:
                return False
            self.client_addr = (addr[0], port)
        return (addr[0], port) == self.client_addr

    def _on_client_datagram(self) -> None:
        for _ in range(64):
            try:
                datagram, addr = self.client_sock.recvfrom(_MAX_DATAGRAM)
            except _RETRY:
                return
            except OSError:
                return  # ICMP errors surface here; the association goes on
            if not self._from_client(addr):
                self.dropped += 1
                continue
            try:
                header = parse_udp_header(datagram)
            except WireError:
                self.dropped += 1
                continue
            if header.fragment != 0:
                self.dropped += 1  # RFC 1928 allows dropping instead of reassembling
                continue
            self.last_activity = self.loop.time()
            payload = datagram[header.length :]
            if header.address_type == AddressType.DOMAINNAME:
                task = self.loop.create_task(self._resolve_and_send(header.host, header.port,
                                                                    payload))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)
            else:
                self._send(header.host, header.host, header.port, payload)

    async def _resolve_and_send(self, host: str, port: int, payload: bytes) -> None:
        name = host.lower().rstrip(".")
        try:
            self.rules.check_domain("udp_associate", name, port)  # before any DNS query
            addresses = await self.resolver.resolve(name, port, udp=True)
            allowed = self.rules.allowed_addresses("udp_associate", name, port, addresses)
        except ProxyError:  # not resolved, or denied
            self.dropped += 1
            return
        self._send(name, allowed[0][1][0], port, payload)

    def _send(self, host: str, ip: str, port: int, payload: bytes) -> None:
        ip = plain_ip(ip)
        try:
            self.rules.check_destination("udp_associate", host, ip, port)
        except ProxyError:
            self.dropped += 1
            return
        family, addr = sockaddr_for(ip, port)
        try:
            sock = self.outbound.get(family) or self._open_outbound(family)
            sock.sendto(payload, addr)
        except OSError:  # no socket for this family (no descriptor, no IPv6), or no route
            self.dropped += 1  # RFC 1928 §7: what cannot be relayed is dropped
            return
        self.peers.add((ip, port))
        record = self.record
        if record.dest_ip is None:
            record.dest_host, record.dest_ip, record.dest_port = host, ip, port
            record.domain = host if host != ip else None
        record.bytes_out += len(payload)

    def _open_outbound(self, family: int) -> socket.socket:
        """The socket datagrams to `family` leave from, made on first use."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except BaseException:
            sock.close()
            raise
        self.outbound[family] = sock
        self.loop.add_reader(sock.fileno(), self._on_remote_datagram, sock)
        return sock

    def _on_remote_datagram(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                payload, addr = sock.recvfrom(_MAX_DATAGRAM)
            except _RETRY:
                return
            except OSError:
                return
            ip, port = plain_ip(addr[0]), addr[1]
            if (ip, port) not in self.peers or self.client_addr is None:
                self.dropped += 1
                continue
            now = self.loop.time()
            self.last_activity = now
            if self.record.first_byte_mono is None:
                self.record.first_byte_mono = time.monotonic()
            try:
                self.client_sock.sendto(encode_udp_header(ip, port) + payload, self.client_addr)
            except OSError:
                self.dropped += 1
                continue
            self.record.bytes_in += len(payload)
