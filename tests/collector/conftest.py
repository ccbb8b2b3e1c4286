"""Fixtures for the collector tests: a real PostgreSQL, a real gRPC server on port 0.

The PostgreSQL fixtures are shared by every suite (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from ingest_client import StartCollector

from collector.main import build_server
from collector.server import CollectorServer
from socks5_analytics.config import Settings, load_settings
from socks5_analytics.storage import Repository

# pg_server, database_url and db: tests/conftest.py


def collector_settings(**collector: Any) -> Settings:
    """Settings with test-friendly collector values (and any overrides)."""
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "batch_max_delay": 0.01,
                              "hello_timeout": 5.0, "retry_initial_backoff": 0.02,
                              "retry_max_backoff": 0.2, "nodes_flush_interval": 0.1,
                              "shutdown_grace": 2.0}
    values.update(collector)
    return load_settings(None, collector=values)




@pytest.fixture
async def start_collector(database_url: str) -> AsyncIterator[StartCollector]:
    """Start in-process collectors on `database_url` (or another URL); stopped at the end."""
    started: list[tuple[CollectorServer, Repository]] = []

    async def start(*, url: str | None = None, **collector: Any) -> CollectorServer:
        settings = collector_settings(**collector)
        repository = await Repository.open(url=url or database_url, min_size=0, max_size=4,
                                           connect_timeout=2.0)
        server = build_server(settings, repository)
        await server.start("127.0.0.1", 0)
        started.append((server, repository))
        return server

    yield start
    for server, repository in reversed(started):
        await server.stop(0.5)
        await repository.close()


@pytest.fixture
async def collector(start_collector: StartCollector) -> CollectorServer:
    """One collector with the test settings."""
    server: CollectorServer = await start_collector()
    return server


@pytest.fixture
async def channel(collector: CollectorServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `collector`."""
    assert collector.address is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.address[1]}") as chan:
        yield chan

