"""Fixtures of the API tests: one throwaway PostgreSQL per session, a database per module.

The server is the embedded one `socks5-analytics up` uses (non-durable), in a temporary
folder; the schema is migrated once into a template that each module's database copies.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from api_harness import run

from socks5_analytics.storage.embedded import EmbeddedPostgres
from socks5_analytics.storage.migrate import run_migration

TEMPLATE = "s5a_api_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """The session's PostgreSQL server."""
    folder = Path(tempfile.mkdtemp(prefix="s5a-api-pg-"))
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
def new_database(pg_server: EmbeddedPostgres) -> Iterator[Callable[[], str]]:
    """Make fresh migrated databases (copies of a template); all dropped at the end."""
    run(lambda: _admin(pg_server, f"CREATE DATABASE {TEMPLATE}"))
    run_migration(pg_server.url_for(TEMPLATE))
    made: list[str] = []

    def make() -> str:
        name = f"api_{os.getpid()}_{next(_names)}"
        run(lambda: _admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
        made.append(name)
        return pg_server.url_for(name)

    yield make
    for name in made:
        run(lambda name=name: _admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)"))
    run(lambda: _admin(pg_server, f"DROP DATABASE {TEMPLATE}"))


@pytest.fixture(scope="module")
def database_url(new_database: Callable[[], str]) -> str:
    """A migrated database for the module."""
    return new_database()

