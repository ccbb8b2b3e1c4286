"""A throwaway PostgreSQL for the storage tests, and fresh databases on it.

One embedded server per test session (non-durable: no fsync), started with the same code
that `socks5-analytics up` uses, in a temporary folder removed afterwards. The schema is
migrated once into a template database; each test that wants a clean, migrated database
gets a copy of it (CREATE DATABASE ... TEMPLATE), dropped when the test ends.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from socks5_analytics.storage import Repository
from socks5_analytics.storage.embedded import EmbeddedPostgres
from socks5_analytics.storage.migrate import run_migration

T = TypeVar("T")
TEMPLATE = "s5a_template"
_names = itertools.count()


def run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a loop of its own (for sync, wide-scoped fixtures)."""

    async def runner() -> T:
        return await make()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """The session's PostgreSQL server."""
    folder = Path(tempfile.mkdtemp(prefix="s5a-pg-"))
    folder.chmod(0o755)  # under root the server runs as another user, who must get in
    server = EmbeddedPostgres(folder / "server", durable=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _admin(server: EmbeddedPostgres, sql: str) -> None:
    connection = await asyncpg.connect(server.dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def template_url(pg_server: EmbeddedPostgres) -> str:
    """A database migrated to head, copied by every `database_url`."""
    run_in_thread(lambda: _admin(pg_server, f"CREATE DATABASE {TEMPLATE}"))
    url = pg_server.url_for(TEMPLATE)
    run_in_thread(lambda: asyncio.to_thread(run_migration, url))
    return url


@pytest.fixture
async def empty_database_url(pg_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """A fresh database without any schema."""
    name = f"t_empty_{os.getpid()}_{next(_names)}"
    await _admin(pg_server, f"CREATE DATABASE {name}")
    yield pg_server.url_for(name)
    await _admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
async def database_url(pg_server: EmbeddedPostgres, template_url: str) -> AsyncIterator[str]:
    """A fresh database with the current schema."""
    name = f"t_{os.getpid()}_{next(_names)}"
    await _admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield pg_server.url_for(name)
    await _admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[Repository]:
    """A repository over a fresh migrated database (30 days kept, 3 ahead)."""
    repository = await Repository.open(url=database_url, min_size=1, max_size=4)
    try:
        yield repository
    finally:
        await repository.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the same database as `repo`, for checking what was written."""
    connection = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    try:
        yield connection
    finally:
        await connection.close()
