"""Error replies, malformed and stalled handshakes, resets: raw sockets, loopback only.

Each REP code is provoked for real (a closed port, a full accept queue, a name under
.invalid, a multicast address) and checked on the wire and in the event; after every bad
client the proxy must still serve a good one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from loopback import full_accept_queue
from proxy_harness import (
    CONNECT,
    DEADLINE,
    ProxyProcess,
    TcpServer,
    greeting,
    is_closed_by_peer,
    poll,
    read_reply,
    socks_request,
)

ServerFactory = Callable[..., Awaitable[TcpServer]]


async def _assert_still_serving(proxy: ProxyProcess, echo: TcpServer) -> None:
    tunnel = await proxy.open("127.0.0.1", echo.port)
    assert await tunnel.roundtrip(b"still serving") == b"still serving"
    await tunnel.close()


async def _request_raw(proxy: ProxyProcess, request: bytes) -> tuple[int, int, float]:
    """Greeting + `request`; returns (REP, client port, seconds until the reply)."""
    reader, writer = await proxy.raw()
    try:
        writer.write(greeting(b"\x00"))
        assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x00"
        started = time.monotonic()
        writer.write(request)
        reply = await asyncio.wait_for(read_reply(reader), DEADLINE)
        elapsed = time.monotonic() - started
        assert await is_closed_by_peer(reader), "the proxy must close after a failure reply"
        return reply.rep, int(writer.get_extra_info("sockname")[1]), elapsed
    finally:
        writer.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (held bound, so no one else can take it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_connection_refused(
    proxy: ProxyProcess, echo_server: TcpServer, closed_port: int
) -> None:
    rep, port, _ = await _request_raw(proxy, socks_request(CONNECT, "127.0.0.1", closed_port))
    assert rep == 0x05
    event = await proxy.event_for(port)
    assert (event["status"], event["reply_code"]) == ("refused", 5)
    assert (event["dest_host"], event["dest_port"], event["domain"]) == (
        "127.0.0.1", closed_port, None)
    assert event["dest_ip"] == "127.0.0.1"  # the address tried, even though it refused
    assert event["close_reason"] == "error"
    assert event["connect_ms"] is None and event["ttfb_ms"] is None
    assert (event["bytes_out"], event["bytes_in"]) == (0, 0)
    await _assert_still_serving(proxy, echo_server)


async def test_connection_refused_by_name(proxy: ProxyProcess, closed_port: int) -> None:
    rep, port, _ = await _request_raw(proxy, socks_request(CONNECT, "localhost", closed_port))
    assert rep == 0x05
    event = await proxy.event_for(port)
    assert (event["status"], event["domain"]) == ("refused", "localhost")


async def test_unsupported_command(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    rep, port, _ = await _request_raw(proxy, b"\x05\x04\x00" + b"\x01\x7f\x00\x00\x01\x00\x50")
    assert rep == 0x07
    event = await proxy.event_for(port)
    assert (event["status"], event["reply_code"]) == ("error", 7)
    await _assert_still_serving(proxy, echo_server)


async def test_unsupported_address_type(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    rep, port, _ = await _request_raw(proxy, b"\x05\x01\x00\x02" + b"\x00" * 6)
    assert rep == 0x08
    event = await proxy.event_for(port)
    assert (event["status"], event["reply_code"]) == ("error", 8)
    await _assert_still_serving(proxy, echo_server)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",  # VER 4 in the request
        b"\x05\x01\x00\x03\x00\x00\x50",  # a domain name of length 0
    ],
    ids=["bad-version", "empty-domain"],
)
async def test_malformed_request_is_a_general_failure(
    proxy: ProxyProcess, echo_server: TcpServer, request_bytes: bytes
) -> None:
    rep, port, _ = await _request_raw(proxy, request_bytes)
    assert rep == 0x01
    event = await proxy.event_for(port)
    assert (event["status"], event["reply_code"]) == ("error", 1)
    await _assert_still_serving(proxy, echo_server)


async def test_unresolvable_name_is_host_unreachable(proxy: ProxyProcess) -> None:
    # RFC 6761: .invalid never resolves; check the resolver agrees, and fails fast
    started = time.monotonic()
    with pytest.raises(socket.gaierror):
        await asyncio.get_running_loop().getaddrinfo("nonexistent.invalid", 80)
    if time.monotonic() - started > 2:
        pytest.skip("this machine's resolver is too slow to fail for .invalid")
    rep, port, elapsed = await _request_raw(
        proxy, socks_request(CONNECT, "nonexistent.invalid", 80))
    assert rep == 0x04
    assert elapsed < 5  # within dns_timeout
    event = await proxy.event_for(port)
    assert (event["status"], event["reply_code"]) == ("dns_failed", 4)
    assert (event["dest_host"], event["domain"], event["dest_ip"]) == (
        "nonexistent.invalid", "nonexistent.invalid", None)


async def test_multicast_destination_is_network_unreachable(proxy: ProxyProcess) -> None:
    # Linux refuses a TCP connect to a multicast address locally (ENETUNREACH): no packet
    # leaves the machine. Check that here before asking the proxy to do it.
    with socket.socket() as probe:
        probe.setblocking(False)
        code = probe.connect_ex(("224.0.0.1", 9))
    if code != errno.ENETUNREACH:
        pytest.skip(f"connect to 224.0.0.1 gives {errno.errorcode.get(code, code)} here")
    rep, port, _ = await _request_raw(proxy, socks_request(CONNECT, "224.0.0.1", 9))
    assert rep == 0x03
    event = await proxy.event_for(port)
    assert (event["status"], event["reply_code"]) == ("unreachable", 3)
    assert (event["dest_ip"], event["dest_port"]) == ("224.0.0.1", 9)


async def test_connect_timeout_is_ttl_expired(
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    proxy = proxy_factory({"proxy": {"connect_timeout": 0.5}})
    with full_accept_queue() as port:
        with socket.socket() as probe:
            probe.settimeout(0.3)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                pass
            else:
                pytest.skip("a full accept queue does not stall connects here")
        rep, client_port, elapsed = await _request_raw(
            proxy, socks_request(CONNECT, "127.0.0.1", port))
    assert rep == 0x06
    assert 0.4 <= elapsed < 5
    event = await proxy.event_for(client_port)
    assert (event["status"], event["reply_code"]) == ("timeout", 6)
    assert (event["dest_ip"], event["dest_port"]) == ("127.0.0.1", port)


# -- bad handshakes ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00",  # SOCKS4
        b"\x05",  # truncated greeting
        b"\x05\x02\x00",  # greeting missing a method
        b"\x05\x01\x00\x05\x01\x00\x01\x7f",  # truncated request
        os.urandom(65536),
        b"\x00" * 1024,
    ],
    ids=["http", "socks4", "trunc-greeting", "short-methods", "trunc-request", "random",
         "zeros"],
)
async def test_garbage_and_truncated_handshakes(
    proxy: ProxyProcess, echo_server: TcpServer, payload: bytes
) -> None:
    reader, writer = await proxy.raw()
    port = writer.get_extra_info("sockname")[1]
    with contextlib.suppress(OSError):  # the proxy may reset before the client is done
        writer.write(payload)
        writer.write_eof()
    # whatever the proxy answers (a method selection, a failure reply), it then closes
    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    event = await proxy.event_for(port)
    assert event["status"] != "ok"
    assert event["close_reason"] in ("client", "error")
    assert (event["bytes_out"], event["bytes_in"]) == (0, 0)
    await _assert_still_serving(proxy, echo_server)


async def test_zero_methods_offered(proxy: ProxyProcess) -> None:
    reader, writer = await proxy.raw()
    writer.write(b"\x05\x00")
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\xff"
    assert await is_closed_by_peer(reader)
    writer.close()


async def test_stalled_clients_time_out_while_others_are_served(
    proxy_factory: Callable[..., ProxyProcess], echo_server: TcpServer
) -> None:
    proxy = proxy_factory({"proxy": {"handshake_timeout": 0.5}})
    silent = await proxy.raw()
    half_greeting = await proxy.raw()
    half_greeting[1].write(b"\x05\x02")
    half_request = await proxy.raw()
    half_request[1].write(greeting(b"\x00") + socks_request(CONNECT, "127.0.0.1", 80)[:5])
    stalled = [silent, half_greeting, half_request]
    started = time.monotonic()
    # the stalled ones do not hold up anyone else
    for _ in range(5):
        await _assert_still_serving(proxy, echo_server)
    assert time.monotonic() - started < 0.5, "other clients were held up by stalled ones"
    assert await asyncio.wait_for(half_request[0].readexactly(2), DEADLINE) == b"\x05\x00"
    for reader, _ in stalled:
        assert await is_closed_by_peer(reader)
    assert time.monotonic() - started >= 0.4
    for _, writer in stalled:
        port = writer.get_extra_info("sockname")[1]
        writer.close()
        event = await proxy.event_for(port)
        assert event["status"] == "timeout"
        assert event["close_reason"] == "idle_timeout"
        assert event["reply_code"] is None
    await _assert_still_serving(proxy, echo_server)


# -- resets in the middle of a relay --------------------------------------------------------------
# The reset follows the data at once, so the proxy often finds data and reset in one wake-up.
# Several connections each: a proxy that loses the reset some of the time fails here.

ROUNDS = 6


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture(params=["auto", "splice"])
def relay_proxy(request: pytest.FixtureRequest, proxy: ProxyProcess,
                proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    """The shared proxy (relay: auto, copying small flows) and one that splices at once."""
    if request.param == "auto":
        return proxy
    return proxy_factory({"proxy": {"relay": request.param}})


async def test_client_reset_mid_relay(relay_proxy: ProxyProcess,
                                      tcp_server: ServerFactory) -> None:
    proxy = relay_proxy
    seen: dict[int, list[bytes]] = {}

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks = seen.setdefault(writer.get_extra_info("peername")[1], [])
        writer.write(b"hello")
        try:
            while data := await reader.read(65536):
                chunks.append(data)
        finally:
            chunks.append(b"<closed>")

    server = await tcp_server(sink)

    async def one() -> None:
        tunnel = await proxy.open("127.0.0.1", server.port)
        local_port = tunnel.local_port
        assert await asyncio.wait_for(tunnel.reader.readexactly(5), DEADLINE) == b"hello"
        tunnel.writer.write(b"some data")
        _reset(tunnel.writer)  # data and reset leave together
        event = await proxy.event_for(local_port)
        assert event["close_reason"] == "client"
        assert event["bytes_in"] == 5
        assert event["bytes_out"] in (0, len(b"some data"))  # a reset may discard the data
        chunks = seen[tunnel.reply.port]
        await poll(lambda: chunks and chunks[-1] == b"<closed>",
                   what="the destination side to be closed")

    await asyncio.gather(*(one() for _ in range(ROUNDS)))


async def test_destination_reset_mid_relay(
    relay_proxy: ProxyProcess, tcp_server: ServerFactory
) -> None:
    proxy = relay_proxy
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"pong")
        _reset(writer)  # data and reset leave together

    server = await tcp_server(resetter)

    async def one() -> None:
        tunnel = await proxy.open("127.0.0.1", server.port)
        try:
            tunnel.writer.write(b"ping")
            got = b""
            with contextlib.suppress(ConnectionResetError):
                got = await asyncio.wait_for(tunnel.reader.read(), DEADLINE)
            assert got in (b"pong", b"")  # a reset may overtake the data; no hang either way
            event = await proxy.event_for(tunnel.local_port)
            assert event["close_reason"] == "destination"
            assert event["bytes_out"] == 4
        finally:
            await tunnel.close()

    await asyncio.gather(*(one() for _ in range(ROUNDS)))
