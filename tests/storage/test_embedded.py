"""The embedded server: found, started, reused after a crash, stopped; the `up` bootstrap."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from socks5_analytics.config import DatabaseSettings
from socks5_analytics.storage import Repository
from socks5_analytics.storage.bootstrap import database_ready
from socks5_analytics.storage.embedded import EmbeddedPostgres, find_bin_dir
from socks5_analytics.storage.errors import EmbeddedServerError


@pytest.fixture
def folder() -> Iterator[Path]:
    import shutil

    path = Path(tempfile.mkdtemp(prefix="s5a-emb-"))
    path.chmod(0o755)  # reachable by the unprivileged user the server runs as under root
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_binaries_are_found() -> None:
    assert (find_bin_dir() / "postgres").is_file()


def test_a_folder_without_binaries_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="has no initdb"):
        find_bin_dir(tmp_path)


def test_not_started_has_no_url(folder: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="not running"):
        _ = EmbeddedPostgres(folder / "pg").dsn


async def test_database_ready_starts_migrates_and_stops(folder: Path) -> None:
    settings = DatabaseSettings(embedded_data_dir=folder / "pg")
    async with database_ready(settings) as url:
        repository = await Repository.open(url=url)
        try:
            await repository.ping()
        finally:
            await repository.close()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    # Stopped: nothing listens there any more, and the data stays for the next run.
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
    assert (folder / "pg" / "pgdata" / "PG_VERSION").is_file()
    async with database_ready(settings, migrate=False) as url:
        connection = await asyncpg.connect(url)
        try:
            assert await connection.fetchval("SELECT to_regclass('traffic_logs')") is not None
        finally:
            await connection.close()


def _accepts(server: EmbeddedPostgres, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.connect((server.host, port))
        except ConnectionRefusedError:
            return False
    return True


def test_a_server_another_command_runs_is_used_and_left_running(folder: Path) -> None:
    """`api` or `migrate` beside `up`: they use up's server and leave it running."""
    first = EmbeddedPostgres(folder / "pg", durable=False)
    first.start()
    try:
        second = EmbeddedPostgres(folder / "pg", durable=False)
        assert second.start() == first.dsn
        assert first.owned and not second.owned
        port = first.port
        assert port is not None
        second.stop()
        assert _accepts(first, port)  # still up for the command that started it
    finally:
        first.stop()
    assert not _accepts(first, port)


def test_a_server_left_by_a_dead_command_is_adopted_and_stopped(folder: Path) -> None:
    """A server whose command crashed (or was SIGKILLed) is reused, then stopped."""
    first = EmbeddedPostgres(folder / "pg", durable=False)
    first.start()
    port = first.port
    assert port is not None
    gone = subprocess.Popen(["true"])
    gone.wait()
    first.owner_file.write_text(f"{gone.pid}\n")  # a process that no longer exists
    second = EmbeddedPostgres(folder / "pg", durable=False)
    try:
        assert second.start() == first.dsn
        assert second.owned
    finally:
        second.stop()
    assert not _accepts(second, port)
    first.stop()  # already stopped: nothing to do, no error
