"""The proxy's /metrics, scraped over HTTP and parsed by prometheus_client's own parser,
moves exactly as known traffic flows."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_harness import ProxyProcess, TcpServer, poll


def _scrape(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    address = proxy.has_log("proxy listening")["metrics"]  # type: ignore[index]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
def metered_proxy(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    proxy = proxy_factory({}, users={"alice": "right"})
    proxy.allow_errors = False
    return proxy


async def test_counters_follow_known_traffic(metered_proxy: ProxyProcess,
                                             tcp_server: Any) -> None:
    proxy = metered_proxy
    server: TcpServer = await tcp_server(_echo)
    before = _scrape(proxy)
    assert _value(before, "s5a_proxy_policy_info", version=proxy.has_log(
        "proxy listening")["policy_version"]) == 1.0  # type: ignore[index]

    sizes = [1000, 20_000, 300_000]
    for size in sizes:
        tunnel = await proxy.open(server.host, server.port, auth=("alice", "right"))
        tunnel.writer.write(b"x" * size)
        await tunnel.writer.drain()
        echoed = await asyncio.wait_for(tunnel.reader.readexactly(size), 10)
        assert len(echoed) == size
        await tunnel.close()
    refused = await proxy.request(1, "127.0.0.1", 1, auth=("alice", "right"))
    assert refused.reply.rep == 5
    await refused.close()
    with pytest.raises(AssertionError):  # a wrong password: a failed handshake
        await proxy.open(server.host, server.port, auth=("alice", "wrong"))

    def moved() -> dict[Any, float] | None:
        after = _scrape(proxy)
        done = _value(after, "s5a_proxy_connections_total", status="ok", command="connect")
        failed = _value(after, "s5a_proxy_connections_total", status="auth_failed",
                        command="connect")
        return after if done >= 3 and failed >= 1 else None

    after = await poll(moved, what="the counters to move")
    total = sum(sizes)
    assert _value(after, "s5a_proxy_connections_total", status="ok", command="connect") == 3
    assert _value(after, "s5a_proxy_connections_total", status="refused",
                  command="connect") == 1
    assert _value(after, "s5a_proxy_bytes_total", direction="out") == total
    assert _value(after, "s5a_proxy_bytes_total", direction="in") == total
    assert _value(after, "s5a_proxy_handshake_failures_total", reason="auth_failed") == 1
    assert _value(after, "s5a_proxy_connect_duration_seconds_count") == 3
    assert _value(after, "s5a_proxy_connection_duration_seconds_count") == 5
    # Nothing labelled by client, user or destination: bounded labels only.
    labels = {name for (_, pairs) in after for name, _ in pairs}
    assert labels <= {"status", "command", "direction", "reason", "version", "result", "le"}


async def test_active_connections_gauge(metered_proxy: ProxyProcess, tcp_server: Any) -> None:
    proxy = metered_proxy
    server: TcpServer = await tcp_server(_echo)
    tunnels = [await proxy.open(server.host, server.port, auth=("alice", "right"))
               for _ in range(4)]
    await poll(lambda: _value(_scrape(proxy), "s5a_proxy_active_connections") == 4,
               what="4 active connections")
    for tunnel in tunnels:
        await tunnel.close()
    await poll(lambda: _value(_scrape(proxy), "s5a_proxy_active_connections") == 0,
               what="no active connection")


async def test_one_scrape_sees_every_worker(proxy_factory: Callable[..., ProxyProcess],
                                            tcp_server: Any) -> None:
    """With SO_REUSEPORT workers, the node's /metrics adds all of them up."""
    proxy = proxy_factory({"proxy": {"workers": 2}})
    server: TcpServer = await tcp_server(_echo)
    count = 24  # the kernel spreads these over both workers
    for _ in range(count):
        tunnel = await proxy.open(server.host, server.port)
        tunnel.writer.write(b"abc")
        assert await asyncio.wait_for(tunnel.reader.readexactly(3), 10) == b"abc"
        await tunnel.close()

    def total() -> float:
        return _value(_scrape(proxy), "s5a_proxy_connections_total", status="ok",
                      command="connect")

    await poll(lambda: total() == count, what=f"{count} connections over both workers")
    after = _scrape(proxy)
    assert _value(after, "s5a_proxy_bytes_total", direction="out") == 3 * count
