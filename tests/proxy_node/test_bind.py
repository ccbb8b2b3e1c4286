"""BIND against a real proxy process: two replies, an inbound connection, relaying."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from proxy_harness import (
    BIND,
    DEADLINE,
    HAS_IPV6,
    ProxyProcess,
    is_closed_by_peer,
    read_until_eof,
)


async def test_bind_accepts_one_inbound_connection_and_relays(proxy: ProxyProcess) -> None:
    control = await proxy.request(BIND, "127.0.0.1", 0)
    first = control.reply
    assert first.rep == 0
    assert first.host == "127.0.0.1"  # where the application server can reach the proxy
    assert first.port != 0

    # the "application server" connects to the announced address
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(first.host, first.port), DEADLINE)
    inbound_addr = writer.get_extra_info("sockname")
    second = await control.read_reply()
    assert second.rep == 0
    assert (second.host, second.port) == (inbound_addr[0], inbound_addr[1])

    to_server = os.urandom(150_000)
    to_client = os.urandom(70_000)
    control.writer.write(to_server)
    writer.write(to_client)
    await asyncio.gather(control.writer.drain(), writer.drain())
    got_server = await asyncio.wait_for(reader.readexactly(len(to_server)), DEADLINE)
    got_client = await asyncio.wait_for(control.reader.readexactly(len(to_client)), DEADLINE)
    assert (got_server, got_client) == (to_server, to_client)

    # the inbound side closes first; the client still gets the EOF and may answer
    writer.write_eof()
    assert await read_until_eof(control.reader) == b""
    control.writer.write(b"bye")
    control.writer.write_eof()
    assert await read_until_eof(reader) == b"bye"
    writer.close()
    await control.close()

    event = await proxy.event_for(control.local_port)
    assert event["command"] == "bind"
    assert event["protocol"] == "tcp"
    assert (event["status"], event["reply_code"]) == ("ok", 0)
    assert (event["dest_ip"], event["dest_port"]) == (inbound_addr[0], inbound_addr[1])
    assert event["bytes_out"] == len(to_server) + 3
    assert event["bytes_in"] == len(to_client)
    assert event["close_reason"] == "destination"


async def test_bind_timeout_sends_ttl_expired(
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    proxy = proxy_factory({"proxy": {"bind_timeout": 0.3}})
    control = await proxy.request(BIND, "127.0.0.1", 0)
    assert control.reply.rep == 0
    second = await control.read_reply()
    assert second.rep == 0x06  # TTL expired: nobody connected in time
    assert await is_closed_by_peer(control.reader)
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["status"], event["reply_code"]) == ("timeout", 6)
    assert event["duration_ms"] >= 300


async def test_bind_takes_only_one_connection(proxy: ProxyProcess) -> None:
    """Once the inbound connection is accepted, the listening port is closed."""
    control = await proxy.request(BIND, "localhost", 0)
    assert control.reply.rep == 0
    announced = (control.reply.host, control.reply.port)
    _, writer = await asyncio.wait_for(asyncio.open_connection(*announced), DEADLINE)
    second = await control.read_reply()
    assert second.rep == 0 and second.host == "127.0.0.1"
    try:
        late = await asyncio.wait_for(asyncio.open_connection(*announced), DEADLINE)
    except ConnectionRefusedError:
        pass
    else:
        late[1].close()
        raise AssertionError("a second inbound connection was accepted")
    writer.close()
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["command"], event["dest_host"], event["domain"]) == (
        "bind", "localhost", "localhost")


async def test_bind_over_an_ipv6_control_connection(
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    if not HAS_IPV6:
        pytest.skip("no ::1 on this machine")
    proxy = proxy_factory(listen="[::1]:0")
    control = await proxy.request(BIND, "::1", 0)
    assert (control.reply.rep, control.reply.host) == (0, "::1")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("::1", control.reply.port), DEADLINE)
    second = await control.read_reply()
    assert (second.rep, second.host, second.port) == (
        0, "::1", writer.get_extra_info("sockname")[1])
    writer.write(b"from the peer")
    assert await asyncio.wait_for(control.reader.readexactly(13), DEADLINE) == b"from the peer"
    writer.close()
    await control.close()
    await reader.read()


def _listening(port: int) -> bool:
    """Whether a socket listens on TCP `port` (from /proc: connecting would be the peer)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


async def test_the_listener_closes_when_the_client_leaves(proxy: ProxyProcess) -> None:
    """A client that closes its control connection while waiting for the peer: the
    announced port is closed at once, not kept until bind_timeout (60 s here)."""
    control = await proxy.request(BIND, "127.0.0.1", 0)
    assert control.reply.rep == 0
    assert _listening(control.reply.port)
    await control.close()
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while _listening(control.reply.port):
        assert asyncio.get_running_loop().time() < deadline, "the listener is still open"
        await asyncio.sleep(0.05)
    event = await proxy.event_for(control.local_port)
    assert (event["command"], event["close_reason"]) == ("bind", "client")


async def test_data_sent_before_the_peer_arrives_is_relayed_to_it(proxy: ProxyProcess) -> None:
    control = await proxy.request(BIND, "127.0.0.1", 0)
    assert control.reply.rep == 0
    control.writer.write(b"early bytes")  # before the second reply: kept, not lost
    await control.writer.drain()
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(control.reply.host, control.reply.port), DEADLINE)
    assert (await control.read_reply()).rep == 0
    assert await asyncio.wait_for(reader.readexactly(11), DEADLINE) == b"early bytes"
    writer.close()
    await control.close()
