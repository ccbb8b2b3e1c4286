"""A throwaway PostgreSQL for the storage tests, and fresh databases on it.

One embedded server per test session (non-durable: no fsync), started with the same code
that `socks5-analytics up` uses, in a temporary folder removed afterwards. The schema is
migrated once into a template database; each test that wants a clean, migrated database
gets a copy of it (CREATE DATABASE ... TEMPLATE), dropped when the test ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from socks5_analytics.storage import Repository

# pg_server, template_url, database_url, empty_database_url and db: tests/conftest.py


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[Repository]:
    """A repository over a fresh migrated database (30 days kept, 3 ahead)."""
    repository = await Repository.open(url=database_url, min_size=1, max_size=4)
    try:
        yield repository
    finally:
        await repository.close()
