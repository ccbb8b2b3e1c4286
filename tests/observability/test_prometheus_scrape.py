"""A real Prometheus (Debian's `prometheus`) scrapes a running proxy node, and its query API
returns the node's connection counter with the value the traffic we sent implies.

The proxy runs as `socks5-analytics proxy` with metrics_listen 127.0.0.1:0 (the port comes
from its "proxy listening" log line); Prometheus runs with a generated config (1 s scrapes,
our alert rules loaded), storage in tmp_path and a free loopback port. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql_names import ALERTS

DEADLINE = 20.0
OK_CONNECTIONS = 5


def _wait(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Process:
    """A child process in its own session; stdout and stderr lines are kept."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def json_line(self, message: str) -> dict[str, Any] | None:
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("message") == message:
                return record
        assert self.proc.poll() is None, f"{self.argv[0]} exited:\n" + self.tail()
        return None

    def tail(self) -> str:
        return "\n".join(self.lines[-30:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)  # so that the thread sees `stop` (close() does not wake accept)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn, contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Process]:
    """A proxy node: no auth, loopback destinations allowed, metrics on a free port."""
    workdir = tmp_path / "proxy"
    workdir.mkdir()
    config = {
        "node_id": "prometheus-test",
        "log": {"format": "json", "level": "info"},
        "proxy": {"metrics_listen": "127.0.0.1:0", "shutdown_grace": 1.0,
                  "events": {"path": str(workdir / "events.jsonl"), "flush_interval": 0.05}},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "policy.yaml").write_text("destinations: {block_private: false}\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S5A_", "OTEL_")) and k.lower() not in
           {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}}
    process = Process([sys.executable, "-m", "socks5_analytics", "proxy",
                       "--config", str(workdir / "config.yaml"), "--listen", "127.0.0.1:0",
                       "--policy", str(workdir / "policy.yaml")], workdir, env)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if path is None:
        pytest.fail("prometheus is not installed: apt-get install prometheus "
                    "(`make test` installs it with `make system-deps`)")
    return path


def _start_prometheus(binary: str, workdir: Path, target: str) -> tuple[Process, str]:
    workdir.mkdir()
    shutil.copy(ALERTS, workdir / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "proxy",
                            "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    process = Process([binary, f"--config.file={workdir / 'prometheus.yml'}",
                       f"--storage.tsdb.path={workdir / 'data'}",
                       f"--web.listen-address={address}", "--log.level=warn"], workdir)
    return process, f"http://{address}"


def _socks_connect(proxy_address: str, port: int) -> int:
    """One CONNECT through the proxy; echoes a payload when it succeeds; returns REP."""
    host, proxy_port = proxy_address.rsplit(":", 1)
    with socket.create_connection((host, int(proxy_port)), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        reply = b""
        while len(reply) < 10:
            chunk = sock.recv(10 - len(reply))
            assert chunk, "the proxy closed before its reply"
            reply += chunk
        if reply[1] == 0:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        return reply[1]


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    answer = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_the_proxy_connection_counter(
    proxy: Process, prometheus_binary: str, echo_port: int, tmp_path: Path
) -> None:
    listening = _wait(lambda: proxy.json_line("proxy listening"), "the proxy to listen")
    metrics_address = listening["metrics"]
    assert metrics_address, f"no metrics address in {listening}"
    prometheus, base = _start_prometheus(prometheus_binary, tmp_path / "prometheus",
                                         metrics_address)
    try:
        for _ in range(OK_CONNECTIONS):
            assert _socks_connect(listening["address"], echo_port) == 0
        closed_port = _free_port()  # nothing listens there: the proxy answers "refused"
        assert _socks_connect(listening["address"], closed_port) != 0

        def ready() -> bool:
            assert prometheus.proc.poll() is None, "prometheus exited:\n" + prometheus.tail()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait(ready, "prometheus to be ready")

        def scraped() -> list[dict[str, Any]] | None:
            result = _query(base, 's5a_proxy_connections_total{job="proxy"}')
            by_status = {r["metric"]["status"]: float(r["value"][1]) for r in result}
            done = by_status.get("ok") == OK_CONNECTIONS and by_status.get("refused") == 1
            return result if done else None

        try:
            result = _wait(scraped, f"prometheus to see {OK_CONNECTIONS} ok connections")
        except AssertionError:
            targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            last = _query(base, "s5a_proxy_connections_total")
            raise AssertionError(f"targets: {targets}\nlast answer: {last}\n"
                                 f"prometheus log:\n{prometheus.tail()}") from None
        for series in result:
            labels = series["metric"]
            assert labels["instance"] == metrics_address
            assert labels["command"] == "connect"
            # Bounded labels only: nothing names a client, user or destination.
            assert set(labels) == {"__name__", "job", "instance", "status", "command"}
        total = _query(base, 'sum(s5a_proxy_connections_total{job="proxy"})')
        assert float(total[0]["value"][1]) == OK_CONNECTIONS + 1
        sent = _query(base, 's5a_proxy_bytes_total{job="proxy", direction="out"}')
        assert float(sent[0]["value"][1]) == 4 * OK_CONNECTIONS
        # Our alert rules load in a real Prometheus, and are evaluated against the node.
        groups = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
        alerts = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"S5aProxyCollectorUnreachable", "S5aProxyEventsDropped"} <= alerts
        assert all(rule["health"] != "err" for group in groups for rule in group["rules"]), \
            groups
    finally:
        prometheus.stop()
