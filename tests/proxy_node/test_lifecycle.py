"""A proxy node's lifecycle: SIGTERM drain, the connection cap, idle timeouts, hundreds of
concurrent connections, worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable

from proxy_harness import (
    BIND,
    DEADLINE,
    UDP_ASSOCIATE,
    ProxyProcess,
    TcpServer,
    Tunnel,
    greeting,
    is_closed_by_peer,
    read_until_eof,
    started_after,
)

Factory = Callable[..., ProxyProcess]


async def _refused(proxy: ProxyProcess) -> bool:
    """True if a new TCP connection to the proxy is refused outright."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(proxy.host, proxy.port), DEADLINE)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_live_connections(proxy_factory: Factory,
                                               echo_server: TcpServer) -> None:
    proxy = proxy_factory({"proxy": {"shutdown_grace": 8}})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await tunnel.roundtrip(b"before") == b"before"

    proxy.send_signal(signal.SIGTERM)
    await proxy.wait_log("draining")
    assert await _refused(proxy), "the proxy still accepts connections while draining"
    # the live connection keeps working during the grace period
    for i in range(5):
        assert await tunnel.roundtrip(b"during %d" % i) == b"during %d" % i
    assert proxy.returncode is None

    tunnel.writer.write_eof()
    assert await read_until_eof(tunnel.reader) == b""
    closed = time.monotonic()
    await tunnel.close()
    assert await proxy.wait_exit() == 0
    assert time.monotonic() - closed < 4, "the proxy waited for the grace period to end"
    event = await proxy.event_for(tunnel.local_port)
    assert event["close_reason"] == "client"
    assert event["bytes_out"] == event["bytes_in"] == len(b"before") + 5 * len(b"during 0")
    assert proxy.has_log("grace period over; closing connections") is None


async def test_sigterm_closes_what_is_left_after_the_grace_period(
    proxy_factory: Factory, echo_server: TcpServer
) -> None:
    proxy = proxy_factory({"proxy": {"shutdown_grace": 0.5}})
    relayed = await proxy.open("127.0.0.1", echo_server.port)
    assert await relayed.roundtrip(b"abc") == b"abc"
    udp = await proxy.request(UDP_ASSOCIATE, "0.0.0.0", 0)
    assert udp.reply.rep == 0
    bind = await proxy.request(BIND, "127.0.0.1", 0)
    assert bind.reply.rep == 0
    stalled_reader, stalled_writer = await proxy.raw()
    stalled_writer.write(greeting(b"\x00"))
    assert await asyncio.wait_for(stalled_reader.readexactly(2), DEADLINE) == b"\x05\x00"

    signalled = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    for reader in (relayed.reader, udp.reader, bind.reader, stalled_reader):
        assert await is_closed_by_peer(reader)
    assert await proxy.wait_exit() == 0
    assert time.monotonic() - signalled >= 0.45, "closed before the grace period was over"
    await proxy.wait_log("grace period over; closing connections")

    ports = [t.local_port for t in (relayed, udp, bind)]
    ports.append(stalled_writer.get_extra_info("sockname")[1])
    for port in ports:
        event = await proxy.event_for(port, timeout=1)
        assert event["close_reason"] == "shutdown", event
    relayed_event = await proxy.event_for(relayed.local_port)
    assert relayed_event["status"] == "ok"
    assert relayed_event["bytes_out"] == relayed_event["bytes_in"] == 3
    for tunnel in (relayed, udp, bind):
        await tunnel.close()
    stalled_writer.close()


async def test_max_connections_refuses_at_once(proxy_factory: Factory,
                                               echo_server: TcpServer) -> None:
    proxy = proxy_factory({"proxy": {"max_connections": 3}})
    tunnels = [await proxy.open("127.0.0.1", echo_server.port) for _ in range(3)]
    for _ in range(3):  # over the cap: closed without a byte, not queued
        started = time.monotonic()
        try:
            reader, writer = await proxy.raw()
        except ConnectionResetError:
            pass  # reset before the client's connect even returned
        else:
            with contextlib.suppress(ConnectionResetError):
                writer.write(greeting(b"\x00"))
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            writer.close()
        assert time.monotonic() - started < 2
    for tunnel in tunnels:  # those inside the cap are unaffected
        assert await tunnel.roundtrip(b"inside") == b"inside"
    await tunnels[0].close()
    await proxy.event_for(tunnels[0].local_port)
    replacement = await proxy.open("127.0.0.1", echo_server.port)
    assert await replacement.roundtrip(b"room again") == b"room again"
    for tunnel in [*tunnels[1:], replacement]:
        await tunnel.close()
    await proxy.wait_events(lambda e: True, count=4)
    assert len(proxy.events()) == 4  # refused connections have no event


async def test_hundreds_of_concurrent_connections(
    proxy: ProxyProcess, echo_server: TcpServer
) -> None:
    count = 300
    since = time.time()
    async with asyncio.timeout(60):
        tunnels: list[Tunnel] = await asyncio.gather(
            *(proxy.open("127.0.0.1", echo_server.port) for _ in range(count)))
        # all of them are open at once; each gets its own echo
        messages = [b"connection %d " % i * (i % 7 + 1) for i in range(count)]
        answers = await asyncio.gather(
            *(t.roundtrip(m) for t, m in zip(tunnels, messages, strict=True)))
        assert answers == messages
        await asyncio.gather(*(t.close() for t in tunnels))
    ports = {t.local_port: len(m) for t, m in zip(tunnels, messages, strict=True)}
    assert len(ports) == count
    events = await proxy.wait_events(
        lambda e: e["source_port"] in ports and started_after(e, since), count=count)
    assert len(events) == count
    for event in events:
        assert event["status"] == "ok"
        assert event["bytes_out"] == event["bytes_in"] == ports[event["source_port"]]


async def test_idle_timeout(proxy_factory: Factory, echo_server: TcpServer) -> None:
    proxy = proxy_factory({"proxy": {"idle_timeout": 0.3}})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    opened = time.monotonic()
    assert await tunnel.roundtrip(b"x" * 100) == b"x" * 100
    assert await is_closed_by_peer(tunnel.reader)
    assert time.monotonic() - opened >= 0.25
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["close_reason"] == "idle_timeout"
    assert event["status"] == "ok"
    assert event["bytes_out"] == event["bytes_in"] == 100
    assert event["duration_ms"] >= 300


async def test_activity_keeps_a_connection_alive(proxy_factory: Factory,
                                                 echo_server: TcpServer) -> None:
    proxy = proxy_factory({"proxy": {"idle_timeout": 0.4}})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # 2.5 idle timeouts, never idle for long
        assert await tunnel.roundtrip(b"tick") == b"tick"
        await asyncio.sleep(0.1)
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["close_reason"] == "client"


async def test_half_close_timeout(
    proxy_factory: Factory, tcp_server: Callable[..., Awaitable[TcpServer]]
) -> None:
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        await asyncio.sleep(DEADLINE)  # holds its side open

    server = await tcp_server(never_answers)
    proxy = proxy_factory({"proxy": {"idle_timeout": 30, "half_close_timeout": 0.3}})
    tunnel = await proxy.open("127.0.0.1", server.port)
    tunnel.writer.write(b"request")
    tunnel.writer.write_eof()
    assert await is_closed_by_peer(tunnel.reader, timeout=5)
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert event["close_reason"] == "idle_timeout"
    assert event["bytes_out"] == 7


async def test_worker_processes_share_the_port(proxy_factory: Factory,
                                               echo_server: TcpServer) -> None:
    proxy = proxy_factory({"proxy": {"workers": 2}})

    async def one(i: int) -> int:
        tunnel = await proxy.open("127.0.0.1", echo_server.port)
        assert await tunnel.roundtrip(b"w%d" % i) == b"w%d" % i
        await tunnel.close()
        return tunnel.local_port

    ports = set(await asyncio.gather(*(one(i) for i in range(40))))
    await proxy.wait_events(lambda e: e["source_port"] in ports, count=40)
    proxy.send_signal(signal.SIGTERM)
    assert await proxy.wait_exit() == 0
    assert len(proxy.events()) == 40
