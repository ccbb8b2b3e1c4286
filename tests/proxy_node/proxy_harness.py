"""The harness of the proxy node's integration tests: a real proxy process, a SOCKS5 client
written from the RFC (not from proxy_node.wire), and destination servers.

The proxy runs as `socks5-analytics proxy` in a child process on 127.0.0.1 port 0; its
port comes from the "proxy listening" log line and its events from the JSON-lines file.
Nothing here sleeps to wait for something: every wait polls with a deadline and fails
with what it was waiting for. The fixtures that use this live in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from socks5_analytics.passwords import hash_password

# -- constants of the protocol (written out here so the tests do not trust proxy_node.wire) --

CONNECT, BIND, UDP_ASSOCIATE = 0x01, 0x02, 0x03
NO_AUTH, USER_PASS, NO_ACCEPTABLE = 0x00, 0x02, 0xFF

DEADLINE = 10.0  # seconds any single wait may take before the test fails

_BIN = Path(sys.executable).with_name("socks5-analytics")
_PROXY_CMD = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "socks5_analytics"]


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound on this machine."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this machine")


async def poll(check: Callable[[], Any], *, timeout: float = DEADLINE, what: str = "it",
               interval: float = 0.01) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _clean_env() -> dict[str, str]:
    """This environment minus anything that could reconfigure the proxy or curl."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
    return {k: v for k, v in os.environ.items()
            if not k.startswith("S5A_") and k.lower() not in drop}


# -- the SOCKS5 client side ----------------------------------------------------------------

def encode_address(host: str, port: int) -> bytes:
    """ATYP, ADDR, PORT for an IP literal or a domain name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return bytes((0x03, len(name))) + name + struct.pack("!H", port)
    atyp = 0x01 if ip.version == 4 else 0x04
    return bytes((atyp,)) + ip.packed + struct.pack("!H", port)


def greeting(methods: bytes) -> bytes:
    return bytes((5, len(methods))) + methods


def auth_request(username: str, password: str) -> bytes:
    user, pw = username.encode(), password.encode()
    return bytes((1, len(user))) + user + bytes((len(pw),)) + pw


def socks_request(cmd: int, host: str, port: int) -> bytes:
    return bytes((5, cmd, 0)) + encode_address(host, port)


def udp_datagram(host: str, port: int, payload: bytes, *, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes((frag,)) + encode_address(host, port) + payload


def parse_udp_datagram(data: bytes) -> tuple[str, int, bytes]:
    """(source host, source port, payload) of a datagram the relay sent back."""
    assert data[:3] == b"\x00\x00\x00", data[:3]
    atyp = data[3]
    if atyp == 0x01:
        host, end = str(ipaddress.IPv4Address(data[4:8])), 8
    elif atyp == 0x04:
        host, end = str(ipaddress.IPv6Address(data[4:20])), 20
    else:
        raise AssertionError(f"unexpected ATYP {atyp:#x} in a relayed datagram")
    (port,) = struct.unpack("!H", data[end:end + 2])
    return host, port, data[end + 2:]


@dataclass
class Reply:
    """A SOCKS5 reply: REP and BND.ADDR/BND.PORT."""

    rep: int
    host: str
    port: int


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readexactly(4)
    assert head[0] == 5 and head[2] == 0, f"bad reply header {head!r}"
    atyp = head[3]
    if atyp == 0x01:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == 0x04:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif atyp == 0x03:
        length = (await reader.readexactly(1))[0]
        host = (await reader.readexactly(length)).decode()
    else:
        raise AssertionError(f"reply with unknown ATYP {atyp:#x}")
    (port,) = struct.unpack("!H", await reader.readexactly(2))
    return Reply(head[1], host, port)


class SocksError(Exception):
    """The proxy answered a request with REP != 0."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"SOCKS reply {reply.rep:#04x}")
        self.reply = reply


@dataclass
class Tunnel:
    """A client connection to the proxy after its request got a reply."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reply: Reply
    started_wall: float = 0.0

    @property
    def local_port(self) -> int:
        """The client socket's port: the event's source_port."""
        return int(self.writer.get_extra_info("sockname")[1])

    @property
    def proxy_side(self) -> tuple[str, int]:
        """The proxy's address on this control connection."""
        peer = self.writer.get_extra_info("peername")
        return str(peer[0]), int(peer[1])

    async def roundtrip(self, payload: bytes) -> bytes:
        self.writer.write(payload)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(payload)), DEADLINE)

    async def read_reply(self) -> Reply:
        return await asyncio.wait_for(read_reply(self.reader), DEADLINE)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def read_until_eof(reader: asyncio.StreamReader, *, timeout: float = DEADLINE) -> bytes:
    """Everything up to EOF; a reset counts as EOF (the caller checks what arrived)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def is_closed_by_peer(reader: asyncio.StreamReader, *, timeout: float = DEADLINE) -> bool:
    """True once the peer closes or resets; fails the test if data arrives instead."""
    try:
        data = await asyncio.wait_for(reader.read(1024), timeout)
    except ConnectionResetError:
        return True
    assert data == b"", f"expected the connection to close, got {data!r}"
    return True


def event_started(event: dict[str, Any]) -> float:
    """An event's started_at as wall-clock seconds."""
    moment = datetime.strptime(event["started_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=UTC).timestamp()


def started_after(event: dict[str, Any], since: float) -> bool:
    """Whether the event's connection started at or after `since` (time.time() taken
    before connecting); 10 us of slack for the microsecond rounding."""
    return event_started(event) >= since - 1e-5


# -- the proxy process -----------------------------------------------------------------------

class ProxyProcess:
    """One `socks5-analytics proxy` child process and what it logged and emitted."""

    def __init__(self, workdir: Path, config: dict[str, Any], *,
                 users: dict[str, str] | None = None, listen: str = "127.0.0.1:0") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.events_path = workdir / "events.jsonl"
        base = {
            "node_id": "test-node",
            "log": {"format": "json", "level": "info"},
            "proxy": {
                "metrics_listen": "127.0.0.1:0",  # many proxies at once: a free port each
                "events": {"path": str(self.events_path), "flush_interval": 0.05},
                "shutdown_grace": 2.0,
                "handshake_timeout": 10.0,
                "connect_timeout": 5.0,
            },
        }
        self.config = _merge(base, config)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        # Every test proxy has a policy: the targets are on loopback, which the default
        # policy (block_private: true) rightly refuses.
        self.policy_path: Path | None = workdir / "policy.yaml"
        self.write_policy(users or {})
        self.listen = listen
        self.host = "127.0.0.1"
        self.port = 0
        self.lines: list[str] = []
        self.logs: list[dict[str, Any]] = []
        self.allow_errors = False
        self.opened_at: dict[int, float] = {}  # client port -> when raw() connected from it
        self.clients: list[asyncio.StreamWriter] = []  # what raw() opened, for teardown
        self._ready = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump_thread: threading.Thread | None = None

    # lifecycle

    def write_policy(self, users: dict[str, str], **extra: Any) -> None:
        """(Re)write the policy file with these users (passwords hashed, cheaply); loopback
        destinations allowed unless `extra` says otherwise."""
        assert self.policy_path is not None
        doc: dict[str, Any] = {"destinations": {"block_private": False}}
        if users:
            doc["users"] = [{"username": name, "password_hash": hash_password(pw, n=2**4)}
                            for name, pw in users.items()]
        doc.update(extra)
        # Atomic, as operators (and Kubernetes) replace files: the proxy polls it meanwhile.
        scratch = self.policy_path.with_suffix(".tmp")
        scratch.write_text(yaml.safe_dump(doc))
        os.replace(scratch, self.policy_path)

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        cmd = [*_PROXY_CMD, "proxy", "--config", str(self.config_path), "--listen", self.listen]
        if self.policy_path is not None:
            cmd += ["--policy", str(self.policy_path)]
        self._proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=_clean_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, name="proxy-log", daemon=True)
        self._pump_thread.start()
        if not self._ready.wait(timeout) or not self.port:
            self.kill()
            raise AssertionError("proxy did not start:\n" + "\n".join(self.lines[-40:]))
        return self

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            self.logs.append(record)
            if record.get("message") == "proxy listening" and not self.port:
                host, _, port = str(record["address"]).rpartition(":")
                self.host = host.strip("[]")
                self.port = int(port)
                self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        assert self._proc is not None
        return self._proc.poll()

    def send_signal(self, signum: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(signum)

    async def wait_exit(self, timeout: float = DEADLINE) -> int:
        await poll(lambda: self.returncode is not None, timeout=timeout,
                   what="the proxy process to exit")
        rc = self.returncode
        assert rc is not None
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        if self._proc is not None and self._proc.stdout is not None:
            if self._pump_thread is not None:
                self._pump_thread.join(timeout=5)
            self._proc.stdout.close()

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it does not exit in time."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            grace = float(self.config["proxy"].get("shutdown_grace", 2.0))
            try:
                self._proc.wait(timeout=grace + 10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def problems(self) -> list[str]:
        """Log lines that mean a bug: tracebacks and error-level records."""
        bad = [json.dumps(r) for r in self.logs if r.get("level") in ("error", "critical")]
        bad += [line for line in self.lines if "Traceback" in line]
        return bad

    # logs and events

    def has_log(self, message: str) -> dict[str, Any] | None:
        for record in list(self.logs):
            if record.get("message") == message:
                return record
        return None

    async def wait_log(self, message: str, timeout: float = DEADLINE) -> dict[str, Any]:
        result: dict[str, Any] = await poll(lambda: self.has_log(message), timeout=timeout,
                                            what=f"log {message!r}")
        return result

    def events(self) -> list[dict[str, Any]]:
        """Every complete event line written so far."""
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        complete, _, _ = text.rpartition("\n")
        return [json.loads(line) for line in complete.splitlines() if line]

    async def wait_events(self, check: Callable[[dict[str, Any]], bool], *, count: int = 1,
                          timeout: float = DEADLINE) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]] | None:
            found = [e for e in self.events() if check(e)]
            return found if len(found) >= count else None

        result: list[dict[str, Any]] = await poll(matching, timeout=timeout,
                                                  what=f"{count} matching event(s)")
        return result

    async def event_for(self, source_port: int, timeout: float = DEADLINE, *,
                        since: float | None = None) -> dict[str, Any]:
        """The event of the connection from this client port (exactly one).

        Client ports are reused over a session, so only events that started after the
        connection was opened count: `since` (wall-clock seconds), by default the time
        `raw()` last opened a connection from this port.
        """
        if since is None:
            since = self.opened_at.get(source_port, 0.0)
        found = await self.wait_events(
            lambda e: e["source_port"] == source_port and started_after(e, since),
            timeout=timeout)
        assert len(found) == 1, f"{len(found)} events for source port {source_port}: {found}"
        return found[0]

    # client side

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain TCP connection to the proxy (its opening time kept for `event_for`)."""
        opened = time.time()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), DEADLINE)
        self.opened_at[int(writer.get_extra_info("sockname")[1])] = opened
        self.clients.append(writer)
        return reader, writer

    def close_clients(self) -> None:
        """Abort every client connection a test left open (say, because it failed), so
        its sockets do not surface later as another test's ResourceWarning."""
        for writer in self.clients:
            if not writer.is_closing():
                writer.transport.abort()
        self.clients.clear()

    async def request(self, cmd: int, host: str, port: int, *,
                      auth: tuple[str, str] | None = None, style: str = "normal",
                      early: bytes = b"") -> Tunnel:
        """Greeting, optional RFC 1929 auth and a request; the reply may be a failure.

        style: "normal" (one message at a time, each answered before the next),
        "pipelined" (everything, `early` data included, in a single send) or "bytewise"
        (every handshake byte in its own segment).
        """
        started = time.time()
        reader, writer = await self.raw()
        methods = bytes((USER_PASS,)) if auth else bytes((NO_AUTH,))
        messages = [greeting(methods)]
        if auth:
            messages.append(auth_request(*auth))
        messages.append(socks_request(cmd, host, port))
        try:
            if style == "pipelined":
                writer.write(b"".join(messages) + early)
                await writer.drain()
                await self._read_handshake_answers(reader, auth)
            elif style == "bytewise":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for byte in b"".join(messages):
                    writer.write(bytes((byte,)))
                    await writer.drain()
                    await asyncio.sleep(0.002)  # keep the bytes in separate segments
                writer.write(early)
                await self._read_handshake_answers(reader, auth)
            else:
                writer.write(messages[0])
                await writer.drain()
                choice = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
                assert choice == bytes((5, methods[0])), f"method selection {choice!r}"
                if auth:
                    writer.write(messages[1])
                    await writer.drain()
                    status = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
                    assert status == b"\x01\x00", f"auth status {status!r}"
                writer.write(messages[-1] + early)
                await writer.drain()
            reply = await asyncio.wait_for(read_reply(reader), DEADLINE)
        except BaseException:
            writer.close()
            raise
        return Tunnel(reader, writer, reply, started)

    @staticmethod
    async def _read_handshake_answers(reader: asyncio.StreamReader,
                                      auth: tuple[str, str] | None) -> None:
        expected = b"\x05\x02\x01\x00" if auth else b"\x05\x00"
        got = await asyncio.wait_for(reader.readexactly(len(expected)), DEADLINE)
        assert got == expected, f"handshake answers {got!r}, expected {expected!r}"

    async def open(self, host: str, port: int, **kwargs: Any) -> Tunnel:
        """A CONNECT tunnel; raises SocksError if the proxy refused."""
        tunnel = await self.request(CONNECT, host, port, **kwargs)
        if tunnel.reply.rep != 0:
            await tunnel.close()
            raise SocksError(tunnel.reply)
        return tunnel


# -- destination servers (asyncio, on the test's loop) -----------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class TcpServer:
    """A server on the test's loop; `peers` are the client addresses it accepted."""

    host: str
    port: int
    server: asyncio.Server
    peers: list[tuple[str, int]] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    results: list[Any] = field(default_factory=list)


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte; at EOF, half-close back and finish."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


# Bulk protocol: the client sends a 16-byte header (upload length, download length) and then
# its upload; the server streams `download` bytes of BULK_DATA, reads the upload to EOF, and
# finishes with the sha256 of what it received (32 bytes), then closes.

_BULK_SIZE = 32 * 1024 * 1024
_bulk_data: bytes | None = None


def bulk_data() -> bytes:
    """32 MiB of random bytes, made once per session."""
    global _bulk_data
    if _bulk_data is None:
        _bulk_data = os.urandom(_BULK_SIZE)
    return _bulk_data


async def bulk_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    upload, download = struct.unpack("!QQ", await reader.readexactly(16))
    data = memoryview(bulk_data())

    async def send() -> None:
        for offset in range(0, download, 1 << 20):
            writer.write(data[offset:min(download, offset + (1 << 20))])
            await writer.drain()

    async def receive() -> bytes:
        digest = hashlib.sha256()
        received = 0
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
            received += len(chunk)
        assert received == upload, f"server received {received} of {upload} bytes"
        return digest.digest()

    sender = asyncio.ensure_future(send())
    try:
        digest = await receive()
        await sender
    finally:
        sender.cancel()
    writer.write(digest)
    await writer.drain()


@dataclass
class UdpEcho:
    """A UDP echo server; `received` holds (payload, source address)."""

    host: str
    port: int
    transport: asyncio.DatagramTransport
    received: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)


class UdpEchoProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(data, addr)


class UdpClient:
    """A client UDP socket on the test's loop."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((host, 0))

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(data, addr)

    async def recv(self, timeout: float = DEADLINE) -> tuple[bytes, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65535), timeout)
        return data, addr

    def pending(self) -> bytes | None:
        """A datagram already waiting, if any."""
        try:
            return self.sock.recv(65535)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.sock.close()


# -- an HTTP server in a thread, for curl and python-socks -------------------------------------

HTTP_BODY = hashlib.sha256(b"socks5").hexdigest().encode() * 4096  # 256 KiB


class HttpHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/data":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(HTTP_BODY)))
        self.end_headers()
        self.wfile.write(HTTP_BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


