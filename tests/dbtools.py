"""Small helpers for tests that make databases on the session's PostgreSQL (tests/conftest.py).

A module of its own (not conftest) so that test modules can import it by a unique name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import asyncpg

from socks5_analytics.storage.embedded import EmbeddedPostgres

T = TypeVar("T")


def run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a loop of its own (for sync, wide-scoped fixtures)."""

    async def runner() -> T:
        return await make()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()


async def admin_sql(server: EmbeddedPostgres, sql: str) -> None:
    """Run one statement as the server's superuser (CREATE/DROP DATABASE)."""
    connection = await asyncpg.connect(server.dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()
