"""Schema migrations: alembic, driven from code (`socks5-analytics migrate`, `up`, tests).

The alembic scripts live in the top-level `alembic/` folder of a source checkout; an
installed wheel carries a copy under `share/socks5-analytics/alembic` of its prefix.
Alembic's environment runs its own event loop, so the async functions here run it in a
worker thread and can be awaited from a running loop.
"""

from __future__ import annotations

import asyncio
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any, Literal

from socks5_analytics.storage.errors import DatabaseUnavailableError, MigrationError

__all__ = [
    "downgrade",
    "head_revision",
    "migrate_command",
    "run_migration",
    "script_location",
    "upgrade",
]

_SHARE = Path("share") / "socks5-analytics" / "alembic"


def script_location() -> Path:
    """The folder of alembic's env.py and versions/."""
    candidates = [
        Path(__file__).resolve().parents[2] / "alembic",  # a source checkout
        Path(sysconfig.get_path("data")) / _SHARE,  # a wheel installed in this environment
        Path(sys.prefix) / _SHARE,
        Path(site.getuserbase()) / _SHARE,  # pip install --user
    ]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise MigrationError(
        "cannot find the migration scripts (looked in "
        + ", ".join(str(path) for path in candidates) + ")"
    )


def _config(url: str) -> object:
    import logging

    from alembic.config import Config

    # alembic announces each of its plugins at INFO ("setup plugin alembic.autogenerate…")
    # on every run; what it does to the schema ("Running upgrade …") stays.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The newest revision the scripts know."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(script_location())).get_current_head()
    if head is None:
        raise MigrationError("the migration scripts have no head revision")
    return head


def run_migration(
    url: str, action: Literal["upgrade", "downgrade"] = "upgrade", revision: str = "head"
) -> None:
    """Upgrade or downgrade the database at `url` to `revision` (blocking)."""
    import asyncpg
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from alembic import command

    config = _config(url)
    try:
        if action == "upgrade":
            command.upgrade(config, revision)  # type: ignore[arg-type]
        else:
            command.downgrade(config, revision)  # type: ignore[arg-type]
    except CommandError as exc:
        raise MigrationError(f"{action} to {revision!r}: {exc}") from exc
    except (OSError, TimeoutError, asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError) as exc:
        raise DatabaseUnavailableError(f"cannot reach the database: {exc}") from exc
    except DBAPIError as exc:
        if isinstance(exc.orig, OSError) or exc.connection_invalidated:
            raise DatabaseUnavailableError(f"cannot reach the database: {exc.orig}") from exc
        raise MigrationError(f"{action} to {revision!r} failed: {exc.orig}") from exc
    except (SQLAlchemyError, asyncpg.PostgresError) as exc:
        raise MigrationError(f"{action} to {revision!r} failed: {exc}") from exc


async def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` (to the newest schema by default)."""
    await asyncio.to_thread(run_migration, url, "upgrade", revision)


async def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at `url` to `revision` (`base`: no schema at all)."""
    await asyncio.to_thread(run_migration, url, "downgrade", revision)


def migrate_command(
    database: Any,
    *,
    action: Literal["upgrade", "downgrade"] = "upgrade",
    revision: str | None = None,
) -> str:
    """What `socks5-analytics migrate` does; returns the line to print.

    `database` is the configuration's `DatabaseSettings`. Without a URL the embedded
    server is started (created on first use), migrated and stopped again.
    """
    if action == "downgrade" and not revision:
        raise MigrationError("downgrade needs a revision (`base` removes the whole schema)")
    target = revision or "head"
    if database.url:
        run_migration(database.url, action, target)
        return f"{action} to {target}: done"
    from socks5_analytics.storage.embedded import EmbeddedPostgres, default_data_dir

    data_dir = database.embedded_data_dir or default_data_dir()
    with EmbeddedPostgres(data_dir, bin_dir=database.embedded_bin_dir) as server:
        run_migration(server.dsn, action, target)
    return f"{action} to {target}: done (embedded server in {data_dir})"
