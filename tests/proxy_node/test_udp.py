"""UDP ASSOCIATE against a real proxy process and a real UDP echo server."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
from proxy_harness import (
    DEADLINE,
    HAS_IPV6,
    UDP_ASSOCIATE,
    ProxyProcess,
    Tunnel,
    UdpClient,
    UdpEcho,
    is_closed_by_peer,
    parse_udp_datagram,
    udp_datagram,
)

EchoFactory = Callable[..., Awaitable[UdpEcho]]
ClientFactory = Callable[..., UdpClient]


async def _associate(proxy: ProxyProcess, host: str = "0.0.0.0", port: int = 0) -> Tunnel:
    control = await proxy.request(UDP_ASSOCIATE, host, port)
    assert control.reply.rep == 0, f"UDP ASSOCIATE refused with {control.reply.rep:#x}"
    return control


async def _echo(client: UdpClient, relay: tuple[str, int], host: str, port: int,
                payload: bytes) -> tuple[str, int, bytes]:
    client.send(udp_datagram(host, port, payload), relay)
    data, source = await client.recv()
    assert source[:2] == relay, f"answer from {source}, not from the relay {relay}"
    return parse_udp_datagram(data)


def _payloads(echo: UdpEcho) -> list[bytes]:
    return [payload for payload, _ in echo.received]


async def test_round_trip_and_event(
    proxy: ProxyProcess, udp_echo: EchoFactory, udp_client: ClientFactory
) -> None:
    echo = await udp_echo()
    control = await _associate(proxy)
    # BND.ADDR: the control connection's local address on the proxy
    assert control.reply.host == control.proxy_side[0] == "127.0.0.1"
    assert control.reply.port != 0
    relay = (control.reply.host, control.reply.port)
    client = udp_client()
    sizes = [1, 512, 1400, 8000, 60000]
    for size in sizes:
        payload = os.urandom(size)
        assert await _echo(client, relay, echo.host, echo.port, payload) == (
            echo.host, echo.port, payload)
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert event["command"] == "udp_associate"
    assert event["protocol"] == "udp"
    assert (event["status"], event["reply_code"], event["close_reason"]) == ("ok", 0, "client")
    assert event["bytes_out"] == event["bytes_in"] == sum(sizes)
    assert (event["dest_host"], event["dest_ip"], event["dest_port"]) == (
        "127.0.0.1", "127.0.0.1", echo.port)
    assert event["domain"] is None
    assert event["ttfb_ms"] is not None and event["ttfb_ms"] >= 0


async def test_association_ends_with_the_control_connection(
    proxy: ProxyProcess, udp_echo: EchoFactory
) -> None:
    echo = await udp_echo()
    control = await _associate(proxy)
    relay = (control.reply.host, control.reply.port)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        sock.connect(relay)
        sock.send(udp_datagram(echo.host, echo.port, b"alive"))
        answer = await asyncio.wait_for(loop.sock_recv(sock, 65535), DEADLINE)
        assert parse_udp_datagram(answer)[2] == b"alive"
        await control.close()
        await proxy.event_for(control.local_port)
        # the relay socket is gone: the kernel answers with port unreachable
        sock.send(udp_datagram(echo.host, echo.port, b"too late"))
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(loop.sock_recv(sock, 65535), DEADLINE)
    assert _payloads(echo) == [b"alive"]


@pytest.mark.parametrize("announce", [True, False], ids=["port-announced", "first-datagram"])
async def test_datagram_from_a_foreign_port_is_dropped(
    proxy: ProxyProcess, udp_echo: EchoFactory, udp_client: ClientFactory, announce: bool
) -> None:
    echo = await udp_echo()
    client = udp_client()
    foreign = udp_client()
    if announce:
        control = await _associate(proxy, "127.0.0.1", client.port)
    else:
        control = await _associate(proxy)
        relay = (control.reply.host, control.reply.port)
        await _echo(client, relay, echo.host, echo.port, b"first")
    relay = (control.reply.host, control.reply.port)
    foreign.send(udp_datagram(echo.host, echo.port, b"from a stranger"), relay)
    assert (await _echo(client, relay, echo.host, echo.port, b"mine"))[2] == b"mine"
    assert b"from a stranger" not in _payloads(echo)
    assert foreign.pending() is None
    await control.close()
    event = await proxy.event_for(control.local_port)
    expected = len(b"mine") + (0 if announce else len(b"first"))
    assert event["bytes_out"] == event["bytes_in"] == expected


async def test_fragments_are_dropped(
    proxy: ProxyProcess, udp_echo: EchoFactory, udp_client: ClientFactory
) -> None:
    echo = await udp_echo()
    client = udp_client()
    control = await _associate(proxy)
    relay = (control.reply.host, control.reply.port)
    client.send(udp_datagram(echo.host, echo.port, b"fragment one", frag=1), relay)
    client.send(udp_datagram(echo.host, echo.port, b"last fragment", frag=0x82), relay)
    client.send(b"\x00\x00", relay)  # shorter than any header
    client.send(b"\x01\x00\x00" + udp_datagram(echo.host, echo.port, b"rsv")[3:], relay)
    assert (await _echo(client, relay, echo.host, echo.port, b"whole"))[2] == b"whole"
    assert _payloads(echo) == [b"whole"]
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert event["bytes_out"] == len(b"whole")


async def test_only_answers_from_contacted_peers_come_back(
    proxy: ProxyProcess, udp_echo: EchoFactory, udp_client: ClientFactory
) -> None:
    echo = await udp_echo()
    client = udp_client()
    stranger = udp_client()
    control = await _associate(proxy)
    relay = (control.reply.host, control.reply.port)
    await _echo(client, relay, echo.host, echo.port, b"hello")
    outbound = echo.received[0][1]  # the proxy's outbound socket, as the echo server saw it
    stranger.send(b"unsolicited", outbound)
    assert (await _echo(client, relay, echo.host, echo.port, b"again"))[2] == b"again"
    assert client.pending() is None
    await control.close()


async def test_domain_and_ipv6_destinations(
    proxy: ProxyProcess, udp_echo: EchoFactory, udp_client: ClientFactory
) -> None:
    echo = await udp_echo()
    client = udp_client()
    control = await _associate(proxy)
    relay = (control.reply.host, control.reply.port)
    assert await _echo(client, relay, "localhost", echo.port, b"by name") == (
        "127.0.0.1", echo.port, b"by name")
    if HAS_IPV6:
        echo6 = await udp_echo("::1")
        assert await _echo(client, relay, "::1", echo6.port, b"v6") == ("::1", echo6.port, b"v6")
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["dest_host"], event["domain"], event["dest_ip"]) == (
        "localhost", "localhost", "127.0.0.1")


async def test_idle_association_times_out(
    proxy_factory: Callable[..., ProxyProcess], udp_echo: EchoFactory,
    udp_client: ClientFactory,
) -> None:
    proxy = proxy_factory({"proxy": {"udp_idle_timeout": 0.3}})
    echo = await udp_echo()
    client = udp_client()
    control = await _associate(proxy)
    relay = (control.reply.host, control.reply.port)
    await _echo(client, relay, echo.host, echo.port, b"once")
    assert await is_closed_by_peer(control.reader, timeout=DEADLINE)
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert event["close_reason"] == "idle_timeout"
    assert event["duration_ms"] >= 300


async def test_over_an_ipv6_control_connection(
    proxy_factory: Callable[..., ProxyProcess], udp_echo: EchoFactory,
    udp_client: ClientFactory,
) -> None:
    if not HAS_IPV6:
        pytest.skip("no ::1 on this machine")
    proxy = proxy_factory(listen="[::1]:0")
    assert proxy.host == "::1"
    echo = await udp_echo("::1")
    control = await _associate(proxy, "::", 0)
    assert control.reply.host == "::1"  # the control connection's local address
    relay = (control.reply.host, control.reply.port)
    client = udp_client("::1")
    assert await _echo(client, relay, "::1", echo.port, b"six") == ("::1", echo.port, b"six")
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["source_ip"], event["dest_ip"], event["bytes_in"]) == ("::1", "::1", 3)
