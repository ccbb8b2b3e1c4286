"""The connection event (DESIGN.md): every field, for connections whose bytes, timings and
failures the test controls."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from proxy_harness import (
    CONNECT,
    DEADLINE,
    ProxyProcess,
    TcpServer,
    auth_request,
    greeting,
    read_reply,
    read_until_eof,
    socks_request,
)

ServerFactory = Callable[..., Awaitable[TcpServer]]

FIELDS = {
    "event_id", "node_id", "started_at", "ended_at", "source_ip", "source_port", "user",
    "command", "protocol", "dest_host", "domain", "dest_ip", "dest_port", "registered_domain",
    "status", "reply_code", "close_reason", "connect_ms", "ttfb_ms", "duration_ms",
    "bytes_out", "bytes_in", "trace_id",
}
STATUSES = {"ok", "auth_failed", "denied_whitelist", "denied_destination", "rate_limited",
            "dns_failed", "refused", "unreachable", "timeout", "error"}
CLOSE_REASONS = {"client", "destination", "idle_timeout", "shutdown", "revoked", "error"}

SERVER_DELAY = 0.1  # the destination waits this long before its first byte
HOLD = 0.3  # the client keeps the connection open at least this long


def _time(text: str) -> datetime:
    assert text.endswith("Z") and len(text) == len("2024-01-01T00:00:00.000000Z"), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def check_invariants(event: dict[str, Any]) -> None:
    """What holds for every event, whatever happened to the connection."""
    assert set(event) == FIELDS
    event_id = uuid.UUID(event["event_id"])
    assert event_id.version == 7 and event_id.variant == uuid.RFC_4122
    started, ended = _time(event["started_at"]), _time(event["ended_at"])
    assert started <= ended
    assert abs((ended - started).total_seconds() * 1000 - event["duration_ms"]) < 1.0
    # the UUIDv7 timestamp: made on the node while the connection lived
    id_ms = event_id.int >> 80
    assert started.timestamp() * 1000 - 1 <= id_ms <= ended.timestamp() * 1000 + 1000
    assert event["node_id"] == "test-node"
    assert event["status"] in STATUSES
    assert event["close_reason"] in CLOSE_REASONS
    assert event["command"] in {"connect", "bind", "udp_associate"}
    assert event["protocol"] == ("udp" if event["command"] == "udp_associate" else "tcp")
    assert event["bytes_in"] >= 0 and event["bytes_out"] >= 0
    assert event["duration_ms"] >= 0
    for key in ("connect_ms", "ttfb_ms"):
        if event[key] is not None:
            assert 0 <= event[key] <= event["duration_ms"], (key, event)
    if event["status"] == "ok":
        assert event["reply_code"] == 0
        assert event["connect_ms"] is not None
    elif event["reply_code"] is not None:
        assert event["reply_code"] != 0
    if event["domain"] is not None:
        assert event["dest_host"] == event["domain"]
    assert event["trace_id"] is None  # tracing is off


async def _delayed_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait for the client's first bytes, pause, answer 1000 bytes, then drain to EOF."""
    await reader.readexactly(4)
    await asyncio.sleep(SERVER_DELAY)
    writer.write(b"x" * 1000)
    await writer.drain()
    await reader.read()


async def test_every_field_of_a_controlled_connection(
    proxy: ProxyProcess, tcp_server: ServerFactory
) -> None:
    server = await tcp_server(_delayed_answer)
    wall_before = time.time()
    tunnel = await proxy.open("127.0.0.1", server.port)
    opened = time.monotonic()  # the proxy accepted before this
    wall_opened = time.time()
    tunnel.writer.write(b"ping")
    assert await asyncio.wait_for(tunnel.reader.readexactly(1000), DEADLINE) == b"x" * 1000
    await asyncio.sleep(HOLD)  # holding the connection open, not waiting for anything
    tunnel.writer.write(b"y" * 500)
    held = time.monotonic() - opened  # the proxy closes after this
    tunnel.writer.write_eof()
    assert await read_until_eof(tunnel.reader) == b""
    await tunnel.close()

    event = await proxy.event_for(tunnel.local_port)
    wall_after = time.time()
    check_invariants(event)
    assert event["source_ip"] == "127.0.0.1"
    assert event["source_port"] == tunnel.local_port
    assert event["user"] == ""
    assert (event["command"], event["protocol"]) == ("connect", "tcp")
    assert (event["dest_host"], event["domain"], event["registered_domain"]) == (
        "127.0.0.1", None, None)
    assert (event["dest_ip"], event["dest_port"]) == ("127.0.0.1", server.port)
    assert (event["status"], event["reply_code"], event["close_reason"]) == ("ok", 0, "client")
    assert (event["bytes_out"], event["bytes_in"]) == (4 + 500, 1000)
    assert 0 <= event["connect_ms"] < 1000
    assert event["ttfb_ms"] >= SERVER_DELAY * 1000
    assert event["ttfb_ms"] < SERVER_DELAY * 1000 + 2000
    assert event["duration_ms"] >= held * 1000
    assert event["duration_ms"] >= event["ttfb_ms"] + event["connect_ms"]
    started, ended = _time(event["started_at"]), _time(event["ended_at"])
    assert wall_before - 0.001 <= started.timestamp() <= wall_opened + 0.001
    assert started.timestamp() + held <= ended.timestamp() <= wall_after + 0.001


async def test_domain_fields(proxy: ProxyProcess, echo_server: TcpServer) -> None:
    tunnel = await proxy.open("localhost", echo_server.port)
    assert await tunnel.roundtrip(b"0123456789") == b"0123456789"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    check_invariants(event)
    assert (event["dest_host"], event["domain"], event["dest_ip"], event["dest_port"]) == (
        "localhost", "localhost", "127.0.0.1", echo_server.port)
    assert event["registered_domain"] is None  # "localhost" has no registrable part
    assert (event["bytes_out"], event["bytes_in"]) == (10, 10)


async def test_silent_destination_has_no_ttfb(
    proxy: ProxyProcess, tcp_server: ServerFactory
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await tcp_server(silent)
    tunnel = await proxy.open("127.0.0.1", server.port)
    tunnel.writer.write(b"a" * 12345)
    tunnel.writer.write_eof()
    assert await read_until_eof(tunnel.reader) == b""
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    check_invariants(event)
    assert event["ttfb_ms"] is None
    assert (event["bytes_out"], event["bytes_in"]) == (12345, 0)
    assert event["close_reason"] == "client"


async def test_destination_closes_first(proxy: ProxyProcess, tcp_server: ServerFactory) -> None:
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()

    server = await tcp_server(greeter)
    tunnel = await proxy.open("127.0.0.1", server.port)
    assert await read_until_eof(tunnel.reader) == b"220 hello\r\n"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    check_invariants(event)
    assert event["close_reason"] == "destination"
    assert (event["bytes_out"], event["bytes_in"]) == (0, 11)
    assert event["ttfb_ms"] is not None


async def test_authenticated_user_is_recorded(
    proxy_factory: Callable[..., ProxyProcess], echo_server: TcpServer
) -> None:
    proxy = proxy_factory(users={"Zoë": "pässword"})
    tunnel = await proxy.open("127.0.0.1", echo_server.port, auth=("Zoë", "pässword"))
    assert await tunnel.roundtrip(b"hi") == b"hi"
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    check_invariants(event)
    assert event["user"] == "Zoë"
    assert event["status"] == "ok"


async def test_failure_events(proxy_factory: Callable[..., ProxyProcess]) -> None:
    """ok, refused, dns_failed and auth_failed on one node: one event per connection, each
    with its status, reply code and close reason, and unique event ids."""
    proxy = proxy_factory(users={"alice": "secret"})
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        outcomes: dict[int, tuple[str, int | None]] = {}

        async def attempt(password: str, host: str, port: int) -> None:
            reader, writer = await proxy.raw()
            local = writer.get_extra_info("sockname")[1]
            writer.write(greeting(b"\x02") + auth_request("alice", password)
                         + socks_request(CONNECT, host, port))
            answers = await asyncio.wait_for(reader.readexactly(4), DEADLINE)
            rep = None
            if answers == b"\x05\x02\x01\x00":
                rep = (await asyncio.wait_for(read_reply(reader), DEADLINE)).rep
            await read_until_eof(reader)
            writer.close()
            outcomes[local] = (host, rep)

        await asyncio.gather(
            attempt("secret", "127.0.0.1", closed_port),
            attempt("secret", "nonexistent.invalid", 80),
            attempt("wrong", "127.0.0.1", closed_port),
        )
    events = await proxy.wait_events(lambda e: True, count=3)
    assert len(events) == 3
    assert len({e["event_id"] for e in events}) == 3
    by_port = {e["source_port"]: e for e in events}
    assert set(by_port) == set(outcomes)
    expected = {
        ("127.0.0.1", 5): ("refused", 5, "error"),
        ("nonexistent.invalid", 4): ("dns_failed", 4, "error"),
        ("127.0.0.1", None): ("auth_failed", None, "error"),
    }
    for port, outcome in outcomes.items():
        event = by_port[port]
        check_invariants(event)
        assert (event["status"], event["reply_code"], event["close_reason"]) == (
            expected[outcome])
        assert event["user"] == "alice"
        assert (event["bytes_in"], event["bytes_out"]) == (0, 0)
        assert event["ttfb_ms"] is None
        if event["status"] != "auth_failed":
            assert event["dest_port"] in (closed_port, 80)


async def test_shared_proxy_events_all_valid(
    proxy: ProxyProcess, echo_server: TcpServer
) -> None:
    """Whatever the other tests did on the shared proxy, every event it wrote is well formed
    and no event id repeats."""
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    await tunnel.close()
    await proxy.event_for(tunnel.local_port)
    events = proxy.events()
    for event in events:
        check_invariants(event)
    assert len({e["event_id"] for e in events}) == len(events)


async def _refused_request(proxy: ProxyProcess, request: bytes) -> tuple[int, int]:
    """Send a request without auth; return (our port, the reply's REP)."""
    reader, writer = await proxy.raw()
    local = writer.get_extra_info("sockname")[1]
    writer.write(greeting(b"\x00") + request)
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x00"
    rep = (await asyncio.wait_for(read_reply(reader), DEADLINE)).rep
    await read_until_eof(reader)
    writer.close()
    return local, rep


async def test_what_a_failed_request_asked_for_is_recorded(
    proxy_factory: Callable[..., ProxyProcess]
) -> None:
    """A refused connection to a name records the address it tried; an IPv4-mapped IPv6
    address is recorded as the IPv4 address, however it failed; a scoped IPv6 literal sent
    as a name is not a destination (0x04, and the event still exports); a source the
    whitelist refuses still records what it asked for."""
    proxy = proxy_factory()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        outcomes = dict([
            await _refused_request(proxy, socks_request(CONNECT, "localhost", port)),
            await _refused_request(proxy, socks_request(CONNECT, "::ffff:127.0.0.1", port)),
            await _refused_request(proxy, bytes((5, CONNECT, 0, 3, 6)) + b"::1%lo"
                                   + port.to_bytes(2, "big")),
        ])
        events = {e["source_port"]: e for e in
                  await proxy.wait_events(lambda e: e["source_port"] in outcomes, count=3)}
    by_host = {events[local]["dest_host"]: (events[local], rep)
               for local, rep in outcomes.items()}
    for event, _ in by_host.values():
        check_invariants(event)
    named, rep = by_host["localhost"]
    assert (rep, named["status"], named["domain"]) == (5, "refused", "localhost")
    assert named["dest_ip"] in ("127.0.0.1", "::1")
    mapped, rep = by_host["127.0.0.1"]
    assert (rep, mapped["status"], mapped["dest_ip"]) == (5, "refused", "127.0.0.1")
    scoped, rep = by_host[None]
    assert (rep, scoped["status"], scoped["dest_ip"]) == (4, "dns_failed", None)

    proxy.write_policy({}, whitelist=["192.0.2.0/24"])
    proxy.send_signal(1)
    await proxy.wait_log("policy applied")
    local, rep = await _refused_request(proxy, socks_request(CONNECT, "example.com", 443))
    (denied,) = await proxy.wait_events(lambda e: e["source_port"] == local, count=1)
    check_invariants(denied)
    assert (rep, denied["status"], denied["reply_code"]) == (2, "denied_whitelist", 2)
    assert (denied["dest_host"], denied["domain"], denied["dest_port"]) == (
        "example.com", "example.com", 443)
