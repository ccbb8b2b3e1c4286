"""`socks5-analytics up`: the whole stack on one machine, in one command.

Starts, in order: the database (the embedded PostgreSQL unless a URL is configured), the
migrations, a collector, the API (when installed) and a proxy that streams to the
collector. Each component is its own process running its own subcommand, with the same
configuration file and environment, so what runs here is what runs in containers. Their
JSON log lines are passed through (re-rendered as short lines on a terminal). Ctrl-C or
SIGTERM stops them in the order that loses nothing: the proxy first (it drains and hands
its last events to the collector), then the collector (it commits them), then the API,
then the database.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from socks5_analytics.config import Settings
from socks5_analytics.logs import configure_logging, get_logger
from socks5_analytics.runtime import STACK_PARENT_ENV

__all__ = ["run"]

log = get_logger("stack")

_START_TIMEOUT = 60.0


@dataclass
class _Child:
    """One component process and what its log told us."""

    name: str
    process: subprocess.Popen[bytes]
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


def _render(line: str, pretty: bool) -> str:
    """A child's JSON log line, as is, or as a short console line on a terminal."""
    if not pretty:
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    stamp = str(record.pop("time", ""))[11:19]
    level = str(record.pop("level", "info"))
    component = str(record.pop("component", "?"))
    message = str(record.pop("message", ""))
    record.pop("node", None)
    extra = " ".join(f"{key}={value}" for key, value in record.items())
    return f"{stamp} {component:<9} {level:<7} {message} {extra}".rstrip()


def _pump(child: _Child, stream: IO[bytes], pretty: bool) -> None:
    """Forward a child's stderr, noting the address it says it listens on."""
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if child.address is None and "listening" in line:
            try:
                record = json.loads(line)
            except ValueError:
                record = {}
            if isinstance(record, dict) and "address" in record:
                child.address = str(record["address"])
                child.ready.set()
        print(_render(line, pretty), file=sys.stderr, flush=True)
    child.ready.set()  # the process ended: nobody waits forever


def _spawn(name: str, args: list[str], env: dict[str, str], pretty: bool) -> _Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "socks5_analytics", *args],
        env=dict(env, **{STACK_PARENT_ENV: str(os.getpid())}),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
    )
    child = _Child(name, process)
    assert process.stderr is not None
    threading.Thread(target=_pump, args=(child, process.stderr, pretty), daemon=True,
                     name=f"log-{name}").start()
    return child


def _wait_ready(child: _Child) -> str:
    if not child.ready.wait(_START_TIMEOUT) or child.address is None:
        code = child.process.poll()
        raise RuntimeError(f"{child.name} did not start (exit status {code})")
    return child.address


def _stop(child: _Child, timeout: float) -> None:
    if child.process.poll() is not None:
        return
    child.process.send_signal(signal.SIGTERM)
    try:
        child.process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("component did not stop in time; killing it", component=child.name)
        child.process.kill()
        child.process.wait()


def run(settings: Settings, config_file: Path | None) -> int:
    """Run the local stack until Ctrl-C or SIGTERM."""
    configure_logging(settings.log, component="stack", node=settings.node_id)
    pretty = sys.stderr.isatty() and settings.log.format != "json"
    database = settings.database
    server: Any = None
    url = database.url
    if not url:
        from socks5_analytics.storage.embedded import EmbeddedPostgres, default_data_dir

        data_dir = database.embedded_data_dir or default_data_dir()
        server = EmbeddedPostgres(data_dir, bin_dir=database.embedded_bin_dir)
        url = server.start()
        log.info("embedded PostgreSQL started", data_dir=str(data_dir), url=url)
    children: list[_Child] = []
    stopping = threading.Event()

    def request_stop(_signum: int, _frame: Any) -> None:
        stopping.set()

    def forward_reload(_signum: int, _frame: Any) -> None:
        # SIGHUP means "reload" for the proxy (DESIGN.md), not "hang up" for the stack: a
        # closed terminal must not kill `up` alone and orphan its children.
        for child in children:
            if child.name == "proxy" and child.process.poll() is None:
                child.process.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, forward_reload)
    status = 0
    try:
        from socks5_analytics.storage.migrate import run_migration

        run_migration(url, "upgrade", "head")
        env = dict(os.environ, S5A_DATABASE__URL=url, S5A_LOG__FORMAT="json",
                   S5A_NODE_ID=settings.node_id)
        common = ["--config", str(config_file)] if config_file else []
        collector = _spawn("collector", ["collector", *common], env, pretty)
        children.append(collector)
        collector_address = _wait_ready(collector)
        api_address = None
        if importlib.util.find_spec("api") is not None:
            api = _spawn("api", ["api", *common], env, pretty)
            children.append(api)
            api_address = _wait_ready(api)
        proxy = _spawn("proxy", ["proxy", *common, "--collector", collector_address], env,
                       pretty)
        children.insert(0, proxy)  # stopped first
        proxy_address = _wait_ready(proxy)
        _announce(proxy_address, collector_address, api_address, url,
                  login=_needs_login(settings))
        while not stopping.is_set():
            for child in children:
                if child.process.poll() is not None:
                    log.error("component exited; stopping the stack", component=child.name,
                              status=child.process.returncode)
                    status = 1
                    stopping.set()
            stopping.wait(0.5)
    except Exception as exc:  # the command's top: report, then stop what started
        log.error("stack failed", error=str(exc))
        status = 1
    finally:
        grace = settings.proxy.shutdown_grace + settings.proxy.events.drain_timeout + 10
        for child in children:
            _stop(child, grace if child.name == "proxy" else 30)
        if server is not None:
            server.stop()
        log.info("stack stopped")
    return status


def _needs_login(settings: Settings) -> bool:
    """Whether the proxy's policy lists users (its own check already passed at start)."""
    from socks5_analytics.policy import PolicyError, load_policy

    try:
        return load_policy(settings.proxy.policy_file).requires_auth
    except (PolicyError, OSError):
        return False


def _announce(proxy: str, collector: str, api: str | None, database: str, *,
              login: bool = False) -> None:
    lines = [
        "",
        "socks5-proxy-analytics is up:",
        f"  SOCKS5 proxy   {proxy}",
        f"  collector      {collector} (gRPC)",
        f"  stats API      http://{api}/  (dashboard: http://{api}/dashboard)" if api else
        "  stats API      not installed",
        f"  PostgreSQL     {database}",
        "",
        f"Try it:  curl --socks5-hostname {'USER:PASSWORD@' if login else ''}{proxy} "
        "https://example.org/ -o /dev/null",
        "Stop:    Ctrl-C",
        "",
    ]
    print("\n".join(lines), flush=True)
