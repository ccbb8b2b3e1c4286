"""Medians, "ours / best peer" ratios, and the markdown and JSON reports."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIRECT = "direct"
OURS = "ours"


@dataclass(frozen=True)
class Metric:
    """One table row: how to label it and which direction is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    ratio: bool = True  # False for context rows where "ours / best peer" means nothing


def _conn_rows(variant: str, label: str) -> list[Metric]:
    return [
        Metric(f"conn_{variant}", f"Connections/s, {label}", "conn/s", True),
        Metric(f"p50_{variant}", f"p50 connection latency, {label}", "ms", False),
        Metric(f"p99_{variant}", f"p99 connection latency, {label}", "ms", False),
        Metric(f"cpu_per_conn_{variant}", f"Server CPU per connection, {label}", "µs", False),
    ]


METRICS: list[Metric] = [
    Metric("bulk_up_1", "Bulk upload, 1 stream", "MB/s", True),
    Metric("bulk_down_1", "Bulk download, 1 stream", "MB/s", True),
    Metric("bulk_up_8", "Bulk upload, 8 streams", "MB/s", True),
    Metric("bulk_down_8", "Bulk download, 8 streams", "MB/s", True),
    Metric("cpu_per_gb", "Server CPU per GB relayed (all bulk cases)", "s/GB", False),
    *_conn_rows("ipv4", "IPv4 (ATYP 1)"),
    *_conn_rows("domain", "domain `localhost` (ATYP 3)"),
    *_conn_rows("auth", "username/password (RFC 1929)"),
    Metric("mem_pss", "Memory per idle connection (PSS)", "KiB", False),
    Metric("mem_rss", "Memory per idle connection (RSS)", "KiB", False),
    Metric("background_cores", "Other CPU load during measurements", "cores", False, ratio=False),
]


def medians(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median of each metric's per-run samples, per server."""
    return {
        server: {key: statistics.median(vals) for key, vals in metrics.items() if vals}
        for server, metrics in samples.items()
    }


def best_peer(
    med: dict[str, dict[str, float]], peers: list[str], metric: Metric
) -> tuple[str, float] | None:
    """The peer with the best median for `metric` (max or min by direction)."""
    have = [(p, med[p][metric.key]) for p in peers if metric.key in med.get(p, {})]
    if not have:
        return None
    pick = max if metric.higher_is_better else min
    return pick(have, key=lambda pv: pv[1])


def fmt(value: float) -> str:
    """Three significant-ish digits, never scientific notation."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(med: dict[str, dict[str, float]], server: str, key: str, missing: str) -> str:
    value = med.get(server, {}).get(key)
    return fmt(value) if value is not None else missing


def _ratio_cell(med: dict[str, dict[str, float]], peers: list[str], metric: Metric) -> str:
    if not metric.ratio:
        return ""
    best = best_peer(med, peers, metric)
    ours = med.get(OURS, {}).get(metric.key)
    if best is None or ours is None or best[1] == 0:
        return "pending" if ours is None else "—"
    return f"{ours / best[1]:.2f} (vs {best[0]})"


def markdown_table(
    med: dict[str, dict[str, float]], servers: list[str], missing: dict[str, str]
) -> str:
    """The results table: one row per metric, one column per server, then the ratio.

    `missing` maps a server name to what its empty cells say ("pending",
    "n/a", "failed").
    """
    peers = [s for s in servers if s not in (DIRECT, OURS)]
    head = ["Scenario", "Unit", "Better", *servers, "ours / best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in METRICS:
        cells = [metric.label, metric.unit, "higher" if metric.higher_is_better else "lower"]
        for server in servers:
            cells.append(_cell(med, server, metric.key, missing.get(server, "—")))
        cells.append(_ratio_cell(med, peers, metric))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def busy_warning(med: dict[str, dict[str, float]], threshold: float = 0.2) -> str | None:
    """A warning if other work competed with the measurements (noisy figures)."""
    worst = max((m.get("background_cores", 0.0) for m in med.values()), default=0.0)
    if worst <= threshold:
        return None
    return (
        f"WARNING: up to {worst:.2f} cores of other load (processes not under test, "
        "or hypervisor steal) ran during the measurements; figures are noisy. "
        "Re-run on a quiet machine, or with --wait-quiet 60."
    )


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    try:
        distro = Path("/etc/debian_version").read_text().strip()
    except OSError:
        distro = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "debian": distro,
        "python": platform.python_version(),
    }


def git_state() -> str:
    """The measured code's commit, marked "+dirty" when the work tree had changes."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench")
    return head + ("+dirty" if dirty else "")
