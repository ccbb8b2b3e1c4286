"""The policy enforced by a real proxy process on real connections: destination rules,
the source whitelist, limits, brute-force throttling, live reload and revocation.

Every proxy here starts with the policy its test writes, and re-reads it every 0.2 s.
Policy files are replaced atomically (the proxy must never see a half-written file) and
users keep the same password hash across rewrites (a new hash is a changed password, which
revokes). Everything stays on loopback: destinations a rule denies are refused before any
packet is sent, and the one proxy bound to 0.0.0.0 receives no traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from loopback import full_accept_queue
from proxy_harness import (
    BIND,
    CONNECT,
    DEADLINE,
    NO_AUTH,
    UDP_ASSOCIATE,
    USER_PASS,
    ProxyProcess,
    TcpServer,
    Tunnel,
    UdpClient,
    UdpEcho,
    auth_request,
    echo_handler,
    greeting,
    is_closed_by_peer,
    needs_ipv6,
    parse_udp_datagram,
    poll,
    read_reply,
    socks_request,
    udp_datagram,
)

from socks5_analytics.passwords import hash_password

NOT_ALLOWED = 0x02  # REP: connection not allowed by ruleset
HOST_UNREACHABLE = 0x04
POLL = 0.2  # policy_poll_interval of every proxy here
OPEN_PROXY = "open proxy: listening beyond loopback with no whitelist and no users"

PASSWORDS = {"alice": "alice secret", "bob": "bob secret"}
HASHES = {name: hash_password(pw, n=2**4) for name, pw in PASSWORDS.items()}
ALICE = ("alice", PASSWORDS["alice"])
BOB = ("bob", PASSWORDS["bob"])
LOOPBACK_OK: dict[str, Any] = {"block_private": False}  # the test targets live on loopback

ServerFactory = Callable[..., Awaitable[TcpServer]]
StartProxy = Callable[..., ProxyProcess]


def user(name: str, **fields: Any) -> dict[str, Any]:
    """A policy user entry with that user's fixed hash."""
    return {"username": name, "password_hash": HASHES[name], **fields}


def write_policy(proxy: ProxyProcess, doc: dict[str, Any] | str) -> str:
    """Replace the proxy's policy file atomically; returns the version it will report."""
    assert proxy.policy_path is not None
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    tmp = proxy.policy_path.with_name(proxy.policy_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, proxy.policy_path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def logs_where(proxy: ProxyProcess, message: str, **fields: Any) -> list[dict[str, Any]]:
    return [r for r in list(proxy.logs) if r.get("message") == message
            and all(r.get(k) == v for k, v in fields.items())]


async def wait_log_where(proxy: ProxyProcess, message: str, **fields: Any) -> dict[str, Any]:
    found: list[dict[str, Any]] = await poll(lambda: logs_where(proxy, message, **fields),
                                             what=f"log {message!r} with {fields}")
    return found[0]


async def apply_policy(proxy: ProxyProcess, doc: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the policy and wait until the proxy says it applied it."""
    version = write_policy(proxy, doc)
    return await wait_log_where(proxy, "policy applied", policy_version=version)


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """`start_proxy(policy, config, listen=...)`: a proxy process started with `policy`."""
    started: list[ProxyProcess] = []

    def start(policy: dict[str, Any], config: dict[str, Any] | None = None, *,
              listen: str = "127.0.0.1:0") -> ProxyProcess:
        config = dict(config or {})
        config["proxy"] = {"policy_poll_interval": POLL, **config.get("proxy", {})}
        proxy = ProxyProcess(tmp_path / f"proxy{len(started)}", config, listen=listen)
        started.append(proxy)
        write_policy(proxy, policy)
        return proxy.start()

    yield start
    problems = []
    for proxy in started:
        proxy.stop()
        if not proxy.allow_errors:
            problems += proxy.problems()
    assert not problems, "the proxy logged errors:\n" + "\n".join(problems)


# -- a client that reports each step instead of asserting success -----------------------------

@dataclass
class Attempt:
    """How far a SOCKS5 exchange got: the auth status (if any) and the REP (if any)."""

    local_port: int
    auth_ok: bool | None
    rep: int | None
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def attempt(proxy: ProxyProcess, host: str, port: int, *, cmd: int = CONNECT,
                  auth: tuple[str, str] | None = None) -> Attempt:
    reader, writer = await proxy.raw()
    result = Attempt(int(writer.get_extra_info("sockname")[1]), None, None, reader, writer)
    try:
        method = USER_PASS if auth else NO_AUTH
        writer.write(greeting(bytes((method,))))
        choice = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
        assert choice == bytes((5, method)), f"method selection {choice!r}"
        if auth:
            writer.write(auth_request(*auth))
            status = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
            assert status[0] == 0x01, status
            result.auth_ok = status[1] == 0x00
            if not result.auth_ok:
                assert await is_closed_by_peer(reader)
                await result.close()
                return result
        writer.write(socks_request(cmd, host, port))
        result.rep = (await asyncio.wait_for(read_reply(reader), DEADLINE)).rep
    except BaseException:
        await result.close()
        raise
    return result


async def refused(proxy: ProxyProcess, host: str, port: int, status: str, *,
                  rep: int = NOT_ALLOWED, **kwargs: Any) -> dict[str, Any]:
    """Assert the request is answered with `rep`, the connection closed and the event's
    status is `status`; returns the event."""
    result = await attempt(proxy, host, port, **kwargs)
    try:
        assert result.rep == rep, f"REP {result.rep!r} for {host}:{port}, expected {rep:#04x}"
        assert await is_closed_by_peer(result.reader)
    finally:
        await result.close()
    event = await proxy.event_for(result.local_port)
    assert (event["status"], event["reply_code"]) == (status, rep), event
    assert event["bytes_out"] == event["bytes_in"] == 0
    return event


async def echoes(tunnel: Tunnel, payload: bytes = b"ping") -> bool:
    return await tunnel.roundtrip(payload) == payload


# -- destinations ------------------------------------------------------------------------------

async def test_block_private_is_the_default_and_an_allow_rule_reopens_a_port(
    start_proxy: StartProxy, tcp_server: ServerFactory,
) -> None:
    allowed = await tcp_server(echo_handler)
    other = await tcp_server(echo_handler)
    proxy = start_proxy({})  # no destinations section: block_private is on

    assert proxy.has_log(OPEN_PROXY) is None  # on loopback: no open-proxy warning
    for host in ("127.0.0.1", "127.9.9.9", "0.0.0.0", "::ffff:127.0.0.1", "localhost",
                 "LOCALHOST.", "127.1", "2130706433", "::1", "::", "fe80::1", "fd00::1"):
        event = await refused(proxy, host, allowed.port, "denied_destination")
        assert event["dest_port"] == allowed.port
    # a name that resolves (without DNS) onto the metadata address is refused after the
    # lookup, before any packet leaves
    await refused(proxy, "2852039166", 80, "denied_destination")  # = 169.254.169.254
    await refused(proxy, "169.254.169.254", 80, "denied_destination")
    assert allowed.peers == [] and other.peers == []  # nothing was ever connected

    await apply_policy(proxy, {"destinations": {"rules": [
        {"action": "allow", "cidrs": ["127.0.0.0/8"], "ports": [str(allowed.port)]}]}})
    for host in ("127.0.0.1", "localhost", "::ffff:127.0.0.1"):
        tunnel = await proxy.open(host, allowed.port)
        assert await echoes(tunnel)
        await tunnel.close()
        event = await proxy.event_for(tunnel.local_port)
        assert (event["status"], event["dest_ip"]) == ("ok", "127.0.0.1")
    await refused(proxy, "127.0.0.1", other.port, "denied_destination")  # other ports: still
    await refused(proxy, "10.0.0.1", allowed.port, "denied_destination")  # other ranges: still
    await refused(proxy, "::1", allowed.port, "denied_destination")
    assert other.peers == []


async def test_a_domain_rule_refuses_before_resolving(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    proxy = start_proxy({"destinations": {
        "block_private": False,
        "rules": [{"action": "deny", "domains": [".blocked.invalid", "exact.invalid"]}],
    }})
    # .invalid never resolves: REP 0x02 (not 0x04) proves the rule decided without a lookup
    for host in ("x.blocked.invalid", "blocked.invalid", "A.B.Blocked.Invalid",
                 "exact.invalid"):
        event = await refused(proxy, host, 443, "denied_destination")
        assert event["domain"] == host.lower() and event["dest_ip"] is None
    # names the rule does not cover are looked up, and fail as unresolvable
    for host in ("xblocked.invalid", "sub.exact.invalid", "other.invalid"):
        await refused(proxy, host, 443, "dns_failed", rep=HOST_UNREACHABLE)
    # and the rule only concerns names
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await echoes(tunnel)
    await tunnel.close()


async def test_port_and_command_rules(
    start_proxy: StartProxy, tcp_server: ServerFactory,
) -> None:
    open_server = await tcp_server(echo_handler)
    closed_server = await tcp_server(echo_handler)
    proxy = start_proxy({"destinations": {"block_private": False, "rules": [
        {"action": "deny", "ports": [closed_server.port]},
        {"action": "deny", "cidrs": ["127.0.0.0/8"], "ports": ["1-65535"],
         "commands": ["udp_associate"]},
    ]}})
    await refused(proxy, "127.0.0.1", closed_server.port, "denied_destination")
    await refused(proxy, "no.such.name.invalid", closed_server.port, "denied_destination")
    tunnel = await proxy.open("127.0.0.1", open_server.port)  # the udp rule is not for CONNECT
    assert await echoes(tunnel)
    await tunnel.close()
    assert closed_server.peers == []


async def test_udp_datagrams_to_denied_destinations_are_dropped(
    start_proxy: StartProxy, udp_echo: Callable[..., Awaitable[UdpEcho]],
    udp_client: Callable[..., UdpClient],
) -> None:
    allowed = await udp_echo()
    denied = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # read directly, no loop
    denied.setblocking(False)
    denied.bind(("127.0.0.1", 0))
    try:
        proxy = start_proxy({"destinations": {"rules": [
            {"action": "allow", "cidrs": ["127.0.0.1/32"], "ports": [allowed.port]}]}})
        control = await proxy.request(UDP_ASSOCIATE, "0.0.0.0", 0)
        assert control.reply.rep == 0
        relay = (control.reply.host, control.reply.port)
        client = udp_client()
        denied_port = denied.getsockname()[1]
        client.send(udp_datagram("127.0.0.1", denied_port, b"denied"), relay)
        client.send(udp_datagram("localhost", denied_port, b"denied by name"), relay)
        client.send(udp_datagram("127.0.0.1", allowed.port, b"allowed"), relay)
        data, _ = await client.recv()
        assert parse_udp_datagram(data) == ("127.0.0.1", allowed.port, b"allowed")
        # the relay handles a client's datagrams in order: had the denied ones been sent,
        # they would be waiting in this socket by now (the by-name one is resolved first,
        # so give it the same chance: one more allowed round trip)
        client.send(udp_datagram("localhost", allowed.port, b"allowed by name"), relay)
        data, _ = await client.recv()
        assert parse_udp_datagram(data)[2] == b"allowed by name"
        with pytest.raises(BlockingIOError):
            denied.recv(2048)
        await control.close()
        event = await proxy.event_for(control.local_port)
        assert (event["status"], event["dest_port"]) == ("ok", allowed.port)
    finally:
        denied.close()


async def test_a_rule_denying_bind_is_enforced(start_proxy: StartProxy) -> None:
    proxy = start_proxy({"destinations": {"block_private": False, "rules": [
        {"action": "deny", "commands": ["bind"]}]}}, {"proxy": {"shutdown_grace": 0.1}})
    await refused(proxy, "127.0.0.1", 0, "denied_destination", cmd=BIND)


async def test_a_rule_denying_udp_associate_is_enforced(start_proxy: StartProxy) -> None:
    proxy = start_proxy({"destinations": {"block_private": False, "rules": [
        {"action": "deny", "commands": ["udp_associate"]}]}})
    await refused(proxy, "0.0.0.0", 0, "denied_destination", cmd=UDP_ASSOCIATE)


# -- the source whitelist ----------------------------------------------------------------------

async def test_a_source_outside_the_whitelist_is_refused(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    proxy = start_proxy({"whitelist": ["10.0.0.0/8", "::1/128"], "destinations": LOOPBACK_OK})
    event = await refused(proxy, "127.0.0.1", echo_server.port, "denied_whitelist")
    assert event["source_ip"] == "127.0.0.1"
    # the refusal does not depend on the method or on the destination being allowed
    await refused(proxy, "x.blocked.invalid", 1, "denied_whitelist")
    assert echo_server.peers == []

    await apply_policy(proxy, {"whitelist": ["10.0.0.0/8", "127.0.0.0/8"],
                               "destinations": LOOPBACK_OK})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await echoes(tunnel)
    await tunnel.close()


@needs_ipv6
async def test_ipv6_sources_against_the_whitelist(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    proxy = start_proxy({"whitelist": ["127.0.0.0/8"], "destinations": LOOPBACK_OK},
                        listen="[::1]:0")
    assert proxy.host == "::1"
    event = await refused(proxy, "127.0.0.1", echo_server.port, "denied_whitelist")
    assert event["source_ip"] == "::1"  # IPv4 loopback does not cover IPv6 loopback
    await apply_policy(proxy, {"whitelist": ["::1/128"], "destinations": LOOPBACK_OK})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await echoes(tunnel)
    await tunnel.close()


async def test_ipv4_mapped_sources_are_judged_as_ipv4(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the whitelist is written in
    IPv4 and must still apply (this listener takes only loopback's IPv4 traffic)."""
    proxy = start_proxy({"whitelist": ["10.0.0.0/8"], "destinations": LOOPBACK_OK},
                        listen="[::ffff:127.0.0.1]:0")
    event = await refused(proxy, "127.0.0.1", echo_server.port, "denied_whitelist")
    assert event["source_ip"] == "127.0.0.1"
    await apply_policy(proxy, {"whitelist": ["127.0.0.1/32"], "destinations": LOOPBACK_OK})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await echoes(tunnel)
    await tunnel.close()
    event = await proxy.event_for(tunnel.local_port)
    assert (event["source_ip"], event["status"]) == ("127.0.0.1", "ok")


# -- revocation --------------------------------------------------------------------------------

async def test_leaving_the_whitelist_closes_live_sessions(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    policy: dict[str, Any] = {"whitelist": ["127.0.0.0/8"], "destinations": LOOPBACK_OK}
    proxy = start_proxy(policy)
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    assert await echoes(tunnel)
    control = await proxy.request(UDP_ASSOCIATE, "0.0.0.0", 0)
    assert control.reply.rep == 0
    # a connection still in its handshake is a live session too
    handshaking, handshaking_writer = await proxy.raw()
    handshaking_writer.write(greeting(bytes((NO_AUTH,))))
    assert await asyncio.wait_for(handshaking.readexactly(2), DEADLINE) == b"\x05\x00"

    # an unrelated change (limits, a wider whitelist) closes nothing
    applied = await apply_policy(proxy, {**policy, "whitelist": ["127.0.0.0/8", "10.0.0.0/8"],
                                         "limits": {"max_connections_per_ip": 100}})
    assert applied["revoked_sessions"] == 0
    assert await echoes(tunnel, b"still here")

    applied = await apply_policy(proxy, {**policy, "whitelist": ["10.0.0.0/8"]})
    assert applied["revoked_sessions"] == 3
    assert await is_closed_by_peer(tunnel.reader)
    assert await is_closed_by_peer(control.reader)
    assert await is_closed_by_peer(handshaking)
    handshaking_writer.close()
    await tunnel.close()
    await control.close()
    event = await proxy.event_for(tunnel.local_port)
    assert (event["status"], event["close_reason"]) == ("ok", "revoked")
    assert event["bytes_out"] == len(b"ping") + len(b"still here")
    event = await proxy.event_for(control.local_port)
    assert (event["command"], event["close_reason"]) == ("udp_associate", "revoked")
    revoked = await proxy.wait_events(lambda e: e["close_reason"] == "revoked", count=3)
    assert len(revoked) == 3
    # and new connections from the address are refused
    await refused(proxy, "127.0.0.1", echo_server.port, "denied_whitelist")


async def test_a_request_revoked_while_it_is_dialled_gets_rep_0x02(
    start_proxy: StartProxy,
) -> None:
    """RFC 1928 section 6: a request is answered. One whose destination a policy change
    forbids while the proxy is still connecting gets 0x02, not a bare close."""
    proxy = start_proxy({"destinations": LOOPBACK_OK}, {"proxy": {"connect_timeout": 60}})
    with full_accept_queue() as stalled_port:  # the upstream connect hangs in SYN_SENT
        reader, writer = await proxy.raw()
        writer.write(greeting(bytes((NO_AUTH,))))
        assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x00"
        stalled = _syn_sent_to(stalled_port)
        writer.write(socks_request(CONNECT, "127.0.0.1", stalled_port))
        await poll(lambda: _syn_sent_to(stalled_port) > stalled,
                   what="the proxy's connect")
        applied = await apply_policy(proxy, {"destinations": {"block_private": True}})
        assert applied["revoked_sessions"] == 1
        reply = await asyncio.wait_for(read_reply(reader), DEADLINE)
        assert reply.rep == 0x02
        assert await is_closed_by_peer(reader)
        writer.close()
    event = await proxy.event_for(int(writer.get_extra_info("sockname")[1]))
    assert (event["status"], event["reply_code"], event["close_reason"]) == (
        "denied_destination", 2, "revoked")


def _syn_sent_to(port: int) -> int:
    """How many IPv4 sockets of this machine are connecting (SYN_SENT) to 127.0.0.1:`port`."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows
               if row[2] == f"0100007F:{port:04X}" and row[3] == "02")


async def test_disabling_a_user_closes_their_sessions_only(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    policy: dict[str, Any] = {"users": [user("alice"), user("bob")],
                              "destinations": LOOPBACK_OK}
    proxy = start_proxy(policy)
    alice = [await proxy.open("127.0.0.1", echo_server.port, auth=ALICE) for _ in range(2)]
    bob = await proxy.open("127.0.0.1", echo_server.port, auth=BOB)

    # bob's limits change: nothing is revoked (the hashes are the same)
    applied = await apply_policy(proxy, {**policy, "users": [
        user("alice"), user("bob", max_connections=5)]})
    assert applied["revoked_sessions"] == 0

    applied = await apply_policy(proxy, {**policy, "users": [
        user("alice", disabled=True), user("bob", max_connections=5)]})
    assert applied["revoked_sessions"] == 2
    for tunnel in alice:
        assert await is_closed_by_peer(tunnel.reader)
        await tunnel.close()
        event = await proxy.event_for(tunnel.local_port)
        assert (event["user"], event["close_reason"]) == ("alice", "revoked")
    assert await echoes(bob, b"bob goes on")
    result = await attempt(proxy, "127.0.0.1", echo_server.port, auth=ALICE)
    assert result.auth_ok is False
    assert (await proxy.event_for(result.local_port))["status"] == "auth_failed"

    # removing bob from the file revokes him too
    applied = await apply_policy(proxy, {**policy, "users": [user("alice", disabled=True)]})
    assert applied["revoked_sessions"] == 1
    assert await is_closed_by_peer(bob.reader)
    await bob.close()
    assert (await proxy.event_for(bob.local_port))["close_reason"] == "revoked"


async def test_requiring_authentication_closes_anonymous_sessions(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    proxy = start_proxy({"destinations": LOOPBACK_OK})
    tunnel = await proxy.open("127.0.0.1", echo_server.port)
    applied = await apply_policy(proxy, {"users": [user("alice")], "destinations": LOOPBACK_OK})
    assert applied["revoked_sessions"] == 1
    assert await is_closed_by_peer(tunnel.reader)
    await tunnel.close()
    assert (await proxy.event_for(tunnel.local_port))["close_reason"] == "revoked"


async def test_a_destination_newly_denied_closes_its_sessions(
    start_proxy: StartProxy, tcp_server: ServerFactory,
) -> None:
    kept = await tcp_server(echo_handler)
    cut = await tcp_server(echo_handler)
    proxy = start_proxy({"destinations": LOOPBACK_OK})
    keep = await proxy.open("127.0.0.1", kept.port)
    lose = await proxy.open("localhost", cut.port)
    applied = await apply_policy(proxy, {"destinations": {"rules": [
        {"action": "allow", "cidrs": ["127.0.0.0/8"], "ports": [kept.port]}]}})
    assert applied["revoked_sessions"] == 1
    assert await is_closed_by_peer(lose.reader)
    assert await echoes(keep)
    await lose.close()
    await keep.close()
    assert (await proxy.event_for(lose.local_port))["close_reason"] == "revoked"


# -- limits ------------------------------------------------------------------------------------

async def test_max_connections_per_ip(start_proxy: StartProxy, echo_server: TcpServer) -> None:
    proxy = start_proxy({"limits": {"max_connections_per_ip": 2}, "destinations": LOOPBACK_OK})
    first = await proxy.open("127.0.0.1", echo_server.port)
    second = await proxy.open("127.0.0.1", echo_server.port)
    for _ in range(3):
        await refused(proxy, "127.0.0.1", echo_server.port, "rate_limited")
    assert await echoes(first) and await echoes(second)
    await first.close()
    await proxy.event_for(first.local_port)  # the proxy has seen it end: a slot is free
    third = await proxy.open("127.0.0.1", echo_server.port)
    assert await echoes(third)
    await refused(proxy, "127.0.0.1", echo_server.port, "rate_limited")
    await second.close()
    await third.close()


async def test_connections_per_second_per_ip_allows_a_burst(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    # 2.5 per second: a burst of 3, then one more every 400 ms
    proxy = start_proxy({"limits": {"connections_per_second_per_ip": 2.5},
                         "destinations": LOOPBACK_OK})
    results = await asyncio.gather(
        *(attempt(proxy, "127.0.0.1", echo_server.port) for _ in range(10)))
    reps = sorted(r.rep for r in results)
    admitted = reps.count(0)
    assert 3 <= admitted <= 4, reps  # the burst (plus one refill on a slow machine)
    assert reps.count(NOT_ALLOWED) == 10 - admitted, reps
    for result in results:
        await result.close()
        event = await proxy.event_for(result.local_port)
        assert event["status"] == ("ok" if result.rep == 0 else "rate_limited")
    # the bucket refills: a new connection gets through again (polled, not slept)

    async def one_gets_through() -> bool:
        result = await attempt(proxy, "127.0.0.1", echo_server.port)
        await result.close()
        return result.rep == 0

    async def eventually() -> None:
        while not await one_gets_through():
            await asyncio.sleep(0.1)

    await asyncio.wait_for(eventually(), DEADLINE)


async def test_per_user_limits(start_proxy: StartProxy, echo_server: TcpServer) -> None:
    # alice: two at a time; bob: half a connection per second (a burst of one, the next
    # token 2 s later)
    proxy = start_proxy({"users": [user("alice", max_connections=2),
                                   user("bob", connections_per_second=0.5)],
                         "destinations": LOOPBACK_OK})
    alice = [await proxy.open("127.0.0.1", echo_server.port, auth=ALICE) for _ in range(2)]
    event = await refused(proxy, "127.0.0.1", echo_server.port, "rate_limited", auth=ALICE)
    assert event["user"] == "alice"
    bob = await proxy.open("127.0.0.1", echo_server.port, auth=BOB)  # not alice's limit
    event = await refused(proxy, "127.0.0.1", echo_server.port, "rate_limited", auth=BOB)
    assert event["user"] == "bob"
    for tunnel in [*alice, bob]:
        assert await echoes(tunnel)
    await alice[0].close()
    await proxy.event_for(alice[0].local_port)  # the proxy has seen it end: a slot is free
    again = await proxy.open("127.0.0.1", echo_server.port, auth=ALICE)
    await refused(proxy, "127.0.0.1", echo_server.port, "rate_limited", auth=ALICE)
    for tunnel in [again, alice[1], bob]:
        await tunnel.close()


# -- brute force ---------------------------------------------------------------------------

async def test_failed_authentications_are_throttled_per_source(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    # (a whitelisted source must authenticate all the same)
    proxy = start_proxy({"users": [user("alice")], "destinations": LOOPBACK_OK,
                         "whitelist": ["127.0.0.0/8"],
                         "limits": {"auth_failures_per_minute_per_ip": 3}})
    for guess in ("a", "b", "c"):
        result = await attempt(proxy, "127.0.0.1", echo_server.port, auth=("alice", guess))
        assert result.auth_ok is False
        assert (await proxy.event_for(result.local_port))["status"] == "auth_failed"
    # from now on even the right password fails, with its own status
    for _ in range(2):
        result = await attempt(proxy, "127.0.0.1", echo_server.port, auth=ALICE)
        assert result.auth_ok is False
        event = await proxy.event_for(result.local_port)
        assert (event["status"], event["user"]) == ("rate_limited", "alice")
    record = await proxy.wait_log("authentication throttled: too many failures")
    assert (record["source_ip"], record["per_minute"], record["level"]) == (
        "127.0.0.1", 3, "warning")
    assert echo_server.peers == []


async def test_concurrent_guesses_cannot_outrun_the_throttle(
    start_proxy: StartProxy, echo_server: TcpServer,
) -> None:
    """Guesses sent in parallel must not all be checked before the first failure counts."""
    proxy = start_proxy({"users": [user("alice")], "destinations": LOOPBACK_OK,
                         "limits": {"auth_failures_per_minute_per_ip": 3}})
    results = await asyncio.gather(*(
        attempt(proxy, "127.0.0.1", echo_server.port, auth=("alice", f"guess {i}"))
        for i in range(30)))
    assert all(r.auth_ok is False for r in results)
    events = [await proxy.event_for(r.local_port) for r in results]
    statuses = [e["status"] for e in events]
    assert statuses.count("auth_failed") <= 3, statuses


# -- reload --------------------------------------------------------------------------------

async def test_a_broken_policy_is_refused_and_the_old_one_stays(
    start_proxy: StartProxy, tcp_server: ServerFactory,
) -> None:
    guarded = await tcp_server(echo_handler)
    first: dict[str, Any] = {"destinations": {"block_private": False, "rules": [
        {"action": "deny", "ports": [guarded.port]}]}}
    proxy = start_proxy(first)
    proxy.allow_errors = True  # the refusals are logged as errors; checked below
    old_version = (await proxy.wait_log("proxy listening"))["policy_version"]

    broken = {"destinations": {"block_private": False, "rules": []},
              "whitelist": ["127.0.0.0/33"]}
    write_policy(proxy, broken)
    record = await wait_log_where(proxy, "policy refused; keeping the policy in force")
    assert "whitelist" in record["error"] and "127.0.0.0/33" in record["error"]
    assert record["policy_version"] == old_version
    await refused(proxy, "127.0.0.1", guarded.port, "denied_destination")  # still enforced

    # a plain password where the hash belongs: refused, and never echoed into the log
    write_policy(proxy, "users: [{username: alice, password_hash: hunter2}]\n")
    await poll(lambda: len(logs_where(proxy, "policy refused; keeping the policy in force"))
               == 2, what="the second refusal")
    second = logs_where(proxy, "policy refused; keeping the policy in force")[1]
    assert "users.0.password_hash" in second["error"], second
    assert not [line for line in proxy.lines if "hunter2" in line]

    applied = await apply_policy(proxy, {"destinations": LOOPBACK_OK})
    assert applied["policy_version"] != old_version
    tunnel = await proxy.open("127.0.0.1", guarded.port)
    assert await echoes(tunnel)
    await tunnel.close()
    errors = [r["message"] for r in proxy.logs if r.get("level") in ("error", "critical")]
    assert errors == ["policy refused; keeping the policy in force"] * 2
    assert not [line for line in proxy.lines if "Traceback" in line]


async def test_sighup_applies_at_once(start_proxy: StartProxy, echo_server: TcpServer) -> None:
    proxy = start_proxy({"destinations": LOOPBACK_OK},
                        {"proxy": {"policy_poll_interval": 3600}})
    version = write_policy(proxy, {"destinations": {"block_private": True}})
    proxy.send_signal(signal.SIGHUP)
    await wait_log_where(proxy, "policy applied", policy_version=version)
    await refused(proxy, "127.0.0.1", echo_server.port, "denied_destination")


async def test_sighup_without_a_policy_file_is_harmless(tmp_path: Path) -> None:
    """Without a policy file there is nothing to re-read, but SIGHUP must not kill the node
    (its default action would), e.g. when `up` passes a terminal's hangup on."""
    proxy = ProxyProcess(tmp_path / "proxy", {})
    proxy.policy_path = None  # the default policy: no file at all
    proxy.start()
    try:
        proxy.send_signal(signal.SIGHUP)
        await wait_log_where(proxy, "SIGHUP: no policy file to re-read")
        assert proxy.returncode is None
    finally:
        proxy.stop()


# -- the open-proxy warning ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "warned"),
    [({}, True), ({"whitelist": ["10.0.0.0/8"]}, False), ({"users": [user("alice")]}, False)],
    ids=["open", "whitelist", "users"],
)
async def test_open_proxy_warning(start_proxy: StartProxy, policy: dict[str, Any],
                                  warned: bool) -> None:
    # bound on every interface, port 0, and never sent any traffic
    proxy = start_proxy(policy, listen="0.0.0.0:0")
    # the warning, when due, is logged before "proxy listening", which start() waited for
    record = proxy.has_log(OPEN_PROXY)
    assert (record is not None) is warned
    if record is not None:
        assert (record["level"], record["listen"]) == ("warning", "0.0.0.0")


async def test_no_open_proxy_warning_on_mapped_loopback(start_proxy: StartProxy) -> None:
    proxy = start_proxy({}, listen="[::ffff:127.0.0.1]:0")
    assert proxy.has_log(OPEN_PROXY) is None
