#!/usr/bin/env python3
"""Benchmark our SOCKS5 proxy against Dante, microsocks and pproxy in one run.

Usage: .venv/bin/python bench/run.py [--runs N] [--quick] [--only NAME ...]

Every server is started fresh on loopback for every run, measured with the C
load generator (built here into bench/build/), and stopped.  Runs go round
robin over the servers so that slow drift of the machine affects all alike.
Results: a markdown table on stdout, JSON and markdown in bench/results/.
See bench/README.md and BENCHMARKS.md for the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from socksbench import generator, report, scenarios
from socksbench.generator import Hop, Target
from socksbench.procstat import system_busy_seconds
from socksbench.proxies import PASSWORD, USER, Proxy, Running, all_proxies, start
from socksbench.scenarios import Collector, Sizes, Subject

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr with elapsed time, so a background run can be followed."""
    elapsed = int(time.monotonic() - T0)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [p.name for p in all_proxies()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="runs per server (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run: smoke test")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"only these servers (repeatable or comma-separated): {names}",
    )
    parser.add_argument(
        "--ours-workers", type=int, default=1, help="proxy.workers for our proxy (default 1)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each server, wait up to SECONDS for other load to drop (shared machines)",
    )
    args = parser.parse_args(argv)
    args.only = [n for item in args.only for n in item.split(",") if n]
    unknown = set(args.only) - set(names)
    if unknown:
        parser.error(f"unknown server(s) {sorted(unknown)}; choose from {names}")
    return args


def raise_nofile() -> None:
    """Servers inherit our fd limit and must hold 2x the idle connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def select(args: argparse.Namespace) -> tuple[list[Proxy], dict[str, str]]:
    """The servers to measure, and the reason each unavailable one is skipped."""
    chosen = [p for p in all_proxies(args.ours_workers) if not args.only or p.name in args.only]
    usable, skipped = [], {}
    for proxy in chosen:
        reason = proxy.unavailable()
        if reason:
            skipped[proxy.name] = reason
            log(f"SKIP {proxy.name}: {reason}")
        else:
            usable.append(proxy)
    return usable, skipped


def count_lines(path: Path) -> int:
    """Lines in a file (0 if absent): how many events our sink wrote."""
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def bench_noauth(
    proxy: Proxy, target: Target, sizes: Sizes, run: int, out: Collector, workdir: Path
) -> None:
    """Idle memory (fresh process), bulk, and connection rate without auth."""
    running = start(proxy, auth=False, workdir=workdir)
    try:
        subject = Subject(proxy.name, Hop(running.port), running.pid)
        scenarios.warm_up(subject, target, sizes.warmup_count, sizes.concurrency)
        scenarios.measure_idle(subject, target, sizes, run, out)
        scenarios.measure_bulk(subject, target, sizes, run, out)
        for variant in ("ipv4", "domain"):
            scenarios.measure_conn(subject, target, sizes, run, variant, out)
        check_alive(running, out)
    finally:
        running.stop()
    if proxy.is_ours:
        events = count_lines(workdir / "events.jsonl")
        out.record(proxy.name, run, "events", {"jsonl_lines": events})
        if events == 0:
            out.note(proxy.name, "the jsonl event sink wrote no events")


def bench_auth(
    proxy: Proxy, target: Target, sizes: Sizes, run: int, out: Collector, workdir: Path
) -> None:
    """Connection rate with RFC 1929 username/password, on a separate instance."""
    reason = proxy.auth_unavailable()
    if reason:
        out.note(proxy.name, f"auth variant skipped: {reason}")
        return
    running = start(proxy, auth=True, workdir=workdir)
    try:
        subject = Subject(proxy.name, Hop(running.port, USER, PASSWORD), running.pid)
        scenarios.warm_up(subject, target, max(8, sizes.warmup_count // 10), sizes.concurrency)
        scenarios.measure_conn(subject, target, sizes, run, "auth", out)
        check_alive(running, out)
    finally:
        running.stop()


def check_alive(running: Running, out: Collector) -> None:
    """A server that died mid-run would make later numbers meaningless: say so."""
    if not running.alive():
        out.note(running.proxy.name, f"process exited during the run: {running.log_tail()}")


def bench_direct(target: Target, sizes: Sizes, run: int, out: Collector) -> None:
    """The generator straight to the target: shows the generator is not the limit."""
    subject = Subject(report.DIRECT, Hop(None), None)
    scenarios.warm_up(subject, target, sizes.warmup_count, sizes.concurrency)
    scenarios.measure_bulk(subject, target, sizes, run, out)
    for variant in ("ipv4", "domain"):
        scenarios.measure_conn(subject, target, sizes, run, variant, out)


def sample_counts(out: Collector, name: str) -> dict[str, int]:
    """How many samples each metric of a server has so far."""
    return {k: len(v) for k, v in out.samples.get(name, {}).items()}


def summary(out: Collector, name: str, before: dict[str, int]) -> str:
    """One-line progress summary of the samples a server added in this run."""
    new = {k: v[-1] for k, v in out.samples.get(name, {}).items() if len(v) > before.get(k, 0)}
    keys = ["bulk_up_8", "bulk_down_8", "conn_ipv4", "conn_auth", "mem_pss"]
    return ", ".join(f"{k}={report.fmt(new[k])}" for k in keys if k in new) or "no samples"


def wait_quiet(max_wait_s: float, threshold: float = 0.2) -> None:
    """Wait (bounded) until other processes use under `threshold` cores.

    Nothing of ours is busy between servers, so machine-wide busy time is
    other work; on a shared machine this keeps it out of the measurements.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0 = system_busy_seconds()
        time.sleep(1.0)
        load = system_busy_seconds() - busy0
        if load < threshold:
            return
        if time.monotonic() >= deadline:
            log(f"  machine still busy ({load:.2f} cores of other load); measuring anyway")
            return


def run_all(
    proxies: list[Proxy], sizes: Sizes, out: Collector, workroot: Path, quiet_s: float
) -> None:
    """Round-robin: every run measures direct, then each server in turn."""
    with generator.running_target() as target:
        for run in range(sizes.runs):
            if quiet_s:
                wait_quiet(quiet_s)
            log(f"run {run + 1}/{sizes.runs}: direct")
            bench_direct(target, sizes, run, out)
            for proxy in proxies:
                if quiet_s:
                    wait_quiet(quiet_s)
                log(f"run {run + 1}/{sizes.runs}: {proxy.name}")
                workdir = workroot / f"{proxy.name}-{run}"
                before = sample_counts(out, proxy.name)
                try:
                    bench_noauth(proxy, target, sizes, run, out, workdir / "noauth")
                    bench_auth(proxy, target, sizes, run, out, workdir / "auth")
                except (RuntimeError, OSError, KeyError, ValueError) as exc:
                    out.note(proxy.name, f"run {run + 1} failed: {exc}")
                    log(f"  {proxy.name} FAILED: {exc}")
                log(f"  {summary(out, proxy.name, before)}")


def write_results(
    out: Collector, sizes: Sizes, proxies: list[Proxy], skipped: dict[str, str]
) -> str:
    """Write JSON + markdown into bench/results/ and return the markdown."""
    med = report.medians(out.samples)
    servers = [report.DIRECT, *[p.name for p in proxies], *skipped]
    missing = {name: ("pending" if name == report.OURS else "n/a") for name in skipped}
    table = report.markdown_table(med, servers, missing)
    notes = [f"- {name}: {text}" for name, texts in out.notes.items() for text in texts]
    notes += [f"- {name}: skipped: {reason}" for name, reason in skipped.items()]
    notes += [
        f"- {name}: hit the time cap in {', '.join(caps)} in at least one run "
        "(figures are over the bytes or connections completed)"
        for name, caps in out.caps.items()
    ]
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": report.machine_info(),
        "sizes": dataclasses.asdict(sizes),
        "versions": {p.name: p.version() for p in proxies},
        "commit": report.git_state(),
        "elapsed_s": round(time.monotonic() - T0, 1),
    }
    warning = report.busy_warning(med)
    if warning:
        notes.insert(0, f"- {warning}")
    md = (
        f"Measured {meta['date']} on {meta['machine']['cpu']}, {meta['machine']['cores']} "
        f"cores, commit {meta['commit']}; {sizes.runs} run(s), medians.\n\n{table}\n"
    )
    if notes:
        md += "\nNotes:\n" + "\n".join(notes) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "meta": meta,
        "medians": med,
        "samples": out.samples,
        "notes": out.notes,
        "capped": out.caps,
        "skipped": skipped,
        "raw": out.raw,
    }
    for name in (f"results-{stamp}", "latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so servers, target and system user are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    if args.runs:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    raise_nofile()
    log(f"building {generator.build()}")
    proxies, skipped = select(args)
    out = Collector()
    workroot = Path(tempfile.mkdtemp(prefix="socksbench-"))
    try:
        run_all(proxies, sizes, out, workroot, args.wait_quiet)
    finally:
        for proxy in proxies:
            proxy.cleanup()
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    print(write_results(out, sizes, proxies, skipped))
    log(f"done; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
