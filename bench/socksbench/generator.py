"""Build and drive the C load generator (bench/loadgen.c).

The harness performs its own build step (no make): gcc is on every machine
of this project, and compiling takes well under a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netutil import LOOPBACK, free_port

BENCH_DIR = Path(__file__).resolve().parent.parent
SOURCE = BENCH_DIR / "loadgen.c"
BINARY = BENCH_DIR / "build" / "loadgen"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]

Result = dict[str, Any]


def build() -> Path:
    """Compile loadgen.c into bench/build/ unless the binary is newer than the source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("gcc not found: apt-get install gcc")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, *CFLAGS, "-o", str(BINARY), str(SOURCE)], check=True)
    return BINARY


@dataclass(frozen=True)
class Hop:
    """Where the generator connects: a SOCKS5 proxy, or None for direct."""

    proxy_port: int | None
    user: str | None = None
    password: str | None = None

    def args(self) -> list[str]:
        """loadgen options for this hop."""
        out = ["--proxy", f"{LOOPBACK}:{self.proxy_port}" if self.proxy_port else "-"]
        if self.user is not None and self.password is not None:
            out += ["--user", self.user, "--pass", self.password]
        return out


def _run(args: list[str], timeout: float) -> Result:
    """Run one generator command and parse its JSON line; stderr kept for diagnosis."""
    proc = subprocess.run(
        [str(BINARY), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen {args[0]} failed (rc={proc.returncode}): {proc.stderr[-500:]}")
    result: Result = json.loads(lines[-1])
    result["stderr"] = proc.stderr.strip()[-500:]
    return result


@dataclass
class Target:
    """The loopback target server: persistent echo, echo-once-then-close, sink, source."""

    echo: int
    echo1: int
    sink: int
    source: int
    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Terminate the target process we started."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running_target() -> Iterator[Target]:
    """Start the target and wait for its ready line; always stop it afterwards."""
    ports = [free_port() for _ in range(4)]
    proc = subprocess.Popen(
        [
            str(BINARY),
            "target",
            "--echo",
            str(ports[0]),
            "--echo1",
            str(ports[1]),
            "--sink",
            str(ports[2]),
            "--source",
            str(ports[3]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    target = Target(echo=ports[0], echo1=ports[1], sink=ports[2], source=ports[3], proc=proc)
    try:
        assert proc.stdout is not None
        if '"ready":true' not in proc.stdout.readline():
            raise RuntimeError("target server did not start")
        yield target
    finally:
        target.stop()


def bulk(
    hop: Hop, target: Target, direction: str, streams: int, nbytes: int, cap_s: float
) -> Result:
    """Move `nbytes` split over `streams` connections up (to sink) or down (from source)."""
    port = target.sink if direction == "up" else target.source
    args = [
        "bulk",
        *hop.args(),
        "--dst",
        LOOPBACK,
        "--dport",
        str(port),
        "--dir",
        direction,
        "--streams",
        str(streams),
        "--bytes",
        str(nbytes),
        "--cap",
        str(cap_s),
    ]
    return _run(args, timeout=cap_s + 60)


def conn(hop: Hop, target: Target, dst: str, count: int, cap_s: float, concurrency: int) -> Result:
    """Connection-rate run: `count` short connections (bounded by `cap_s`) to echo1."""
    args = [
        "conn",
        *hop.args(),
        "--dst",
        dst,
        "--dport",
        str(target.echo1),
        "--count",
        str(count),
        "--cap",
        str(cap_s),
        "--concurrency",
        str(concurrency),
        "--close",
        "server",
    ]
    return _run(args, timeout=cap_s + 30)


@contextmanager
def idle_connections(
    hop: Hop, target: Target, count: int, concurrency: int, cap_s: float, hold_s: float
) -> Iterator[Result]:
    """Hold `count` CONNECTed idle connections open for the duration of the block.

    Yields the generator's "ready" report; leaving the block closes its stdin,
    which makes it close every connection and exit.
    """
    proc = subprocess.Popen(
        [
            str(BINARY),
            "idle",
            *hop.args(),
            "--dst",
            LOOPBACK,
            "--dport",
            str(target.echo),
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--cap",
            str(cap_s),
            "--hold",
            str(hold_s),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready: Result = json.loads(proc.stdout.readline() or "{}")
        yield ready
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=hold_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(0.2)  # let the proxy notice the closes before the next step
