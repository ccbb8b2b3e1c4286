"""The oracle: known traffic through a real proxy, a real collector and PostgreSQL, then every
route of the API checked against what was sent.

`socks5-analytics collector` and `socks5-analytics proxy` run as child processes on port 0,
exactly as `socks5-analytics up` starts them; real SOCKS5 clients (python-socks) connect
through the proxy to a local destination that reads a known upload and answers a known
download. The mix has several users, domains and an IP literal, a denied destination, a
failed login and a refused connection. The API, in-process over real HTTP, must count every
connection and byte exactly. (Multi-minute bucketing with synthetic clocks is
test_api_routes' part: the proxy stamps events with the real time.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from api_harness import RunningApi, api_settings, iso
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from socks5_analytics.passwords import hash_password

DEADLINE = 30.0
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}
_CMD = [sys.executable, "-m", "socks5_analytics"]


@dataclass(frozen=True)
class Sent:
    """One connection of the mix and what it must have produced."""

    user: str
    host: str
    upload: int
    download: int
    status: str
    password: str | None = None


class Child:
    """A `socks5-analytics` subcommand in a child process; `address` from its log."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("S5A_")}
        self.lines: list[str] = []
        self.address = ""
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [*_CMD, *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        if not self._ready.wait(DEADLINE) or not self.address:
            self.stop()
            raise AssertionError(f"{args[0]} did not start:\n" + "\n".join(self.lines[-30:]))

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "listening" in str(record.get("message")):
                self.address = str(record.get("address", ""))
                self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._pump_thread.join(DEADLINE)
        if self.process.stderr is not None:
            self.process.stderr.close()


class Destination:
    """A TCP server on loopback: reads `UP DOWN\n`, then UP bytes, answers DOWN bytes."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        started = threading.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up, down = map(int, (await reader.readline()).split())
            await reader.readexactly(up)
            writer.write(b"d" * down)
            await writer.drain()
            writer.close()

        async def main() -> None:
            servers = [await asyncio.start_server(handle, "127.0.0.1", 0)]
            self.port = servers[0].sockets[0].getsockname()[1]
            try:  # `localhost` may resolve to ::1 first: the same port there, when free
                servers.append(await asyncio.start_server(handle, "::1", self.port))
            except OSError:
                pass
            started.set()
            await self._stop.wait()
            for server in servers:
                server.close()
                await server.wait_closed()

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(main(),),
                                        daemon=True)
        self._thread.start()
        started.wait(DEADLINE)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DEADLINE)
        self._loop.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def header(sent: Sent) -> bytes:
    return f"{sent.upload} {sent.download}\n".encode()


def mix(dest_port: int, closed_port: int) -> list[tuple[Sent, int]]:
    """The traffic: (connection, destination port)."""
    ok = "ok"
    return [
        *[(Sent("alice", "localhost", 1_000, 50_000, ok), dest_port) for _ in range(3)],
        (Sent("alice", "localhost", 10, 200_000, ok), dest_port),
        *[(Sent("bob", "127.0.0.1", 500, 5_000, ok), dest_port) for _ in range(2)],
        *[(Sent("bob", "blocked.test", 0, 0, "denied_destination"), 443) for _ in range(2)],
        (Sent("alice", "127.0.0.1", 0, 0, "refused"), closed_port),
        (Sent("bob", "localhost", 0, 0, "auth_failed", password="wrong-password"), dest_port),
    ]


async def drive(proxy_address: str, traffic: list[tuple[Sent, int]]) -> None:
    """Each connection of the mix, one after another, through the proxy."""
    for sent, port in traffic:
        password = sent.password or PASSWORDS[sent.user]
        proxy = Proxy.from_url(f"socks5://{sent.user}:{password}@{proxy_address}")
        if sent.status != "ok":
            with pytest.raises(ProxyError):
                await proxy.connect(dest_host=sent.host, dest_port=port, timeout=DEADLINE)
            continue
        sock = await proxy.connect(dest_host=sent.host, dest_port=port, timeout=DEADLINE)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(header(sent) + b"u" * sent.upload)
        await writer.drain()
        assert len(await reader.read()) == sent.download  # until the destination closes
        writer.close()
        await writer.wait_closed()


def expected_out(sent: Sent) -> int:
    return len(header(sent)) + sent.upload if sent.status == "ok" else 0


@pytest.fixture(scope="module")
def pipeline(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[httpx.Client, list[Sent], datetime]]:
    workdir = tmp_path_factory.mktemp("oracle")
    config = {
        "node_id": "oracle-node",
        "log": {"format": "json", "level": "info"},
        "database": {"url": database_url},
        "proxy": {"events": {"flush_interval": 0.05, "heartbeat_interval": 0.2,
                             "spool_dir": str(workdir / "spool")},
                  "shutdown_grace": 2.0, "metrics_listen": "127.0.0.1:0"},
        "collector": {"batch_max_delay": 0.01, "nodes_flush_interval": 0.1,
                      "metrics_listen": "127.0.0.1:0"},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    policy = {
        "users": [{"username": name, "password_hash": hash_password(pw, n=2**4)}
                  for name, pw in PASSWORDS.items()],
        "destinations": {"block_private": False, "rules": [
            {"action": "deny", "domains": ["blocked.test"], "ports": ["1-65535"]}]},
    }
    (workdir / "policy.yaml").write_text(yaml.safe_dump(policy))
    common = ["--config", str(workdir / "config.yaml")]
    destination = Destination()
    started = datetime.now(UTC)
    collector = Child(["collector", *common, "--listen", "127.0.0.1:0"], workdir)
    proxy = None
    try:
        proxy = Child(["proxy", *common, "--listen", "127.0.0.1:0", "--policy",
                       str(workdir / "policy.yaml"), "--collector", collector.address],
                      workdir)
        traffic = mix(destination.port, _closed_port())
        asyncio.run(drive(proxy.address, traffic))
        with RunningApi(api_settings(database_url)) as api, \
                httpx.Client(base_url=api.url, timeout=10) as http:
            window = {"from": iso(started - timedelta(minutes=1)),
                      "to": iso(datetime.now(UTC) + timedelta(minutes=2))}
            deadline = time.monotonic() + DEADLINE
            while http.get("/logs", params={**window, "limit": 1}).json()["total"] < len(
                    traffic) or not http.get("/nodes").json()["items"]:
                assert time.monotonic() < deadline, "the events did not all arrive"
                time.sleep(0.05)  # polling the API with a deadline: nothing to await here
            yield http, [sent for sent, _ in traffic], started
    finally:
        if proxy is not None:
            proxy.stop()
        collector.stop()
        destination.close()


def window(started: datetime) -> dict[str, str]:
    return {"from": iso(started - timedelta(minutes=1)),
            "to": iso(datetime.now(UTC) + timedelta(minutes=2))}


def test_statuses(pipeline: Any) -> None:
    http, sent, started = pipeline
    expected: dict[str, int] = {}
    for item in sent:
        expected[item.status] = expected.get(item.status, 0) + 1
    body = http.get("/stats/statuses", params=window(started)).json()
    assert {i["status"]: i["connections"] for i in body["items"]} == expected
    assert body["total"] == len(expected)


def test_top_domains(pipeline: Any) -> None:
    http, sent, started = pipeline
    body = http.get("/stats/top-domains", params=window(started)).json()
    got = {i["domain"]: i for i in body["items"]}
    assert set(got) == {"localhost", "blocked.test"}  # IP literals and failed logins: none
    for domain in got:
        mine = [s for s in sent if s.host == domain and s.status != "auth_failed"]
        assert got[domain]["connections"] == len(mine)
        assert got[domain]["bytes_in"] == sum(s.download for s in mine)
        assert got[domain]["bytes_out"] == sum(expected_out(s) for s in mine)
    assert got["localhost"]["avg_connect_ms"] > 0
    assert body["items"][0]["domain"] == "localhost"  # most connections first


def test_users_and_sources(pipeline: Any) -> None:
    http, sent, started = pipeline
    users = {i["user"]: i for i in http.get("/stats/users", params=window(started)).json()[
        "items"]}
    for name in ("alice", "bob"):
        mine = [s for s in sent if s.user == name and s.status != "auth_failed"]
        assert users[name]["bytes_in"] == sum(s.download for s in mine)
        assert users[name]["bytes_out"] == sum(expected_out(s) for s in mine)
        assert users[name]["source_ips"] == 1
    assert sum(u["connections"] for u in users.values()) == len(sent)
    sources = http.get("/stats/source-ips", params=window(started)).json()
    assert [(i["source_ip"], i["connections"]) for i in sources["items"]] == [
        ("127.0.0.1", len(sent))]
    assert sources["items"][0]["bytes_in"] == sum(s.download for s in sent)


def test_traffic_and_latency(pipeline: Any) -> None:
    http, sent, started = pipeline
    body = http.get("/stats/traffic", params={**window(started), "interval": "1m"}).json()
    assert sum(p["connections"] for p in body["points"]) == len(sent)
    assert sum(p["bytes_in"] for p in body["points"]) == sum(s.download for s in sent)
    assert sum(p["bytes_out"] for p in body["points"]) == sum(expected_out(s) for s in sent)
    latency = http.get("/stats/latency", params={**window(started), "status": "ok"}).json()
    assert latency["count"] == sum(1 for s in sent if s.status == "ok")
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] + 1e-9


def test_logs_carry_each_connection(pipeline: Any) -> None:
    http, sent, started = pipeline
    body = http.get("/logs", params={**window(started), "limit": 100}).json()
    assert body["total"] == len(sent)
    got = sorted((i["user"], i["dest_host"] or "", i["status"], i["bytes_out"], i["bytes_in"])
                 for i in body["items"])
    want = sorted((s.user, s.host if s.status != "auth_failed" else "", s.status,
                   expected_out(s), s.download) for s in sent)
    assert got == want
    assert all(i["node_id"] == "oracle-node" for i in body["items"])
    started_at = [i["started_at"] for i in body["items"]]
    assert started_at == sorted(started_at, reverse=True)


def test_nodes(pipeline: Any) -> None:
    http, _, _ = pipeline
    items = http.get("/nodes").json()["items"]
    assert [i["node_id"] for i in items] == ["oracle-node"]
    assert items[0]["policy_version"]
