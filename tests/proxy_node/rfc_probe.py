"""A standalone RFC 1928 / RFC 1929 conformance probe, run against a real proxy process.

    .venv/bin/python tests/proxy_node/rfc_probe.py [-v]

It starts `socks5-analytics proxy` four times (no auth; with one user; on [::1]; on [::]) with
temporary configs and policies, as the tests do. Everything is blocking sockets written
from the RFC texts; targets live on 127.0.0.1 and ::1 only. Every check prints PASS or
FAIL with the bytes seen; the exit status is the number of failures. The pytest suite
(test_rfc_conformance.py and its neighbours) carries the same checks as tests.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_harness import HAS_IPV6, ProxyProcess

TIMEOUT = 10.0  # RFC 1928 §6: a failure reply is followed by a close within 10 s
USER, PASSWORD = "probe", "pr0be-pass"

results: list[tuple[str, bool, str]] = []
VERBOSE = False


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    if VERBOSE or not ok:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  -- {detail}" if detail else ""))
    return ok


# -- the client side, from the RFC ---------------------------------------------------------------


def addr_bytes(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return bytes((3, len(name))) + name + struct.pack("!H", port)
    return bytes((1 if ip.version == 4 else 4,)) + ip.packed + struct.pack("!H", port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {data!r} ({n} bytes expected)")
        data += chunk
    return data


def read_reply(sock: socket.socket) -> tuple[bytes, int, int, str, int]:
    """(raw bytes, REP, ATYP, BND.ADDR, BND.PORT); asserts VER 5 and RSV 0 by returning
    the raw header for the caller to check."""
    head = recv_exact(sock, 4)
    atyp = head[3]
    if atyp == 1:
        raw = recv_exact(sock, 4)
        host = str(ipaddress.IPv4Address(raw))
    elif atyp == 4:
        raw = recv_exact(sock, 16)
        host = str(ipaddress.IPv6Address(raw))
    elif atyp == 3:
        length = recv_exact(sock, 1)
        raw = length + recv_exact(sock, length[0])
        host = raw[1:].decode()
    else:
        raise AssertionError(f"reply ATYP {atyp:#x}: {head!r}")
    port_raw = recv_exact(sock, 2)
    (port,) = struct.unpack("!H", port_raw)
    return head + raw + port_raw, head[1], atyp, host, port


def closed_within(sock: socket.socket, seconds: float = TIMEOUT) -> tuple[bool, bytes]:
    """Whether the peer closes (FIN or RST) within `seconds`; what arrived meanwhile."""
    sock.settimeout(seconds)
    got = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except ConnectionResetError:
        return True, got
    except TimeoutError:
        return False, got
    return False, got


class Client:
    def __init__(self, proxy: tuple[str, int]) -> None:
        self.sock = socket.create_connection(proxy, timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes, bytewise: bool = False) -> None:
        if not bytewise:
            self.sock.sendall(data)
            return
        for b in data:
            self.sock.sendall(bytes((b,)))
            time.sleep(0.003)

    def hello(self, methods: bytes = b"\x00", **kw: Any) -> bytes:
        self.send(bytes((5, len(methods))) + methods, **kw)
        return recv_exact(self.sock, 2)

    def auth(self, user: str, password: str, **kw: Any) -> bytes:
        u, p = user.encode(), password.encode()
        self.send(bytes((1, len(u))) + u + bytes((len(p),)) + p, **kw)
        return recv_exact(self.sock, 2)

    def request(
        self, cmd: int, host: str, port: int, *, rsv: int = 0, **kw: Any
    ) -> tuple[bytes, int, int, str, int]:
        self.send(bytes((5, cmd, rsv)) + addr_bytes(host, port), **kw)
        return read_reply(self.sock)


# -- targets ---------------------------------------------------------------------------------


class Echo:
    """A threaded TCP echo server that records its peers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append((peer[0], peer[1]))
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


class UdpEcho:
    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, Any]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.received.append((data, addr))
            self.sock.sendto(data, addr)


def closed_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def header_ok(name: str, raw: bytes, rep: int, atyp: int | None = None) -> bool:
    ok = raw[0] == 5 and raw[2] == 0 and raw[1] == rep
    if atyp is not None:
        ok = ok and raw[3] == atyp
    return check(name, ok, f"reply {raw.hex(' ')}")


# -- the checks ------------------------------------------------------------------------------


def probe_greeting(proxy: tuple[str, int]) -> None:
    with Client(proxy) as c:
        check("greeting 05 01 00 -> 05 00", c.hello() == b"\x05\x00")
    with Client(proxy) as c:
        check("greeting bytewise -> 05 00", c.hello(b"\x00", bytewise=True) == b"\x05\x00")
    with Client(proxy) as c:
        check("greeting offering 01 02 00 80 picks 00", c.hello(b"\x01\x02\x00\x80") == b"\x05\x00")
    with Client(proxy) as c:
        got = c.hello(b"")
        closed, extra = closed_within(c.sock)
        check(
            "NMETHODS=0 -> 05 FF, then close",
            got == b"\x05\xff" and closed and not extra,
            f"{got.hex()} closed={closed} extra={extra!r}",
        )
    with Client(proxy) as c:
        got = c.hello(b"\x01")
        closed, extra = closed_within(c.sock)
        check(
            "only GSSAPI offered -> 05 FF, then close",
            got == b"\x05\xff" and closed,
            f"{got.hex()} closed={closed}",
        )
    for name, data in [
        ("VER 4 greeting", b"\x04\x01\x00"),
        ("VER 0 greeting", b"\x00\x01\x00"),
        ("SOCKS4 request", b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"),
    ]:
        with Client(proxy) as c:
            c.send(data)
            closed, extra = closed_within(c.sock)
            check(
                f"{name} -> close (no method selection)",
                closed and (extra in (b"", b"\x05\xff")),
                f"closed={closed} got={extra!r}",
            )
    for name, data in [
        ("truncated greeting 05", b"\x05"),
        ("truncated greeting 05 02 00", b"\x05\x02\x00"),
    ]:
        with Client(proxy) as c:
            c.send(data)
            c.sock.shutdown(socket.SHUT_WR)
            closed, extra = closed_within(c.sock)
            check(
                f"{name} + EOF -> close, nothing sent",
                closed and extra == b"",
                f"closed={closed} got={extra!r}",
            )


def probe_connect(proxy: tuple[str, int], echo: Echo, echo6: Echo | None) -> None:
    # IPv4
    with Client(proxy) as c:
        c.hello()
        raw, rep, atyp, host, port = c.request(1, "127.0.0.1", echo.port)
        header_ok("CONNECT 127.0.0.1: REP 0, ATYP 1", raw, 0, 1)
        check("CONNECT reply is 10 bytes", len(raw) == 10, raw.hex())
        c.sock.sendall(b"ping")
        check("CONNECT relays", recv_exact(c.sock, 4) == b"ping")
        check(
            "CONNECT BND = proxy's end of the upstream connection",
            (host, port) in echo.peers,
            f"BND {host}:{port}, peers {echo.peers[-3:]}",
        )
    # IPv6
    if echo6 is not None:
        with Client(proxy) as c:
            c.hello()
            raw, rep, atyp, host, port = c.request(1, "::1", echo6.port)
            header_ok("CONNECT ::1: REP 0, ATYP 4", raw, 0, 4)
            check("CONNECT ::1 reply is 22 bytes", len(raw) == 22, raw.hex())
            c.sock.sendall(b"six")
            check("CONNECT ::1 relays", recv_exact(c.sock, 3) == b"six")
            check(
                "CONNECT ::1 BND = upstream's local address",
                (host, port) in [(p[0], p[1]) for p in echo6.peers],
                f"{host}:{port}",
            )
    # domain
    for name in ("localhost", "LOCALHOST", "localhost."):
        with Client(proxy) as c:
            c.hello()
            raw, rep, atyp, host, port = c.request(1, name, echo.port)
            header_ok(f"CONNECT domain {name!r}: REP 0", raw, 0)
            check(f"CONNECT {name!r}: BND ATYP is an IP family", atyp in (1, 4), raw.hex())
            c.sock.sendall(b"dom")
            check(f"CONNECT {name!r} relays", recv_exact(c.sock, 3) == b"dom")
    # pipelined: greeting + request + data in one segment
    with Client(proxy) as c:
        c.sock.sendall(
            b"\x05\x01\x00" + b"\x05\x01\x00" + addr_bytes("127.0.0.1", echo.port) + b"early data"
        )
        sel = recv_exact(c.sock, 2)
        raw, *_ = read_reply(c.sock)
        check(
            "pipelined greeting+request+data",
            sel == b"\x05\x00" and raw[1] == 0 and recv_exact(c.sock, 10) == b"early data",
        )
    # bytewise greeting + request
    with Client(proxy) as c:
        c.send(
            b"\x05\x01\x00" + b"\x05\x01\x00" + addr_bytes("localhost", echo.port), bytewise=True
        )
        sel = recv_exact(c.sock, 2)
        raw, *_ = read_reply(c.sock)
        c.sock.sendall(b"x")
        check(
            "byte-at-a-time greeting+request (domain)",
            sel == b"\x05\x00" and raw[1] == 0 and recv_exact(c.sock, 1) == b"x",
        )
    # RSV != 0
    with Client(proxy) as c:
        c.hello()
        raw, rep, *_ = c.request(1, "127.0.0.1", echo.port, rsv=0x55)
        closed = False
        if rep != 0:
            closed, _ = closed_within(c.sock)
        check("RSV != 0 in a request: observed", True, f"REP {rep:#x} closed={closed}")


def failure(
    proxy: tuple[str, int],
    name: str,
    request: bytes,
    expected_rep: int,
    methods: bytes = b"\x00",
    auth: tuple[str, str] | None = None,
) -> None:
    with Client(proxy) as c:
        c.hello(methods)
        if auth:
            c.auth(*auth)
        c.sock.sendall(request)
        started = time.monotonic()
        try:
            raw, rep, _atyp, _host, _port = read_reply(c.sock)
        except (EOFError, ConnectionResetError, AssertionError) as exc:
            check(name, False, f"no reply: {exc}")
            return
        closed, extra = closed_within(c.sock)
        ok = raw[0] == 5 and raw[2] == 0 and rep == expected_rep and closed and not extra
        check(
            name,
            ok,
            f"reply {raw.hex(' ')} closed={closed} after "
            f"{time.monotonic() - started:.2f}s extra={extra!r}",
        )


def probe_failures(proxy: tuple[str, int]) -> None:
    port = closed_port()
    failure(
        proxy, "refused 127.0.0.1 -> 05, close", b"\x05\x01\x00" + addr_bytes("127.0.0.1", port), 5
    )
    if HAS_IPV6:
        failure(
            proxy,
            "refused ::1 -> 05, close",
            b"\x05\x01\x00" + addr_bytes("::1", closed_port("::1")),
            5,
        )
    failure(
        proxy, "refused by name -> 05, close", b"\x05\x01\x00" + addr_bytes("localhost", port), 5
    )
    failure(
        proxy, "unresolvable .invalid -> 04", b"\x05\x01\x00" + addr_bytes("nothing.invalid", 80), 4
    )
    for cmd in (0x00, 0x04, 0x7F, 0xFF):
        failure(
            proxy,
            f"CMD {cmd:#04x} -> 07, close",
            bytes((5, cmd, 0)) + addr_bytes("127.0.0.1", port),
            7,
        )
    failure(
        proxy, "CMD 0x04 with a domain -> 07", bytes((5, 4, 0)) + addr_bytes("localhost", port), 7
    )
    for atyp in (0x00, 0x02, 0x05, 0xFF):
        failure(
            proxy,
            f"ATYP {atyp:#04x} -> 08, close",
            bytes((5, 1, 0, atyp)) + b"\x7f\x00\x00\x01\x00\x50",
            8,
        )
    failure(proxy, "zero-length domain -> failure reply, close", b"\x05\x01\x00\x03\x00\x00\x50", 1)
    failure(
        proxy,
        "bad VER in request -> failure reply, close",
        b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        1,
    )
    # a failure reply must reach a client that pipelined data after its request
    for size in (10, 100_000):
        with Client(proxy) as c:
            c.sock.sendall(
                b"\x05\x01\x00\x05\x01\x00" + addr_bytes("127.0.0.1", port) + b"x" * size
            )
            try:
                sel = recv_exact(c.sock, 2)
                raw, rep, *_ = read_reply(c.sock)
                ok = sel == b"\x05\x00" and rep == 5
                detail = raw.hex(" ")
            except (OSError, EOFError) as exc:
                ok, detail = False, repr(exc)
            check(f"failure reply after a request pipelined with {size} bytes", ok, detail)
    # truncated request then EOF
    with Client(proxy) as c:
        c.hello()
        c.sock.sendall(b"\x05\x01\x00\x01\x7f\x00")
        c.sock.shutdown(socket.SHUT_WR)
        closed, extra = closed_within(c.sock)
        check(
            "truncated request + EOF -> close, no success reply",
            closed and (extra == b"" or extra[1] != 0),
            f"closed={closed} got={extra!r}",
        )


def probe_auth(proxy: tuple[str, int], echo: Echo) -> None:
    with Client(proxy) as c:
        check("users: 05 01 02 -> 05 02", c.hello(b"\x02") == b"\x05\x02")
        check("good credentials -> 01 00", c.auth(USER, PASSWORD) == b"\x01\x00")
        _raw, rep, *_ = c.request(1, "127.0.0.1", echo.port)
        c.sock.sendall(b"auth")
        check("authenticated CONNECT relays", rep == 0 and recv_exact(c.sock, 4) == b"auth")
    with Client(proxy) as c:
        check("users: offering 00 02 -> 05 02", c.hello(b"\x00\x02") == b"\x05\x02")
        c.auth(USER, PASSWORD)
    with Client(proxy) as c:
        got = c.hello(b"\x00")
        closed, _ = closed_within(c.sock)
        check("users: offering only 00 -> 05 FF, close", got == b"\x05\xff" and closed)
    with Client(proxy) as c:
        c.hello(b"\x02")
        got = c.auth(USER, "wrong")
        closed, extra = closed_within(c.sock)
        check(
            "wrong password -> 01 xx (xx != 0), then MUST close",
            got[0] == 1 and got[1] != 0 and closed and not extra,
            f"{got.hex()} {closed}",
        )
    with Client(proxy) as c:
        c.hello(b"\x02")
        got = c.auth("nobody", "x")
        closed, _ = closed_within(c.sock)
        check("unknown user -> failure status, close", got[0] == 1 and got[1] != 0 and closed)
    with Client(proxy) as c:
        c.hello(b"\x02")
        c.sock.sendall(b"\x05\x05probe\x0apr0be-pass")
        c.sock.settimeout(TIMEOUT)
        try:
            got = c.sock.recv(2)
        except ConnectionResetError:
            got = b""
        closed, _ = closed_within(c.sock)
        check(
            "auth VER 5 -> no success, close",
            (got == b"" or (got[0] == 1 and got[1:] != b"\x00")) and closed,
            f"got={got!r}",
        )
    with Client(proxy) as c:
        c.hello(b"\x02")
        got = c.auth(USER, PASSWORD, bytewise=True)
        check("auth byte-at-a-time -> 01 00", got == b"\x01\x00")
    with Client(proxy) as c:
        c.hello(b"\x02")
        c.sock.sendall(b"\x01\x05pro")
        c.sock.shutdown(socket.SHUT_WR)
        closed, extra = closed_within(c.sock)
        check(
            "truncated auth + EOF -> close, no success",
            closed and extra[:2] != b"\x01\x00",
            f"got={extra!r}",
        )
    with Client(proxy) as c:  # all pipelined
        u, p = USER.encode(), PASSWORD.encode()
        c.sock.sendall(
            b"\x05\x01\x02"
            + bytes((1, len(u)))
            + u
            + bytes((len(p),))
            + p
            + b"\x05\x01\x00"
            + addr_bytes("127.0.0.1", echo.port)
            + b"pipe"
        )
        answers = recv_exact(c.sock, 4)
        _raw, rep, *_ = read_reply(c.sock)
        check(
            "pipelined greeting+auth+request+data",
            answers == b"\x05\x02\x01\x00" and rep == 0 and recv_exact(c.sock, 4) == b"pipe",
        )


def probe_bind(proxy: tuple[str, int]) -> None:
    with Client(proxy) as c:
        c.hello()
        raw, rep, atyp, host, port = c.request(2, "127.0.0.1", 0)
        header_ok("BIND first reply REP 0 ATYP 1", raw, 0, 1)
        peer = socket.create_connection((host, port), timeout=TIMEOUT)
        raw2, _rep2, _atyp2, host2, port2 = read_reply(c.sock)
        header_ok("BIND second reply REP 0", raw2, 0, 1)
        check(
            "BIND second reply carries the connecting host",
            (host2, port2) == peer.getsockname(),
            f"{host2}:{port2} vs {peer.getsockname()}",
        )
        peer.sendall(b"in")
        c.sock.sendall(b"out")
        check(
            "BIND relays both ways",
            recv_exact(c.sock, 2) == b"in" and recv_exact(peer, 3) == b"out",
        )
        peer.close()
    # only the expected host may connect
    with Client(proxy) as c:
        c.hello()
        raw, rep, atyp, host, port = c.request(2, "127.0.0.2", 0)
        check("BIND 127.0.0.2 first reply", rep == 0, raw.hex(" "))
        if rep == 0:
            stranger = socket.create_connection(
                (host, port), timeout=TIMEOUT, source_address=("127.0.0.1", 0)
            )
            closed, _ = closed_within(stranger, 5)
            check("BIND DST 127.0.0.2: a connection from 127.0.0.1 is refused", closed)
            stranger.close()
            good = socket.create_connection(
                (host, port), timeout=TIMEOUT, source_address=("127.0.0.2", 0)
            )
            raw2, rep2, _atyp2, host2, port2 = read_reply(c.sock)
            check(
                "BIND DST 127.0.0.2: the expected host is taken",
                rep2 == 0 and (host2, port2) == good.getsockname(),
                raw2.hex(" "),
            )
            good.close()
    with Client(proxy) as c:
        c.hello()
        raw, rep, atyp, host, port = c.request(2, "localhost", 0)
        check("BIND DST localhost first reply", rep == 0, raw.hex(" "))
        if rep == 0:
            fam = socket.AF_INET6 if atyp == 4 else socket.AF_INET
            stranger = socket.socket(fam)
            stranger.settimeout(TIMEOUT)
            if fam == socket.AF_INET:
                stranger.bind(("127.0.0.3", 0))
                stranger.connect((host, port))
                closed, _ = closed_within(stranger, 5)
                check("BIND DST localhost: a connection from 127.0.0.3 is refused", closed)
            stranger.close()
            good = socket.create_connection((host, port), timeout=TIMEOUT)
            raw2, rep2, *_ = read_reply(c.sock)
            check("BIND DST localhost: localhost is taken", rep2 == 0, raw2.hex(" "))
            good.close()


def udp_datagram(host: str, port: int, payload: bytes, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes((frag,)) + addr_bytes(host, port) + payload


def parse_udp(data: bytes) -> tuple[int, str, int, bytes]:
    assert data[:3] == b"\x00\x00\x00", data[:8]
    atyp = data[3]
    if atyp == 1:
        host, end = str(ipaddress.IPv4Address(data[4:8])), 8
    elif atyp == 4:
        host, end = str(ipaddress.IPv6Address(data[4:20])), 20
    else:
        raise AssertionError(f"ATYP {atyp}")
    return atyp, host, struct.unpack("!H", data[end : end + 2])[0], data[end + 2 :]


def probe_udp(
    proxy: tuple[str, int], client_host: str, echo: UdpEcho, echo6: UdpEcho | None, label: str
) -> None:
    family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    for req_host in ("0.0.0.0", client_host, "localhost"):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((client_host, 0))
        udp.settimeout(3)
        with Client(proxy) as c, udp:
            c.hello()
            req_port = 0 if req_host == "0.0.0.0" else udp.getsockname()[1]
            raw, rep, _atyp, host, port = c.request(3, req_host, req_port)
            expect_atyp = 4 if family == socket.AF_INET6 else 1
            header_ok(
                f"UDP[{label}] ASSOCIATE DST {req_host}:{req_port} REP 0 ATYP", raw, 0, expect_atyp
            )
            if rep != 0:
                continue
            check(
                f"UDP[{label}] BND.ADDR = control connection's local address",
                host == c.sock.getpeername()[0],
                f"{host} vs {c.sock.getpeername()[0]}",
            )
            relay = (host, port)
            targets = [
                ("127.0.0.1", echo.port, "127.0.0.1", 1),
                ("localhost", echo.port, None, None),
            ]
            if echo6 is not None:
                targets.append(("::1", echo6.port, "::1", 4))
            for dst, dport, src, satyp in targets:
                payload = os.urandom(64)
                udp.sendto(udp_datagram(dst, dport, payload), relay)
                try:
                    data, _frm = udp.recvfrom(65535)
                    a, h, p, body = parse_udp(data)
                    ok = (
                        body == payload
                        and p == dport
                        and (src is None or h == src)
                        and (satyp is None or a == satyp)
                    )
                    check(
                        f"UDP[{label}] via {req_host}: to {dst} and back with source header",
                        ok,
                        f"{a} {h}:{p}",
                    )
                except TimeoutError:
                    check(f"UDP[{label}] via {req_host}: to {dst} and back", False, "timeout")
            # FRAG != 0 dropped, RSV != 0 dropped
            n = len(echo.received)
            udp.sendto(udp_datagram("127.0.0.1", echo.port, b"frag", frag=1), relay)
            udp.sendto(b"\x00\x01\x00" + addr_bytes("127.0.0.1", echo.port) + b"rsv", relay)
            udp.sendto(b"\x00\x00\x00\x02" + b"\x7f\x00\x00\x01\x00\x50" + b"atyp", relay)
            udp.sendto(udp_datagram("127.0.0.1", echo.port, b"whole"), relay)
            data, _ = udp.recvfrom(65535)
            check(
                f"UDP[{label}] FRAG!=0 / RSV!=0 / bad ATYP dropped",
                parse_udp(data)[3] == b"whole" and [d for d, _ in echo.received[n:]] == [b"whole"],
                repr(echo.received[n:]),
            )
            # another port of the client's IP
            other = socket.socket(family, socket.SOCK_DGRAM)
            other.bind((client_host, 0))
            other.settimeout(1)
            n = len(echo.received)
            other.sendto(udp_datagram("127.0.0.1", echo.port, b"stranger"), relay)
            udp.sendto(udp_datagram("127.0.0.1", echo.port, b"mine"), relay)
            udp.recvfrom(65535)
            check(
                f"UDP[{label}] via {req_host}: datagram from another port dropped",
                [d for d, _ in echo.received[n:]] == [b"mine"],
            )
            other.close()
            if family == socket.AF_INET:
                other = socket.socket(family, socket.SOCK_DGRAM)
                other.bind(("127.0.0.9", udp.getsockname()[1] if req_port == 0 else 0))
                n = len(echo.received)
                other.sendto(udp_datagram("127.0.0.1", echo.port, b"other ip"), relay)
                udp.sendto(udp_datagram("127.0.0.1", echo.port, b"mine2"), relay)
                udp.recvfrom(65535)
                check(
                    f"UDP[{label}] via {req_host}: datagram from another IP dropped",
                    [d for d, _ in echo.received[n:]] == [b"mine2"],
                )
                other.close()
        # after the control connection closes, the relay is gone
        with socket.socket(family, socket.SOCK_DGRAM) as late:
            late.settimeout(2)
            late.connect(relay)
            deadline = time.monotonic() + TIMEOUT
            gone = False
            while time.monotonic() < deadline and not gone:
                late.send(udp_datagram("127.0.0.1", echo.port, b"late"))
                try:
                    late.recv(65535)
                except ConnectionRefusedError:
                    gone = True
                except TimeoutError:
                    pass
            check(f"UDP[{label}] via {req_host}: relay ends with the control connection", gone)


def probe_clients(proxy: tuple[str, int], auth_proxy: tuple[str, int], http_port: int) -> None:
    curl = shutil.which("curl")
    url = f"http://localhost:{http_port}/"
    if curl is None:
        check("curl installed", False)
        return
    for args in (
        ["--socks5", f"127.0.0.1:{proxy[1]}"],
        ["--socks5-hostname", f"127.0.0.1:{proxy[1]}"],
        ["-x", f"socks5h://127.0.0.1:{proxy[1]}"],
        ["--socks5", f"127.0.0.1:{auth_proxy[1]}", "-U", f"{USER}:{PASSWORD}"],
        ["--socks5-hostname", f"127.0.0.1:{auth_proxy[1]}", "-U", f"{USER}:{PASSWORD}"],
        ["-x", f"socks5h://{USER}:{PASSWORD}@127.0.0.1:{auth_proxy[1]}"],
        ["-x", f"socks5://{USER}:{PASSWORD}@127.0.0.1:{auth_proxy[1]}"],
    ):
        done = subprocess.run(
            [curl, "-sS", "--fail", "--max-time", "10", "--noproxy", "", *args, url],
            capture_output=True,
            timeout=20,
            check=False,
        )
        check(
            f"curl {' '.join(args)}",
            done.returncode == 0 and done.stdout == b"hello\n",
            done.stderr.decode()[-200:],
        )
    done = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "-x",
            f"socks5h://{USER}:bad@127.0.0.1:{auth_proxy[1]}",
            url,
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    check("curl with a bad password fails", done.returncode != 0)
    try:
        from python_socks.sync import Proxy
    except ImportError:
        check("python-socks importable", False)
        return
    for url_host, creds, target in (
        ("no-auth", "", proxy),
        ("auth", f"{USER}:{PASSWORD}@", auth_proxy),
    ):
        for rdns, dest in ((True, "localhost"), (False, "127.0.0.1"), (True, "::1")):
            if dest == "::1" and not HAS_IPV6:
                continue
            p = Proxy.from_url(f"socks5://{creds}127.0.0.1:{target[1]}", rdns=rdns)
            try:
                sock = p.connect(
                    dest_host=dest, dest_port=http_port if dest != "::1" else http6_port, timeout=10
                )
            except Exception as exc:
                check(f"python-socks {url_host} rdns={rdns} {dest}", False, repr(exc))
                continue
            with sock:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            check(
                f"python-socks {url_host} rdns={rdns} {dest}",
                data.endswith(b"hello\n"),
                data[:40].decode(errors="replace"),
            )


http6_port = 0


@contextlib.contextmanager
def http_servers() -> Iterator[tuple[int, int]]:
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"hello\n")

        def log_message(self, *a: Any) -> None:
            pass

    class H6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    servers: list[http.server.ThreadingHTTPServer] = [
        http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    ]
    if HAS_IPV6:
        servers.append(H6(("::1", 0), H))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield servers[0].server_address[1], (servers[1].server_address[1] if HAS_IPV6 else 0)
    finally:
        for s in servers:
            s.shutdown()


def guarded(name: str, fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        check(f"{name} completed", False, repr(exc))


def probe_dual_stack(
    proxy: tuple[str, int], echo: Echo, uecho: UdpEcho, uecho6: UdpEcho | None
) -> None:
    """A proxy on [::]: an IPv4 client sees IPv4 (ATYP 1) in every BND.ADDR, not ::ffff:."""
    for client_ip, atyp in (("127.0.0.1", 1), ("::1", 4)):
        with Client((client_ip, proxy[1])) as c:
            c.hello()
            raw, *_ = c.request(1, "127.0.0.1", echo.port)
            header_ok(f"dual-stack, client {client_ip}: CONNECT to 127.0.0.1 ATYP 1", raw, 0, 1)
        with Client((client_ip, proxy[1])) as c:
            c.hello()
            raw, _rep, _atyp, host, _port = c.request(2, "0.0.0.0", 0)
            header_ok(f"dual-stack, client {client_ip}: BIND ATYP {atyp}", raw, 0, atyp)
            check(f"dual-stack, client {client_ip}: BIND BND.ADDR", host == client_ip, host)
        probe_udp((client_ip, proxy[1]), client_ip, uecho, uecho6, f"dual {client_ip}")


def run(
    plain: tuple[str, int],
    authed: tuple[str, int],
    plain6: tuple[str, int] | None,
    dual: tuple[str, int] | None,
) -> None:
    global http6_port
    echo = Echo()
    echo6 = Echo("::1") if HAS_IPV6 else None
    uecho = UdpEcho()
    uecho6 = UdpEcho("::1") if HAS_IPV6 else None
    guarded("greeting", probe_greeting, plain)
    guarded("connect", probe_connect, plain, echo, echo6)
    guarded("failures", probe_failures, plain)
    guarded("auth", probe_auth, authed, echo)
    guarded("bind", probe_bind, plain)
    guarded("udp v4", probe_udp, plain, "127.0.0.1", uecho, uecho6, "v4")
    if plain6 is not None:
        guarded("udp v6", probe_udp, plain6, "::1", uecho, uecho6, "v6")
        with Client(plain6) as c:
            c.hello()
            raw, _rep, _atyp, _host, _port = c.request(1, "127.0.0.1", echo.port)
            header_ok("CONNECT over an IPv6 control connection to 127.0.0.1: ATYP 1", raw, 0, 1)
    if dual is not None:
        guarded("dual stack", probe_dual_stack, dual, echo, uecho, uecho6)
    with http_servers() as (port4, port6):
        http6_port = port6
        guarded("clients", probe_clients, plain, authed, port4)


def main() -> int:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    VERBOSE = args.verbose
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ProxyProcess(Path(tmp) / "plain", {}),
            ProxyProcess(Path(tmp) / "auth", {}, users={USER: PASSWORD}),
        ]
        if HAS_IPV6:
            procs.append(ProxyProcess(Path(tmp) / "plain6", {}, listen="[::1]:0"))
            procs.append(ProxyProcess(Path(tmp) / "dual", {}, listen="[::]:0"))
        try:
            for p in procs:
                p.start()
            run(
                (procs[0].host, procs[0].port),
                (procs[1].host, procs[1].port),
                (procs[2].host, procs[2].port) if HAS_IPV6 else None,
                (procs[3].host, procs[3].port) if HAS_IPV6 else None,
            )
        finally:
            for p in procs:
                p.stop()
                for line in p.problems():
                    check("proxy logged no errors", False, line[:300])
    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
