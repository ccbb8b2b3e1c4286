"""CONNECT through a real proxy process with real clients: curl, python-socks, raw sockets.

IPv4, IPv6 and domain destinations; tens of MiB each way with a hash check in every relay
mode; half-close in both directions; handshakes pipelined with data or a byte at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from proxy_harness import (
    DEADLINE,
    HAS_IPV6,
    HTTP_BODY,
    ProxyProcess,
    TcpServer,
    bulk_data,
    read_until_eof,
)
from python_socks.async_.asyncio import Proxy

ServerFactory = Callable[..., Awaitable[TcpServer]]


# -- curl ---------------------------------------------------------------------------------

def _curl(curl: str, *args: str) -> tuple[bytes, int]:
    """Run curl; returns the body and the local port it used (from --write-out)."""
    marker = b"\n--local-port:"
    done = subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--max-time", "20",
         "--noproxy", "", "--output", "-", "--write-out", "\n--local-port:%{local_port}",
         *args],
        capture_output=True, timeout=30, check=False,
    )
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr.decode()}"
    body, _, port = done.stdout.rpartition(marker)
    return body, int(port)


async def test_curl_socks5_hostname_sends_the_name(
    proxy: ProxyProcess, http_server: tuple[str, int], curl: str
) -> None:
    _, http_port = http_server
    since = time.time()
    body, local_port = await asyncio.to_thread(
        _curl, curl, "--socks5-hostname", f"127.0.0.1:{proxy.port}",
        f"http://localhost:{http_port}/data",
    )
    assert body == HTTP_BODY
    event = await proxy.event_for(local_port, since=since)
    assert event["status"] == "ok"
    assert event["dest_host"] == "localhost"
    assert event["domain"] == "localhost"
    assert event["dest_ip"] == "127.0.0.1"
    assert event["dest_port"] == http_port
    assert event["bytes_in"] > len(HTTP_BODY)  # the body plus the response headers
    assert event["bytes_out"] > len("GET /data HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize("url_host", ["127.0.0.1", "localhost"])
async def test_curl_socks5_resolves_locally(
    proxy: ProxyProcess, http_server: tuple[str, int], curl: str, url_host: str
) -> None:
    _, http_port = http_server
    since = time.time()
    body, local_port = await asyncio.to_thread(
        _curl, curl, "--socks5", f"127.0.0.1:{proxy.port}",
        f"http://{url_host}:{http_port}/data",
    )
    assert body == HTTP_BODY
    event = await proxy.event_for(local_port, since=since)
    assert event["status"] == "ok"
    # curl resolved the name itself: the proxy saw an IP literal
    assert event["dest_host"] == "127.0.0.1"
    assert event["domain"] is None
    assert event["dest_ip"] == "127.0.0.1"


# -- python-socks ---------------------------------------------------------------------------

async def _python_socks_echo(proxy: ProxyProcess, host: str, port: int) -> dict[str, Any]:
    """Connect through python-socks, echo a message, close; returns the event."""
    since = time.time()
    client = Proxy.from_url(f"socks5://127.0.0.1:{proxy.port}", rdns=True)
    sock = await client.connect(host, port, timeout=DEADLINE)
    reader, writer = await asyncio.open_connection(sock=sock)
    local_port = writer.get_extra_info("sockname")[1]
    message = os.urandom(3000)
    writer.write(message)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(message)), DEADLINE) == message
    writer.write_eof()
    assert await read_until_eof(reader) == b""
    writer.close()
    await writer.wait_closed()
    return await proxy.event_for(int(local_port), since=since)


async def test_python_socks_ipv4(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    event = await _python_socks_echo(proxy, "127.0.0.1", echo_server.port)
    assert (event["dest_host"], event["domain"], event["dest_ip"]) == (
        "127.0.0.1", None, "127.0.0.1")
    assert (event["bytes_out"], event["bytes_in"]) == (3000, 3000)


async def test_python_socks_ipv6(proxy: ProxyProcess, echo_server6: TcpServer) -> None:
    event = await _python_socks_echo(proxy, "::1", echo_server6.port)
    assert (event["dest_host"], event["domain"], event["dest_ip"]) == ("::1", None, "::1")
    assert event["dest_port"] == echo_server6.port
    assert (event["bytes_out"], event["bytes_in"]) == (3000, 3000)


async def test_python_socks_domain(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    event = await _python_socks_echo(proxy, "localhost", echo_server.port)
    assert (event["dest_host"], event["domain"], event["dest_ip"]) == (
        "localhost", "localhost", "127.0.0.1")


async def test_domain_is_lowercased(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    tunnel = await proxy.open("LocalHost.", echo_server.port)
    assert await tunnel.roundtrip(b"x") == b"x"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert (event["dest_host"], event["domain"]) == ("localhost", "localhost")


async def test_reply_carries_the_address_the_proxy_used(
    proxy: ProxyProcess, echo_server: TcpServer
) -> None:
    """BND.ADDR/BND.PORT of the success reply: the proxy's end of the upstream connection."""
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await tunnel.roundtrip(b"ping") == b"ping"
    assert echo_server.peers == [(tunnel.reply.host, tunnel.reply.port)]
    await tunnel.close()


# -- bulk -------------------------------------------------------------------------------------

UP = DOWN = 32 * 1024 * 1024


async def _bulk(proxy: ProxyProcess, server: TcpServer, up: int = UP, down: int = DOWN) -> None:
    """`up` bytes up and `down` bytes down at once, both checked by sha256, plus the event."""
    tunnel = await proxy.open("127.0.0.1", server.port)
    data = memoryview(bulk_data())
    upload = data[len(data) - up:]  # not the same bytes as the download

    async def send() -> None:
        tunnel.writer.write(struct.pack("!QQ", up, down))
        for offset in range(0, up, 1 << 20):
            tunnel.writer.write(upload[offset:offset + (1 << 20)])
            await tunnel.writer.drain()
        tunnel.writer.write_eof()

    async def receive() -> tuple[bytes, bytes]:
        digest = hashlib.sha256()
        remaining = down
        while remaining:
            chunk = await tunnel.reader.read(min(remaining, 1 << 20))
            assert chunk, f"EOF with {remaining} download bytes missing"
            digest.update(chunk)
            remaining -= len(chunk)
        trailer = await tunnel.reader.readexactly(32)
        assert await tunnel.reader.read() == b""
        return digest.digest(), trailer

    async with asyncio.timeout(60):
        _, (down_digest, server_digest) = await asyncio.gather(send(), receive())
    assert down_digest == hashlib.sha256(data[:down]).digest(), "download corrupted"
    assert server_digest == hashlib.sha256(upload).digest(), "upload corrupted"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["bytes_out"] == 16 + up
    assert event["bytes_in"] == down + 32
    assert event["status"] == "ok"
    assert event["close_reason"] == "client"


async def test_bulk_both_ways_relay_auto(proxy: ProxyProcess, bulk_server: TcpServer) -> None:
    await _bulk(proxy, bulk_server)


@pytest.mark.parametrize("mode", ["copy", "splice"])
async def test_bulk_both_ways_relay_mode(
    proxy_factory: Callable[..., ProxyProcess], bulk_server: TcpServer, mode: str
) -> None:
    proxy = proxy_factory({"proxy": {"relay": mode}})
    await _bulk(proxy, bulk_server)


async def test_bulk_one_way_each(proxy: ProxyProcess, bulk_server: TcpServer) -> None:
    """Download only, then upload only: each flow on its own switches mode correctly."""
    await _bulk(proxy, bulk_server, up=0, down=8 << 20)
    await _bulk(proxy, bulk_server, up=8 << 20, down=0)


@pytest.mark.parametrize("mode", ["copy", "splice"])
async def test_stalled_readers_on_both_ends(
    proxy_factory: Callable[..., ProxyProcess], tcp_server: ServerFactory, mode: str
) -> None:
    """Backlogs both ways: the destination stops reading while the client uploads, and the
    client stops reading while the destination answers. With edge-triggered readiness the
    proxy gets no second notice for bytes it left unread, so both flows must pick up again
    by themselves once the stalled side reads."""
    size = 12 << 20
    data = bytes(memoryview(bulk_data())[:size])

    async def stall_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)  # the proxy's send buffer to us fills up meanwhile
        received = await reader.readexactly(size)
        writer.write(received)
        await writer.drain()
        writer.close()

    server = await tcp_server(stall_then_echo)
    proxy = proxy_factory({"proxy": {"relay": mode}})
    tunnel = await proxy.open("127.0.0.1", server.port)
    async with asyncio.timeout(60):
        tunnel.writer.write(data)
        await tunnel.writer.drain()
        await asyncio.sleep(0.5)  # now the answer backs up in the proxy too
        echoed = await tunnel.reader.readexactly(size)
        assert await tunnel.reader.read() == b""
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert (event["bytes_out"], event["bytes_in"]) == (size, size)
    assert event["close_reason"] == "destination"


# -- half-close -------------------------------------------------------------------------------

async def _answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the whole request (to EOF), then answer with its length and hash."""
    data = await reader.read()
    writer.write(struct.pack("!Q", len(data)) + hashlib.sha256(data).digest())
    await writer.drain()


async def test_client_half_close_still_gets_the_answer(
    proxy: ProxyProcess, tcp_server: ServerFactory
) -> None:
    server = await tcp_server(_answer_after_eof)
    tunnel = await proxy.open("127.0.0.1", server.port)
    request = os.urandom(200_000)
    tunnel.writer.write(request)
    tunnel.writer.write_eof()
    answer = await read_until_eof(tunnel.reader)
    assert answer == struct.pack("!Q", len(request)) + hashlib.sha256(request).digest()
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert (event["bytes_out"], event["bytes_in"]) == (len(request), 40)
    assert event["close_reason"] == "client"


async def test_destination_half_close_client_can_still_send(
    proxy: ProxyProcess, tcp_server: ServerFactory
) -> None:
    async def speak_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"server speaks first")
        await writer.drain()
        writer.write_eof()
        server.results.append(await reader.read())

    server = await tcp_server(speak_first)
    tunnel = await proxy.open("127.0.0.1", server.port)
    assert await read_until_eof(tunnel.reader) == b"server speaks first"
    late = os.urandom(100_000)  # sent after the destination's half-close reached the client
    tunnel.writer.write(late)
    await tunnel.writer.drain()
    tunnel.writer.write_eof()
    event = await proxy.event_for(tunnel.local_port)
    assert server.results == [late]
    assert (event["bytes_out"], event["bytes_in"]) == (len(late), len(b"server speaks first"))
    assert event["close_reason"] == "destination"
    await tunnel.close()


# -- handshake framing ------------------------------------------------------------------------

async def test_pipelined_handshake_and_data(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    """Greeting, request and data in a single send: the data is relayed, not misparsed."""
    early = b"\x05\x01\x00early bytes that look like a greeting"
    tunnel = await proxy.open("127.0.0.1", echo_server.port, style="pipelined", early=early)
    assert await asyncio.wait_for(tunnel.reader.readexactly(len(early)), DEADLINE) == early
    assert await tunnel.roundtrip(b"after") == b"after"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["bytes_out"] == event["bytes_in"] == len(early) + 5


async def test_pipelined_handshake_with_a_large_payload(
    proxy: ProxyProcess, echo_server: TcpServer
) -> None:
    early = os.urandom(3 << 20)
    tunnel = await proxy.open("127.0.0.1", echo_server.port, style="pipelined", early=early)
    tunnel.writer.write_eof()
    assert await read_until_eof(tunnel.reader) == early
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["bytes_out"] == event["bytes_in"] == len(early)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_byte_at_a_time_handshake(
    proxy: ProxyProcess, echo_server: TcpServer, host: str
) -> None:
    tunnel = await proxy.open(host, echo_server.port, style="bytewise")
    assert await tunnel.roundtrip(b"slow handshake") == b"slow handshake"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["status"] == "ok"
    assert event["bytes_out"] == len(b"slow handshake")


async def test_connect_over_an_ipv6_listener(
    proxy_factory: Callable[..., ProxyProcess], echo_server: TcpServer
) -> None:
    if not HAS_IPV6:
        pytest.skip("no ::1 on this machine")
    proxy = proxy_factory(listen="[::1]:0")
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert tunnel.reply.host == "127.0.0.1"  # the upstream side is IPv4
    assert await tunnel.roundtrip(b"six to four") == b"six to four"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert (event["source_ip"], event["dest_ip"]) == ("::1", "127.0.0.1")
