"""CPU time and memory of a process *tree*, read from /proc.

Proxies differ in process model (Dante forks helper processes, microsocks
uses threads, our proxy may run worker processes), so every figure is summed
over the proxy's whole tree; per-process numbers would flatter multi-process
designs.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """PIDs of `root` and all its live descendants (one /proc scan)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus cutime+cstime so reaped children still count.

    A live child's own time is not yet in its parent's cutime, so summing both
    over the live tree counts every CPU second exactly once.
    """
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


@dataclass(frozen=True)
class Memory:
    """Summed memory of a process tree, in KiB."""

    pss_kib: int
    rss_kib: int


def _rollup(pid: int) -> Memory:
    """PSS and RSS of one process from smaps_rollup (0 if it vanished)."""
    pss = rss = 0
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return Memory(0, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "Pss":
            pss = int(rest.split()[0])
        elif key == "Rss":
            rss = int(rest.split()[0])
    return Memory(pss, rss)


def tree_memory(root: int) -> Memory:
    """PSS (shared pages split fairly, right for forked Dante children) and RSS."""
    parts = [_rollup(pid) for pid in tree_pids(root)]
    return Memory(sum(p.pss_kib for p in parts), sum(p.rss_kib for p in parts))


def system_busy_seconds() -> float:
    """Machine-wide user+system time of all CPUs, plus hypervisor steal.

    irq/softirq time is left out: loopback TCP work runs there on behalf of
    the processes under test but is not charged to them, so counting it would
    show our own traffic as "background".
    """
    with (PROC / "stat").open() as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, steal = values[0], values[1], values[2], values[7]
    return (user + nice + system + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU time of our reaped children (the generator runs), from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
