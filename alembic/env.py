"""Alembic environment: runs the migrations over asyncpg, the project's only driver.

The database URL comes from `config.attributes["url"]` (set by `socks5-analytics migrate`),
else `-x url=...` on the alembic command line, else the `S5A_DATABASE__URL` variable. The
URL is handed to asyncpg unchanged (SQLAlchemy only wraps the connection), so it means
exactly what it means to the collector and the API.

Every run holds a transaction-scoped advisory lock, so two processes that migrate at once
(a collector and an API starting together) take turns instead of racing on the DDL.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context

# An arbitrary constant shared by every migrating process of this project.
_MIGRATION_LOCK_KEY = 0x53_35_41_4D  # "S5AM"

config = context.config


def _database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("S5A_DATABASE__URL")
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=postgresql://... or set S5A_DATABASE__URL"
        )
    return str(url)


def _run_offline() -> None:
    """Emit the SQL instead of running it (`alembic upgrade head --sql`)."""
    context.configure(dialect_name="postgresql", literal_binds=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, transactional_ddl=True)
    with context.begin_transaction():
        context.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
        context.run_migrations()


async def _run_online() -> None:
    url = _database_url()

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(url, server_settings={"timezone": "UTC"})

    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=connect, poolclass=pool.NullPool
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _run_offline()
else:
    asyncio.run(_run_online())
