"""Fixtures for the proxy node's integration tests (see proxy_harness.py for the parts)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_harness import (
    HAS_IPV6,
    Handler,
    HttpHandler,
    ProxyProcess,
    TcpServer,
    UdpClient,
    UdpEcho,
    UdpEchoProtocol,
    bulk_handler,
    echo_handler,
)


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[Callable[..., ProxyProcess]]:
    """Start proxies with config overrides: `proxy_factory({"proxy": {...}}, users={...})`."""
    started: list[ProxyProcess] = []

    def make(config: dict[str, Any] | None = None, *, users: dict[str, str] | None = None,
             listen: str = "127.0.0.1:0") -> ProxyProcess:
        proc = ProxyProcess(tmp_path / f"proxy{len(started)}", config or {}, users=users,
                            listen=listen)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.close_clients()
    await asyncio.sleep(0)  # let the aborted transports release their sockets
    problems = []
    for proc in started:
        proc.stop()
        if not proc.allow_errors:
            problems += proc.problems()
    assert not problems, "the proxy logged errors:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def shared_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One default proxy (no auth, relay auto) shared by the tests that need nothing special;
    tests tell their events apart by source port."""
    proc = ProxyProcess(tmp_path_factory.mktemp("shared-proxy"), {}).start()
    yield proc
    proc.stop()
    assert proc.returncode == 0, f"shared proxy exited with {proc.returncode}"
    assert not proc.problems(), "the proxy logged errors:\n" + "\n".join(proc.problems())


@pytest.fixture
async def proxy(shared_proxy: ProxyProcess) -> AsyncIterator[ProxyProcess]:
    """The shared proxy; what the test left open on it is closed after the test."""
    yield shared_proxy
    shared_proxy.close_clients()
    await asyncio.sleep(0)


@pytest.fixture
async def tcp_server() -> AsyncIterator[Callable[..., Awaitable[TcpServer]]]:
    """Start `handler(reader, writer)` servers on port 0: `await tcp_server(handler)`."""
    servers: list[TcpServer] = []

    async def start(handler: Handler, host: str = "127.0.0.1", *,
                    backlog: int = 1024) -> TcpServer:
        holder: list[TcpServer] = []

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            srv = holder[0]
            peer = writer.get_extra_info("peername")
            srv.peers.append((str(peer[0]), int(peer[1])))
            srv.writers.add(writer)
            try:
                await handler(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass  # the test decides what a dropped connection means
            finally:
                srv.writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(on_client, host, 0, backlog=backlog)
        port = server.sockets[0].getsockname()[1]
        srv = TcpServer(host, port, server)
        holder.append(srv)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.server.close()
        for writer in list(srv.writers):
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(srv.server.wait_closed(), 5)


@pytest.fixture
async def echo_server(tcp_server: Callable[..., Awaitable[TcpServer]]) -> TcpServer:
    """A TCP echo server on 127.0.0.1."""
    return await tcp_server(echo_handler)


@pytest.fixture
async def echo_server6(tcp_server: Callable[..., Awaitable[TcpServer]]) -> TcpServer:
    """A TCP echo server on ::1."""
    if not HAS_IPV6:
        pytest.skip("no ::1 on this machine")
    return await tcp_server(echo_handler, "::1")


@pytest.fixture
async def bulk_server(tcp_server: Callable[..., Awaitable[TcpServer]]) -> TcpServer:
    return await tcp_server(bulk_handler)


@pytest.fixture
async def udp_echo() -> AsyncIterator[Callable[..., Awaitable[UdpEcho]]]:
    """Start UDP echo servers: `await udp_echo("127.0.0.1")`."""
    started: list[UdpEcho] = []

    async def start(host: str = "127.0.0.1") -> UdpEcho:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            UdpEchoProtocol, local_addr=(host, 0)
        )
        port = transport.get_extra_info("sockname")[1]
        echo = UdpEcho(host, port, transport, protocol.received)
        started.append(echo)
        return echo

    yield start
    for echo in started:
        echo.transport.close()


@pytest.fixture
def udp_client() -> Iterator[Callable[..., UdpClient]]:
    made: list[UdpClient] = []

    def make(host: str = "127.0.0.1") -> UdpClient:
        client = UdpClient(host)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="session")
def http_server() -> Iterator[tuple[str, int]]:
    """A threaded HTTP server on 127.0.0.1 serving HTTP_BODY at /data."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HttpHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield "127.0.0.1", server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed (`make test` installs it)")
    return path
