"""PostgreSQL goes away while a real proxy carries traffic: every connection is still relayed,
nothing new is stored during the outage, and everything arrives once the database is back.

The database outage is a TCP forwarder in front of the session's server that the test cuts
(connections reset, new ones refused), as the collector sees a dead database.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml
from ingest_client import StartCollector
from loopback import Component, echo_server, socks_echo
from tcp_cutter import TcpCutter

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
BEFORE, DURING = 20, 150


@pytest.fixture
async def cutter(database_url: str) -> AsyncIterator[TcpCutter]:
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    forwarder = TcpCutter(parts.hostname, parts.port)
    await forwarder.start()
    yield forwarder
    await forwarder.close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


async def _stored(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM traffic_logs WHERE node_id = 'outage'")
    return count


async def _until(db: asyncpg.Connection, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (stored := await _stored(db)) < count:
        assert time.monotonic() < deadline, f"{stored} of {count} events stored"
        await asyncio.sleep(0.05)


async def test_relaying_goes_on_and_nothing_is_lost(
    start_collector: StartCollector, cutter: TcpCutter, database_url: str,
    db: asyncpg.Connection, tmp_path: Path, echo_port: int,
) -> None:
    parts = urlsplit(database_url)
    through = parts._replace(netloc=f"{parts.username}@127.0.0.1:{cutter.port}").geturl()
    collector = await start_collector(url=through)
    config = {
        "node_id": "outage", "log": {"format": "json"},
        "proxy": {"metrics_listen": None,
                  "events": {"collectors": [f"127.0.0.1:{collector.address[1]}"],
                             "flush_interval": 0.05, "spool_dir": str(tmp_path / "spool")}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "policy.yaml").write_text("destinations: {block_private: false}\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("S5A_")},
           "PYTHONPATH": str(ROOT)}
    proxy = Component(["proxy", "--config", str(tmp_path / "config.yaml"), "--listen",
                       "127.0.0.1:0", "--policy", str(tmp_path / "policy.yaml")], env, tmp_path)
    try:
        address = await asyncio.to_thread(proxy.address, "proxy listening")
        for index in range(BEFORE):
            await asyncio.to_thread(socks_echo, address, echo_port, b"a" * (index + 1))
        await _until(db, BEFORE, 20)

        cutter.cut()  # the database is gone
        for index in range(DURING):
            payload = b"b" * (index + 1)
            assert await asyncio.to_thread(socks_echo, address, echo_port, payload) == payload
        assert await _stored(db) == BEFORE  # nothing can be committed meanwhile

        cutter.restore()
        await _until(db, BEFORE + DURING, 60)
    finally:
        proxy.stop()
    assert await _stored(db) == BEFORE + DURING
    distinct = await db.fetchval(
        "SELECT count(DISTINCT event_id) FROM traffic_logs WHERE node_id = 'outage'")
    assert distinct == BEFORE + DURING
    assert not [line for line in proxy.lines if line.get("message") == "events dropped"]
