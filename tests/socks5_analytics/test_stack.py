"""`socks5-analytics up`: the whole local stack as a user runs it, and Ctrl-C loses no event.

The real command in its own process, with an embedded PostgreSQL in a temporary folder and
every port chosen by the system. Connections made just before Ctrl-C must be in the
database afterwards (the stack stops the proxy first, then the collector, then PostgreSQL).
SIGHUP is the proxy's "reload the policy", passed on by `up`, which keeps running.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml
from loopback import echo_server, socks_echo

from socks5_analytics import stack
from socks5_analytics.config import load_settings
from socks5_analytics.passwords import hash_password
from socks5_analytics.storage.embedded import EmbeddedPostgres

CONNECTIONS = 12


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="s5a-up-"))
    folder.chmod(0o755)  # as root, PostgreSQL runs as another user who must reach its folder
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


def test_up_serves_reloads_on_sighup_and_ctrl_c_loses_nothing(workdir: Path,
                                                               echo_port: int) -> None:
    config = {
        "node_id": "stack-test",
        "proxy": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                  "policy_file": str(workdir / "policy.yaml"),
                  "policy_poll_interval": 3600,  # only SIGHUP reloads within the test
                  "events": {"spool_dir": str(workdir / "spool"), "flush_interval": 5.0}},
        "collector": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "database": {"embedded_data_dir": str(workdir / "pg")},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "policy.yaml").write_text("destinations: {block_private: false}\n")
    stack = subprocess.Popen(
        [sys.executable, "-m", "socks5_analytics", "up", "--config", str(workdir / "config.yaml")],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("S5A_")},
    )
    try:
        assert stack.stdout is not None
        announced = ""
        deadline = time.monotonic() + 90
        while "Stop:" not in announced:
            assert time.monotonic() < deadline, f"no announcement: {announced!r}"
            line = stack.stdout.readline()
            assert line or stack.poll() is None, f"up exited {stack.poll()}: {announced}"
            announced += line
        proxy = re.search(r"SOCKS5 proxy\s+(\S+)", announced).group(1)  # type: ignore[union-attr]
        api = re.search(r"stats API\s+(http://\S+?)/ ", announced).group(1)  # type: ignore[union-attr]
        assert "curl --socks5-hostname" in announced
        assert httpx.get(f"{api}/healthz", timeout=10).status_code == 200
        for index in range(CONNECTIONS):
            socks_echo(proxy, echo_port, b"x" * (index + 1))
        # The default policy blocks loopback destinations: in force only once reloaded.
        (workdir / "policy.yaml").write_text("destinations: {block_private: true}\n")
        assert _reply_code(proxy, echo_port) == 0
        stack.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _reply_code(proxy, echo_port) != 2:
            assert stack.poll() is None, f"up exited on SIGHUP: {stack.returncode}"
            assert time.monotonic() < deadline, "SIGHUP did not reload the proxy's policy"
            time.sleep(0.2)
        assert stack.poll() is None
        # flush_interval is 5 s: these events are still in the proxy's memory at Ctrl-C.
        stack.send_signal(signal.SIGINT)
        assert stack.wait(90) == 0
    finally:
        if stack.poll() is None:
            stack.kill()
            stack.wait()
        if stack.stdout is not None:
            stack.stdout.close()
    assert asyncio.run(_rows(workdir / "pg")) == (CONNECTIONS, sum(range(1, CONNECTIONS + 1)))


def _reply_code(proxy: str, port: int) -> int:
    """REP of a no-auth CONNECT to 127.0.0.1:`port` (the connection is closed right away)."""
    host, proxy_port = proxy.rsplit(":", 1)
    with socket.create_connection((host, int(proxy_port)), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        return sock.recv(10)[1]


async def _rows(data_dir: Path) -> tuple[int, int]:
    """Start the stack's database again and count what it stored."""
    async with EmbeddedPostgres(data_dir) as server:
        connection = await asyncpg.connect(server.dsn)
        try:
            row = await connection.fetchrow(  # the echoes, not the policy probes (no bytes)
                "SELECT count(*), coalesce(sum(bytes_out), 0) FROM traffic_logs "
                "WHERE node_id = 'stack-test' AND status = 'ok' AND bytes_out > 0")
        finally:
            await connection.close()
    return int(row[0]), int(row[1])


@pytest.mark.parametrize(("users", "shown"), [
    (True, "curl --socks5-hostname USER:PASSWORD@127.0.0.1:1080 https://example.org/"),
    (False, "curl --socks5-hostname 127.0.0.1:1080 https://example.org/"),
])
def test_the_banner_shows_a_login_when_the_policy_needs_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], users: bool, shown: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"users:\n  - username: alice\n    password_hash: '{hash_password('pw', n=2**4)}'\n"
        if users else "whitelist: []\n")
    settings = load_settings(proxy={"policy_file": str(policy)})
    assert stack._needs_login(settings) is users
    stack._announce("127.0.0.1:1080", "127.0.0.1:50051", "127.0.0.1:8080", "postgresql://x",
                    login=stack._needs_login(settings))
    assert shown in capsys.readouterr().out
