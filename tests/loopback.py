"""Blocking loopback helpers for tests that drive whole processes: an echo server in a
thread, and one SOCKS5 CONNECT echo through a proxy (raw bytes, no client library)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def socks_echo(proxy: str, port: int, payload: bytes) -> bytes:
    """No-auth CONNECT to 127.0.0.1:`port` through `proxy` (H:P), send `payload`, read it back."""
    host, proxy_port = proxy.rsplit(":", 1)
    with socket.create_connection((host, int(proxy_port)), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        assert sock.recv(10)[1] == 0
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed early"
            received += chunk
        return received
