"""Fixtures every test folder may use: one throwaway PostgreSQL for the whole session, and
fresh migrated databases on it.

The server is the embedded one `socks5-analytics up` uses (non-durable: no fsync), in a
temporary folder removed afterwards, on a free port. The schema is migrated once into a
template database; each test that wants a clean, migrated database gets a copy of it
(CREATE DATABASE ... TEMPLATE), dropped when the test ends. A folder may override
`database_url` (the API tests keep one database per module).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from dbtools import admin_sql, run_in_thread

from socks5_analytics.storage.embedded import EmbeddedPostgres
from socks5_analytics.storage.migrate import run_migration

TEMPLATE = "s5a_template"
_names = itertools.count()


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


@pytest.fixture(scope="session")
def template_url(pg_server: EmbeddedPostgres) -> str:
    """A database migrated to head, copied by every `database_url`."""
    run_in_thread(lambda: admin_sql(pg_server, f"CREATE DATABASE {TEMPLATE}"))
    url = pg_server.url_for(TEMPLATE)
    run_in_thread(lambda: asyncio.to_thread(run_migration, url))
    return url


@pytest.fixture
async def empty_database_url(pg_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """A fresh database without any schema."""
    name = f"t_empty_{os.getpid()}_{next(_names)}"
    await admin_sql(pg_server, f"CREATE DATABASE {name}")
    yield pg_server.url_for(name)
    await admin_sql(pg_server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
async def database_url(pg_server: EmbeddedPostgres, template_url: str) -> AsyncIterator[str]:
    """A fresh database with the current schema."""
    name = f"t_{os.getpid()}_{next(_names)}"
    await admin_sql(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield pg_server.url_for(name)
    await admin_sql(pg_server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for checking what was written."""
    connection = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    try:
        yield connection
    finally:
        await connection.close()
