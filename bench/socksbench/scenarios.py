"""The measurement scenarios, each run against one server instance (or direct).

A scenario turns generator output plus the server's /proc counters into
named per-run samples; medians and ratios are computed later (report.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import generator
from .generator import Hop, Result, Target
from .procstat import children_cpu_seconds, system_busy_seconds, tree_cpu_seconds, tree_memory

GB = 1e9  # throughput and CPU/GB use decimal units: MB = 1e6 bytes, GB = 1e9 bytes


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; `--quick` shrinks everything."""

    runs: int
    bulk_bytes: int
    bulk_cap_s: float
    conn_count: int
    conn_cap_s: float
    auth_count: int
    auth_cap_s: float
    idle_count: int
    warmup_count: int
    concurrency: int = 64
    idle_settle_s: float = 1.0


FULL = Sizes(
    runs=3,
    bulk_bytes=1 << 30,
    bulk_cap_s=6.0,
    conn_count=8000,
    conn_cap_s=4.0,
    auth_count=8000,
    auth_cap_s=4.0,
    idle_count=2000,
    warmup_count=300,
)
QUICK = Sizes(
    runs=1,
    bulk_bytes=64 << 20,
    bulk_cap_s=2.0,
    conn_count=1000,
    conn_cap_s=1.5,
    auth_count=500,
    auth_cap_s=1.5,
    idle_count=500,
    warmup_count=100,
)

BULK_CASES = [("up", 1), ("down", 1), ("up", 8), ("down", 8)]
CONN_VARIANTS = {"ipv4": "127.0.0.1", "domain": "localhost"}


@dataclass
class Collector:
    """Per-run samples by server and metric, raw generator output, and caveats."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    raw: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    caps: dict[str, list[str]] = field(default_factory=dict)

    def add(self, server: str, metric: str, value: float) -> None:
        self.samples.setdefault(server, {}).setdefault(metric, []).append(value)

    def note(self, server: str, text: str) -> None:
        """Record a caveat once (errors, caps hit, skipped variants)."""
        notes = self.notes.setdefault(server, [])
        if text not in notes:
            notes.append(text)

    def capped(self, server: str, scenario: str) -> None:
        """A measurement stopped at its time cap (normal for slow servers)."""
        caps = self.caps.setdefault(server, [])
        if scenario not in caps:
            caps.append(scenario)

    def record(
        self, server: str, run: int, scenario: str, result: Result, meter: Meter | None = None
    ) -> None:
        entry: dict[str, Any] = {
            "server": server,
            "run": run,
            "scenario": scenario,
            "result": result,
        }
        if meter is not None:
            entry.update(proxy_cpu_s=meter.proxy_cpu_s, background_cores=meter.background_cores)
            self.add(server, "background_cores", meter.background_cores)
        self.raw.append(entry)


@dataclass
class Subject:
    """What the generator talks to: a server process (pid) or nothing (direct)."""

    name: str
    hop: Hop
    pid: int | None

    def cpu(self) -> float:
        """CPU seconds used so far by the server's process tree (0 for direct)."""
        return tree_cpu_seconds(self.pid) if self.pid else 0.0


@dataclass
class Meter:
    """CPU accounting around one measurement.

    `background_cores` is machine-wide busy time not spent by the server, the
    generator or the target, per second of wall time: other work on the
    machine (or hypervisor steal) that competed with the measurement.  It is
    reported so that figures taken on a busy machine are recognisable.
    """

    proxy_cpu_s: float = 0.0
    background_cores: float = 0.0


@contextmanager
def metered(subject: Subject, target: Target) -> Iterator[Meter]:
    """Fill a Meter with the server's CPU and the background load of the block."""
    meter = Meter()
    t0, busy0 = time.monotonic(), system_busy_seconds()
    proxy0, gen0, tgt0 = subject.cpu(), children_cpu_seconds(), tree_cpu_seconds(target.pid)
    yield meter
    wall = time.monotonic() - t0
    meter.proxy_cpu_s = subject.cpu() - proxy0
    ours = meter.proxy_cpu_s + children_cpu_seconds() - gen0 + tree_cpu_seconds(target.pid) - tgt0
    meter.background_cores = max(0.0, system_busy_seconds() - busy0 - ours) / max(wall, 1e-3)


def first_line(text: str) -> str:
    """The first line of generator stderr, short enough for a note."""
    return text.strip().split("\n", 1)[0][:160]


def warm_up(subject: Subject, target: Target, count: int, concurrency: int) -> None:
    """A few connections first, so lazy imports and first-use allocations are not measured."""
    generator.conn(subject.hop, target, "127.0.0.1", count, 3.0, concurrency)


def measure_bulk(subject: Subject, target: Target, sizes: Sizes, run: int, out: Collector) -> None:
    """Throughput per (direction, streams); CPU per GB pooled over all four cases."""
    cpu_total = bytes_total = 0.0
    for direction, streams in BULK_CASES:
        scenario = f"bulk_{direction}_{streams}"
        with metered(subject, target) as meter:
            res = generator.bulk(
                subject.hop, target, direction, streams, sizes.bulk_bytes, sizes.bulk_cap_s
            )
        out.record(subject.name, run, scenario, res, meter)
        if res["ok_streams"] != streams:
            out.note(
                subject.name,
                f"{scenario}: only {res['ok_streams']}/{streams} streams "
                f"completed ({first_line(res['stderr'])})",
            )
            continue
        if res["capped"]:
            out.capped(subject.name, scenario)
        out.add(subject.name, scenario, res["mb_per_s"])
        out.add(
            subject.name,
            f"gen_cpu_per_gb_{direction}_{streams}",
            res["client_cpu_s"] / (res["bytes"] / GB),
        )
        cpu_total += meter.proxy_cpu_s
        bytes_total += res["bytes"]
    if subject.pid and bytes_total:
        out.add(subject.name, "cpu_per_gb", cpu_total / (bytes_total / GB))


def measure_conn(
    subject: Subject, target: Target, sizes: Sizes, run: int, variant: str, out: Collector
) -> None:
    """Connections per second, latency percentiles and server CPU per connection."""
    auth = variant == "auth"
    dst = CONN_VARIANTS.get(variant, "127.0.0.1")
    count, cap = (
        (sizes.auth_count, sizes.auth_cap_s) if auth else (sizes.conn_count, sizes.conn_cap_s)
    )
    with metered(subject, target) as meter:
        res = generator.conn(subject.hop, target, dst, count, cap, sizes.concurrency)
    out.record(subject.name, run, f"conn_{variant}", res, meter)
    if res["errors"] or res["aborted"]:
        out.note(
            subject.name,
            f"conn_{variant}: {res['errors']} failed, {res['aborted']} "
            f"unfinished connections ({first_line(res['stderr'])})",
        )
    if res["completed"] == 0:
        return
    if res["completed"] < count:
        out.capped(subject.name, f"conn_{variant}")
    out.add(subject.name, f"conn_{variant}", res["conn_per_s"])
    out.add(subject.name, f"p50_{variant}", res["p50_us"] / 1000)
    out.add(subject.name, f"p99_{variant}", res["p99_us"] / 1000)
    if subject.pid:
        out.add(subject.name, f"cpu_per_conn_{variant}", meter.proxy_cpu_s / res["completed"] * 1e6)


def measure_idle(subject: Subject, target: Target, sizes: Sizes, run: int, out: Collector) -> None:
    """Server memory growth per idle CONNECTed connection (PSS and RSS, KiB)."""
    assert subject.pid is not None
    before = tree_memory(subject.pid)
    with generator.idle_connections(
        subject.hop, target, sizes.idle_count, sizes.concurrency, cap_s=20.0, hold_s=60.0
    ) as ready:
        time.sleep(sizes.idle_settle_s)
        after = tree_memory(subject.pid)
    established = int(ready.get("established", 0))
    out.record(
        subject.name,
        run,
        "idle",
        {
            **ready,
            "pss_before_kib": before.pss_kib,
            "pss_after_kib": after.pss_kib,
            "rss_before_kib": before.rss_kib,
            "rss_after_kib": after.rss_kib,
        },
    )
    if established < sizes.idle_count:
        out.note(
            subject.name, f"idle: only {established} of {sizes.idle_count} connections established"
        )
    if established:
        out.add(subject.name, "mem_pss", (after.pss_kib - before.pss_kib) / established)
        out.add(subject.name, "mem_rss", (after.rss_kib - before.rss_kib) / established)
