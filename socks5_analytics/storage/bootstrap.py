"""A ready database for a process to use: the configured server, or the embedded one.

`socks5-analytics up` (and anything else that wants "just give me a database") wraps its
run in `database_ready(settings.database)`: with `database.url` set it migrates that
server; without, it starts the embedded server in `database.embedded_data_dir` (the user's
data directory by default), migrates it, and stops it when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from socks5_analytics.storage.embedded import EmbeddedPostgres, default_data_dir
from socks5_analytics.storage.migrate import upgrade

__all__ = ["database_ready"]


@contextlib.asynccontextmanager
async def database_ready(database: Any, *, migrate: bool = True) -> AsyncIterator[str]:
    """Yield the URL of a database at the newest schema (`database`: DatabaseSettings)."""
    if database.url:
        if migrate:
            await upgrade(database.url)
        yield database.url
        return
    server = EmbeddedPostgres(
        database.embedded_data_dir or default_data_dir(), bin_dir=database.embedded_bin_dir
    )
    await asyncio.to_thread(server.start)
    try:
        if migrate:
            await upgrade(server.dsn)
        yield server.dsn
    finally:
        await asyncio.to_thread(server.stop)
