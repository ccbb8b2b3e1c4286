#!/usr/bin/env python3
"""Our proxy's connection rate with tracing off, on at 1 % sampling and on at 100 %, same run.

Usage: .venv/bin/python bench/tracing.py [--runs N] [--quick] [--workers N] [--keep]

One target server and one in-process OTLP/gRPC receiver (socksbench/otlp.py: counts spans)
for the whole run. Each run starts a fresh proxy per mode (order rotated from run to run,
so drift of the machine hits every mode alike), warms it up, and measures the connection
rate with the C load generator exactly as bench/run.py's "conn_ipv4" scenario does
(CONNECT to 127.0.0.1, echo once, server closes). Tracing is switched on the way an operator
does: S5A_TELEMETRY__OTLP_ENDPOINT and S5A_TELEMETRY__SAMPLE_RATIO in the proxy's
environment. Medians per mode and ratios to "off" go to stdout (markdown) and to
bench/results/tracing-<time>.{json,md}. See BENCHMARKS.md ("Tracing overhead").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from socksbench import generator, report, scenarios
from socksbench.generator import Hop
from socksbench.otlp import OtlpReceiver
from socksbench.proxies import Ours, start
from socksbench.scenarios import Collector, Subject

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.monotonic()
MODES: list[tuple[str, float | None]] = [("off", None), ("on, 1 %", 0.01), ("on, 100 %", 1.0)]
SIZES = dataclasses.replace(scenarios.FULL, runs=7)
QUICK = dataclasses.replace(scenarios.QUICK, runs=1)
ROWS = [  # key, label, unit, higher is better
    ("conn_ipv4", "Connections/s", "conn/s", True),
    ("p50_ipv4", "p50 connection latency", "ms", False),
    ("p99_ipv4", "p99 connection latency", "ms", False),
    ("cpu_per_conn_ipv4", "Proxy CPU per connection", "µs", False),
    ("spans_per_conn", "Spans received per connection", "", True),
]


def log(message: str) -> None:
    elapsed = int(time.monotonic() - T0)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class TracedOurs(Ours):
    """Our proxy with tracing configured through its S5A_TELEMETRY__* variables."""

    endpoint: str | None = None
    ratio: float = 1.0

    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        argv = super().command(port, auth, workdir)
        if self.endpoint is None:
            return argv
        return ["env", f"S5A_TELEMETRY__OTLP_ENDPOINT={self.endpoint}",
                f"S5A_TELEMETRY__SAMPLE_RATIO={self.ratio}", *argv]


def settle(receiver: OtlpReceiver, timeout: float = 5.0) -> int:
    """Spans received once the count stops moving (the proxy flushes on exit)."""
    deadline = time.monotonic() + timeout
    last = receiver.spans
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = receiver.spans
        if now == last:
            return now
        last = now
    return last


def measure(mode: str, proxy: TracedOurs, target: generator.Target, receiver: OtlpReceiver,
            sizes: scenarios.Sizes, run: int, out: Collector, workdir: Path) -> None:
    spans_before = receiver.spans
    running = start(proxy, auth=False, workdir=workdir)
    completed = 0
    try:
        subject = Subject(mode, Hop(running.port), running.pid)
        warm = generator.conn(subject.hop, target, "127.0.0.1", sizes.warmup_count, 3.0,
                              sizes.concurrency)
        before = len(out.raw)
        scenarios.measure_conn(subject, target, sizes, run, "ipv4", out)
        completed = warm["completed"] + sum(
            entry["result"]["completed"] for entry in out.raw[before:])
        if not running.alive():
            out.note(mode, f"the proxy exited during the run: {running.log_tail()}")
    finally:
        running.stop()
    spans = settle(receiver) - spans_before
    if proxy.endpoint is not None and completed:
        out.add(mode, "spans_per_conn", spans / completed)
    out.record(mode, run, "spans", {"spans": spans, "connections": completed})


def markdown(medians: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    names = [name for name, _ in MODES]
    head = "| Metric | " + " | ".join(names) + " | " + " | ".join(
        f"{n} / off" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for key, label, unit, _higher in ROWS:
        values = [medians.get(n, {}).get(key) for n in names]
        if all(v is None for v in values):
            continue
        base = values[0]
        cells = [report.fmt(v) if v is not None else "-" for v in values]
        ratios = [f"{v / base:.2f}" if v is not None and base else "-" for v in values[1:]]
        lines.append(f"| {label}{f' ({unit})' if unit else ''} | " + " | ".join(cells) +
                     " | " + " | ".join(ratios) + " |")
    return (f"Measured {meta['date']} on {meta['machine']['cpu']}, {meta['machine']['cores']} "
            f"cores, commit {meta['commit']}; {meta['runs']} run(s), medians; "
            f"{meta['conn_count']} connections (cap {meta['conn_cap_s']:g} s), "
            f"concurrency {meta['concurrency']}.\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="runs per mode (default 7, quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run")
    parser.add_argument("--workers", type=int, default=1, help="proxy.workers (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = QUICK if args.quick else SIZES
    if args.runs:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    # "off" must mean off: no tracing configuration inherited from this shell.
    for name in [n for n in os.environ if n.startswith(("OTEL_", "S5A_TELEMETRY"))]:
        log(f"ignoring {name} from the environment")
        del os.environ[name]
    log(f"building {generator.build()}")
    out = Collector()
    workroot = Path(tempfile.mkdtemp(prefix="socksbench-tracing-"))
    receiver_stats: dict[str, Any] = {}
    try:
        with generator.running_target() as target, OtlpReceiver() as receiver:
            proxies = {name: TracedOurs("ours", workers=args.workers, is_ours=True,
                                        endpoint=None if ratio is None else receiver.endpoint,
                                        ratio=ratio or 1.0)
                       for name, ratio in MODES}
            reason = next(iter(proxies.values())).unavailable()
            if reason:
                log(f"cannot run our proxy: {reason}")
                return 1
            for run in range(sizes.runs):
                shift = run % len(MODES)
                for name, _ in MODES[shift:] + MODES[:shift]:
                    measure(name, proxies[name], target, receiver, sizes, run, out,
                            workroot / f"{run}-{name.replace(' ', '').replace(',', '-')}")
                    last = {k: report.fmt(v[-1]) for k, v in out.samples.get(name, {}).items()
                            if k in ("conn_ipv4", "p99_ipv4", "spans_per_conn")}
                    log(f"run {run + 1}/{sizes.runs} {name}: {last}")
            receiver_stats = {"spans": receiver.spans, "requests": receiver.counter.requests,
                              "by_name": dict(receiver.counter.by_name)}
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    medians = {name: {k: statistics.median(v) for k, v in metrics.items()}
               for name, metrics in out.samples.items()}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": report.machine_info(),
        "commit": report.git_state(),
        "runs": sizes.runs,
        "conn_count": sizes.conn_count,
        "conn_cap_s": sizes.conn_cap_s,
        "concurrency": sizes.concurrency,
        "workers": args.workers,
        "elapsed_s": round(time.monotonic() - T0, 1),
        "receiver": receiver_stats,
    }
    md = markdown(medians, meta)
    notes = [f"- {name}: {text}" for name, texts in out.notes.items() for text in texts]
    notes += [f"- {name}: hit the time cap in {', '.join(caps)} in at least one run"
              for name, caps in out.caps.items()]
    if notes:
        md += "\nNotes:\n" + "\n".join(notes) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"meta": meta, "medians": medians, "samples": out.samples, "notes": out.notes,
               "raw": out.raw}
    (RESULTS / f"tracing-{stamp}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"tracing-{stamp}.md").write_text(md)
    print(md)
    log(f"done in {meta['elapsed_s']} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
