"""RFC 1928 / RFC 1929 conformance, clause by clause, against a real proxy process.

What test_connect, test_bind, test_udp, test_auth and test_errors already check is not
repeated here; these are the clauses they left open (found by tests/proxy_node/rfc_probe.py,
the standalone probe). Raw sockets, byte-exact; loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from proxy_harness import (
    BIND,
    CONNECT,
    DEADLINE,
    HAS_IPV6,
    HTTP_BODY,
    UDP_ASSOCIATE,
    ProxyProcess,
    TcpServer,
    Tunnel,
    UdpClient,
    UdpEcho,
    auth_request,
    greeting,
    is_closed_by_peer,
    parse_udp_datagram,
    socks_request,
    udp_datagram,
)

USERS = {"carol": "conformance"}
EchoFactory = Callable[..., Awaitable[UdpEcho]]
ClientFactory = Callable[..., UdpClient]


def _loopback_alias(ip: str) -> bool:
    """Whether this machine can use `ip` (in 127/8) as a source address."""
    try:
        with socket.socket() as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


needs_loopback_aliases = pytest.mark.skipif(
    not all(_loopback_alias(ip) for ip in ("127.0.0.2", "127.0.0.3")),
    reason="127.0.0.2 and 127.0.0.3 are not usable here",
)


@pytest.fixture(scope="module")
def users_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose policy lists a user: RFC 1929 required."""
    proc = ProxyProcess(tmp_path_factory.mktemp("users-proxy"), {}, users=USERS).start()
    yield proc
    proc.stop()
    assert not proc.problems(), "\n".join(proc.problems())


async def _read(reader: asyncio.StreamReader, count: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(count), DEADLINE)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (held bound, so no one else takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- §6 replies: the layout, byte by byte, and the close after a failure ------------------------

FAILURE_TAIL = b"\x00\x01" + bytes(6)  # RSV, ATYP IPv4, 0.0.0.0, port 0


async def test_ipv6_connect_reply_is_atyp_4_with_the_address_used(
    proxy: ProxyProcess, echo_server6: TcpServer
) -> None:
    reader, writer = await proxy.raw()
    writer.write(greeting(b"\x00"))
    assert await _read(reader, 2) == b"\x05\x00"
    writer.write(socks_request(CONNECT, "::1", echo_server6.port))
    reply = await _read(reader, 22)  # VER REP RSV ATYP, 16 address bytes, 2 port bytes
    assert reply[:4] == b"\x05\x00\x00\x04"
    writer.write(b"v6")
    assert await _read(reader, 2) == b"v6"
    peer_ip, peer_port = echo_server6.peers[0][:2]
    assert reply[4:] == socket.inet_pton(socket.AF_INET6, peer_ip) + struct.pack("!H", peer_port)
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "rep"),
    [
        (b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07),  # CMD 0x00
        (b"\x05\xff\x00\x03\x09localhost\x00\x50", 0x07),  # CMD 0xFF, by name
        (b"\x05\x01\x00\x00\x7f\x00\x00\x01\x00\x50", 0x08),  # ATYP 0x00
        (b"\x05\x01\x00\xff\x7f\x00\x00\x01\x00\x50", 0x08),  # ATYP 0xFF
    ],
    ids=["cmd-0x00", "cmd-0xff-domain", "atyp-0x00", "atyp-0xff"],
)
async def test_failure_reply_bytes_then_close(
    proxy: ProxyProcess, request_bytes: bytes, rep: int
) -> None:
    reader, writer = await proxy.raw()
    writer.write(greeting(b"\x00") + request_bytes)
    assert await _read(reader, 12) == b"\x05\x00" + bytes((5, rep)) + FAILURE_TAIL
    assert await is_closed_by_peer(reader)  # §6: the server terminates the connection
    writer.close()


async def test_failure_reply_reaches_a_client_that_pipelined_data(
    proxy: ProxyProcess, closed_port: int
) -> None:
    """Data pipelined after a request that fails is never read: the reply still arrives
    whole before the connection ends."""
    reader, writer = await proxy.raw()
    writer.write(
        greeting(b"\x00") + socks_request(CONNECT, "127.0.0.1", closed_port) + bytes(256 * 1024)
    )
    assert await _read(reader, 12) == b"\x05\x00\x05\x05" + FAILURE_TAIL
    assert await is_closed_by_peer(reader)
    writer.transport.abort()


# -- RFC 1929 ----------------------------------------------------------------------------------


async def test_auth_with_another_subnegotiation_version_fails_and_closes(
    users_proxy: ProxyProcess,
) -> None:
    reader, writer = await users_proxy.raw()
    writer.write(greeting(b"\x02"))
    assert await _read(reader, 2) == b"\x05\x02"
    writer.write(b"\x05" + auth_request("carol", USERS["carol"])[1:])  # VER 5, not 1
    status = await _read(reader, 2)
    assert status[0] == 0x01 and status[1] != 0x00, status
    assert await is_closed_by_peer(reader)  # RFC 1929 §2: a failure MUST close
    writer.close()


async def test_truncated_auth_then_eof_closes_without_success(
    users_proxy: ProxyProcess,
) -> None:
    reader, writer = await users_proxy.raw()
    writer.write(greeting(b"\x02") + auth_request("carol", USERS["carol"])[:-3])
    writer.write_eof()
    assert await _read(reader, 2) == b"\x05\x02"
    assert await is_closed_by_peer(reader)  # and no status byte pair before it
    writer.close()


@pytest.mark.parametrize(
    "proxy_args",
    [
        ["--proxy", "socks5h://carol:conformance@127.0.0.1:{port}"],
        ["--proxy", "socks5://carol:conformance@127.0.0.1:{port}"],
        ["--socks5", "127.0.0.1:{port}", "--proxy-user", "carol:conformance"],
    ],
    ids=["socks5h-url", "socks5-url", "socks5-proxy-user"],
)
async def test_curl_authenticates_in_every_form(
    users_proxy: ProxyProcess, http_server: tuple[str, int], curl: str, proxy_args: list[str]
) -> None:
    args = [arg.format(port=users_proxy.port) for arg in proxy_args]
    done = await asyncio.to_thread(
        subprocess.run,
        [curl, "-sS", "--fail", "--max-time", "20", "--noproxy", "", "--output", "-", *args,
         f"http://localhost:{http_server[1]}/data"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == HTTP_BODY


# -- §7 UDP ASSOCIATE ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "client_ip", "dst"),
    [
        ("127.0.0.1:0", "127.0.0.1", "localhost"),
        ("[::1]:0", "::1", "::1"),
        ("[::1]:0", "::1", "localhost"),
    ],
    ids=["v4-dst-name", "v6-dst-ip", "v6-dst-name"],
)
async def test_udp_associate_with_the_client_address_given(
    proxy_factory: Callable[..., ProxyProcess],
    udp_echo: EchoFactory,
    udp_client: ClientFactory,
    listen: str,
    client_ip: str,
    dst: str,
) -> None:
    """DST.ADDR/DST.PORT as the client's own (by IP or by name): BND.ADDR is the control
    connection's local address, in its family; datagrams to every ATYP come back with the
    RFC header naming their source; another port of the client's host is dropped."""
    if ":" in client_ip and not HAS_IPV6:
        pytest.skip("no ::1 on this machine")
    proxy = proxy_factory(listen=listen)
    client = udp_client(client_ip)
    other = udp_client(client_ip)
    control = await proxy.request(UDP_ASSOCIATE, dst, client.port)
    assert control.reply.rep == 0
    assert control.reply.host == control.proxy_side[0] == client_ip
    relay = (control.reply.host, control.reply.port)
    echo4 = await udp_echo("127.0.0.1")
    targets = [("127.0.0.1", echo4, "127.0.0.1"), ("localhost", echo4, "127.0.0.1")]
    if HAS_IPV6:
        targets.append(("::1", await udp_echo("::1"), "::1"))
    for host, echo, source in targets:
        other.send(udp_datagram(host, echo.port, b"not the client's port"), relay)
        client.send(udp_datagram(host, echo.port, host.encode()), relay)
        data, sender = await client.recv()
        assert sender[:2] == relay
        assert parse_udp_datagram(data) == (source, echo.port, host.encode())
    received = [payload for _, echo, _ in targets for payload, _ in echo.received]
    assert b"not the client's port" not in received
    assert other.pending() is None
    await control.close()


@pytest.mark.skipif(not _loopback_alias("127.0.0.9"), reason="127.0.0.9 is not usable here")
async def test_udp_datagrams_from_another_ip_are_dropped(
    proxy: ProxyProcess, udp_echo: EchoFactory, udp_client: ClientFactory
) -> None:
    """§7: the relay MUST drop datagrams from any source IP but the client's, even the
    first one of an association whose client announced no address (0.0.0.0:0)."""
    echo = await udp_echo()
    client = udp_client()
    stranger = udp_client("127.0.0.9")
    control = await proxy.request(UDP_ASSOCIATE, "0.0.0.0", 0)
    assert control.reply.rep == 0
    relay = (control.reply.host, control.reply.port)
    stranger.send(udp_datagram(echo.host, echo.port, b"from 127.0.0.9"), relay)
    stranger.send(b"\x00\x00\x00\x02" + bytes(6) + b"bad ATYP", relay)
    client.send(b"\x00\x00\x00\x05" + bytes(6) + b"bad ATYP", relay)
    client.send(udp_datagram(echo.host, echo.port, b"mine"), relay)
    data, _ = await client.recv()
    assert parse_udp_datagram(data)[2] == b"mine"
    assert [payload for payload, _ in echo.received] == [b"mine"]
    assert stranger.pending() is None
    await control.close()


async def _stranger_is_turned_away(control: Tunnel, source_ip: str) -> None:
    """A connection to the BIND port from `source_ip` is closed (had it been taken, it
    would stay open for relaying, and the next reply would name it)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(control.reply.host, control.reply.port, local_addr=(source_ip, 0)),
        DEADLINE,
    )
    try:
        assert await is_closed_by_peer(reader)
    finally:
        writer.close()


async def _expected_host_is_taken(control: Tunnel, source_ip: str) -> None:
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(control.reply.host, control.reply.port, local_addr=(source_ip, 0)),
        DEADLINE,
    )
    second = await control.read_reply()
    assert (second.rep, second.host, second.port) == (
        0,
        source_ip,
        writer.get_extra_info("sockname")[1],
    )
    writer.close()


# -- BIND (RFC 1928 §4): DST.ADDR names the host expected to connect --------------------------


@needs_loopback_aliases
async def test_bind_to_an_ip_takes_only_that_host(proxy: ProxyProcess) -> None:
    control = await proxy.request(BIND, "127.0.0.2", 0)
    assert control.reply.rep == 0
    await _stranger_is_turned_away(control, "127.0.0.3")
    await _expected_host_is_taken(control, "127.0.0.2")
    await control.close()


@needs_loopback_aliases
async def test_bind_to_a_name_takes_only_the_hosts_it_resolves_to(
    proxy: ProxyProcess,
) -> None:
    """DST.ADDR as a domain is resolved; a host it does not name is turned away."""
    control = await proxy.request(BIND, "localhost", 0)
    assert (control.reply.rep, control.reply.host) == (0, "127.0.0.1")
    await _stranger_is_turned_away(control, "127.0.0.3")
    await _expected_host_is_taken(control, "127.0.0.1")
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["domain"], event["dest_ip"], event["status"]) == ("localhost", "127.0.0.1", "ok")


@pytest.mark.parametrize("style", ["pipelined", "bytewise"])
async def test_bind_handshake_framing_and_early_data(proxy: ProxyProcess, style: str) -> None:
    """A BIND request pipelined with the greeting and with data (or sent a byte at a time):
    the data waits for the peer and reaches it first."""
    control = await proxy.request(BIND, "127.0.0.1", 0, style=style, early=b"early")
    assert control.reply.rep == 0
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(control.reply.host, control.reply.port), DEADLINE
    )
    second = await control.read_reply()
    assert (second.rep, second.port) == (0, writer.get_extra_info("sockname")[1])
    assert await _read(reader, 5) == b"early"
    writer.close()
    await control.close()


async def test_bind_to_an_unresolvable_name_is_host_unreachable(proxy: ProxyProcess) -> None:
    control = await proxy.request(BIND, "nothing.invalid", 0)
    assert control.reply.rep == 0x04
    assert await is_closed_by_peer(control.reader)
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["status"], event["reply_code"]) == ("dns_failed", 4)


# -- RFC 1928 §6: every failure is answered, even one of the proxy's own -----------------------


@contextlib.contextmanager
def _free_descriptors(pid: int, count: int) -> Iterator[None]:
    """Lower the process's descriptor limit so that only `count` descriptor numbers are
    left (with 1, the next accept takes it, and the request's own socket then fails with
    EMFILE)."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    free = [n for n in range(len(used) + count + 1) if n not in used]
    limit = free[count - 1] + 1 if count else free[0]
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        # the soft limit only: raising it back needs no privilege
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, before[1]))
    except (PermissionError, ValueError) as exc:
        pytest.skip(f"cannot lower the proxy's descriptor limit: {exc}")
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


@pytest.mark.parametrize(
    ("cmd", "host"),
    [(CONNECT, "127.0.0.1"), (BIND, "0.0.0.0"), (UDP_ASSOCIATE, "0.0.0.0")],
    ids=["connect", "bind", "udp-associate"],
)
async def test_out_of_descriptors_is_a_general_failure_reply(
    proxy_factory: Callable[..., ProxyProcess], cmd: int, host: str
) -> None:
    """A socket the proxy cannot open for the request (EMFILE) is REP 0x01, then a close;
    not a silent close with a traceback in the log."""
    proxy = proxy_factory()
    proxy.allow_errors = True  # the accept loop's own EMFILE is logged as an error
    with _free_descriptors(proxy.pid, 1):
        control = await proxy.request(cmd, host, 9)
        assert control.reply.rep == 0x01
        assert await is_closed_by_peer(control.reader)
        await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["status"], event["reply_code"], event["close_reason"]) == ("error", 1, "error")
    assert not [line for line in proxy.problems() if "accept failed" not in line]


@pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this machine")
async def test_udp_datagram_the_relay_cannot_send_is_dropped_silently(
    proxy_factory: Callable[..., ProxyProcess], udp_echo: EchoFactory, udp_client: ClientFactory
) -> None:
    """§7: the relay drops what it cannot relay. Out of descriptors for its IPv6 outbound
    socket, a datagram to ::1 is dropped (no traceback); the association lives on, and
    once a descriptor is free again the same destination works."""
    proxy = proxy_factory()
    echo4, echo6 = await udp_echo("127.0.0.1"), await udp_echo("::1")
    client = udp_client()
    control = await proxy.request(UDP_ASSOCIATE, "0.0.0.0", 0)
    assert control.reply.rep == 0
    relay = (control.reply.host, control.reply.port)

    async def echoed(echo: UdpEcho, payload: bytes) -> None:
        client.send(udp_datagram(echo.host, echo.port, payload), relay)
        data, _ = await client.recv()
        assert parse_udp_datagram(data)[2] == payload

    await echoed(echo4, b"v4 socket made")
    with _free_descriptors(proxy.pid, 0):
        client.send(udp_datagram("::1", echo6.port, b"no socket for this one"), relay)
        await echoed(echo4, b"after it")  # the relay has handled the one before
    await echoed(echo6, b"v6 socket made")
    assert [payload for payload, _ in echo6.received] == [b"v6 socket made"]
    await control.close()
    assert not proxy.problems()


# -- a Chromium-style client: greeting offering only 0x00, the name sent as ATYP 0x03 ----------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-deps)")
async def test_chromium_fetches_a_page_through_the_proxy(
    tmp_path: Path, http_server: tuple[str, int]
) -> None:
    """Chromium's SOCKS5 client (no-auth only, domain ATYP, reads the reply header in two
    parts) loads a plain-HTTP page: no HTTP CONNECT, the bytes go straight through."""
    proxy = ProxyProcess(tmp_path / "proxy", {})
    # Only localhost may be reached, so Chromium's own background requests (if any get
    # through the flags below) are refused by name before any DNS query.
    proxy.write_policy(
        {},
        destinations={
            "block_private": False,
            "rules": [{"action": "allow", "domains": ["localhost"]}, {"action": "deny"}],
        },
    )
    proxy.start()
    _, port = http_server
    assert CHROMIUM is not None
    try:
        with tempfile.TemporaryDirectory(prefix="s5a-chromium-") as profile:
            command = [
                CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic",
                f"--user-data-dir={profile}",
                f"--proxy-server=socks5://127.0.0.1:{proxy.port}",
                "--proxy-bypass-list=<-loopback>",  # loopback goes through the proxy too
                "--dump-dom", f"http://localhost:{port}/page",
            ]  # fmt: skip
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, timeout=120, check=False
            )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        assert b"Error code: 404" in done.stdout, done.stdout[-500:]  # HttpHandler's answer
        events = await proxy.wait_events(lambda e: e["domain"] == "localhost")
        assert all(e["command"] == "connect" for e in events)
        served = [e for e in events if e["status"] == "ok" and e["bytes_in"] > 0]
        assert served, events
        assert (served[0]["dest_port"], served[0]["reply_code"]) == (port, 0)
    finally:
        proxy.stop()
    assert not proxy.problems(), proxy.problems()
