"""Fixtures of the API tests: one throwaway PostgreSQL per session, a database per module.

The server is the embedded one `socks5-analytics up` uses (non-durable), in a temporary
folder; the schema is migrated once into a template that each module's database copies.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest
from api_harness import run
from dbtools import admin_sql

from socks5_analytics.storage.embedded import EmbeddedPostgres
from socks5_analytics.storage.migrate import run_migration

TEMPLATE = "s5a_api_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def new_database(pg_server: EmbeddedPostgres) -> Iterator[Callable[[], str]]:
    """Make fresh migrated databases (copies of a template); all dropped at the end."""
    run(lambda: admin_sql(pg_server, f"CREATE DATABASE {TEMPLATE}"))
    run_migration(pg_server.url_for(TEMPLATE))
    made: list[str] = []

    def make() -> str:
        name = f"api_{os.getpid()}_{next(_names)}"
        run(lambda: admin_sql(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
        made.append(name)
        return pg_server.url_for(name)

    yield make
    for name in made:
        run(lambda name=name: admin_sql(pg_server, f"DROP DATABASE {name} WITH (FORCE)"))
    run(lambda: admin_sql(pg_server, f"DROP DATABASE {TEMPLATE}"))


@pytest.fixture(scope="module")
def database_url(new_database: Callable[[], str]) -> str:
    """A migrated database for the module."""
    return new_database()

