#!/usr/bin/env python3
"""Load the stats API with wrk at 1 M and 10 M rows: p50/p95 latency and requests/s per route.

Usage: .venv/bin/python bench/api/run.py [--rows 1000000 10000000] [--duration 5]
                                          [--connections 8] [--keep DIR] [--routes REGEX]
                                          [--generate-only]

For each size: a fresh embedded PostgreSQL (non-durable, in a temporary folder), the schema,
N connection events over the last 29.5 days written through the repository (binary COPY and
the per-minute rollups, as the collector writes them) with a realistic skew (Zipf-distributed
domains, clients and users; mostly `ok`; log-normal bytes and latencies), then
`socks5-analytics api` in its own process and `wrk` (Debian package) against every stats route
for a 24-hour and a 30-day window, one route at a time: latency with one client, then
requests/s with `--connections` clients. Everything runs on loopback.
`--keep DIR` keeps each size's database in DIR/<rows> and reuses it on the next run (migrated
to the newest schema first; the windows then end where its data ends), so that a schema or
query change can be measured on the very same 10 M rows without writing them again.
Results: a markdown table on stdout and in bench/api/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from socks5_analytics.storage import NodeReport, Repository, StoredEvent
from socks5_analytics.storage.embedded import EmbeddedPostgres
from socks5_analytics.storage.migrate import run_migration

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LUA = HERE / "report.lua"
BATCH = 50_000
SPAN = timedelta(days=29, hours=12)
T0 = time.monotonic()

ROUTES: list[tuple[str, str]] = [
    ("top-domains", "/stats/top-domains"),
    ("top-domains by bytes", "/stats/top-domains?sort=bytes"),
    ("top registered domains", "/stats/top-domains?group=registered_domain"),
    ("source-ips", "/stats/source-ips"),
    ("users", "/stats/users"),
    ("traffic", "/stats/traffic"),
    ("latency", "/stats/latency"),
    ("latency by domain", "/stats/latency?group_by=domain"),
    ("statuses", "/stats/statuses"),
    ("top-domains, one user", "/stats/top-domains?user=user00007"),
    ("logs", "/logs"),
    ("logs, one domain", "/logs?domain=d00042.example.com"),
    ("nodes", "/nodes"),
]


def log(message: str) -> None:
    elapsed = int(time.monotonic() - T0)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def zipf(n: int, s: float = 1.1) -> list[float]:
    """Cumulative Zipf weights over n ranks (for random.choices' cum_weights)."""
    return list(itertools.accumulate(1 / (rank ** s) for rank in range(1, n + 1)))


DOMAINS = [(f"d{n:05d}.example.com", f"d{n:05d}.example.com") if n % 3 else
           (f"www.d{n:05d}.example.com", f"d{n:05d}.example.com") for n in range(20_000)]
CLIENTS = [IPv4Address(int(IPv4Address("10.0.0.0")) + n * 7 + 1) for n in range(2_000)]
USERS = [f"user{n:05d}" for n in range(300)]
STATUSES = ["ok", "refused", "timeout", "denied_destination", "dns_failed", "auth_failed"]
STATUS_W = list(itertools.accumulate([930, 20, 15, 15, 15, 5]))
DOMAIN_W, CLIENT_W = zipf(len(DOMAINS)), zipf(len(CLIENTS))


def events(count: int, end: datetime, rng: random.Random) -> list[StoredEvent]:
    """`count` events spread over the SPAN before `end`."""
    span_us = int(SPAN / timedelta(microseconds=1))
    domains = rng.choices(DOMAINS, cum_weights=DOMAIN_W, k=count)
    # Each address belongs to one user (as bench/socksbench/pgdata.py has it): a client
    # machine authenticates as its own account. Independent draws would put every busy
    # address behind all 300 users, which no deployment looks like.
    clients = rng.choices(range(len(CLIENTS)), cum_weights=CLIENT_W, k=count)
    statuses = rng.choices(STATUSES, cum_weights=STATUS_W, k=count)
    made = []
    for domain, client_no, status in zip(domains, clients, statuses, strict=True):
        client, user = CLIENTS[client_no], USERS[client_no * 7 % len(USERS)]
        started = end - timedelta(microseconds=rng.randrange(span_us))
        ok = status == "ok"
        duration = rng.lognormvariate(7, 2) if ok else rng.uniform(0.1, 50)
        made.append(StoredEvent(
            event_id=uuid.uuid4(), node_id=f"node-{rng.randrange(4)}", started_at=started,
            ended_at=min(started + timedelta(milliseconds=duration), end),
            source_ip=client, source_port=rng.randrange(1024, 65536), user_name=user,
            command="connect", protocol="tcp", dest_host=domain[0], domain=domain[0],
            dest_ip=None, dest_port=443, registered_domain=domain[1], status=status,
            reply_code=0 if ok else 5, close_reason="client" if ok else "error",
            connect_ms=rng.lognormvariate(3, 1) if ok or status == "timeout" else None,
            ttfb_ms=None, duration_ms=duration,
            bytes_out=int(rng.lognormvariate(7, 1.5)) if ok else 0,
            bytes_in=int(rng.lognormvariate(10, 2)) if ok else 0,
        ))
    return made


async def fill(url: str, rows: int, end: datetime) -> None:
    rng = random.Random(rows)
    repo = await Repository.open(url=url, min_size=1, max_size=2)
    try:
        done = 0
        while done < rows:
            batch = events(min(BATCH, rows - done), end, rng)
            result = await repo.insert_batch(events=batch, now=end)
            assert result.inserted == len(batch), result
            done += len(batch)
            if done % 500_000 < BATCH:
                log(f"  {done:,} rows")
        # Readers add what is still queued, so this changes no answer; it measures the
        # steady state, where the queue holds the last moments only.
        await repo.roll_forward()
        for n in range(4):
            await repo.upsert_node(report=NodeReport(
                node_id=f"node-{n}", version="0.1.0", started_at=end - SPAN, last_seen=end,
                policy_version="bench", active_connections=100 * n))
    finally:
        await repo.close()


async def vacuum(url: str) -> None:
    """Fresh statistics and visibility maps, as autovacuum would have them by now."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()


def start_api(url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("S5A_")}
    env["S5A_LOG__FORMAT"] = "json"
    command = [sys.executable, "-m", "socks5_analytics", "api", "--database-url", url,
               "--listen", "127.0.0.1:0"]
    process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    assert process.stderr is not None
    for raw in process.stderr:
        record = json.loads(raw)
        if record.get("message") == "api listening":
            return process, f"http://{record['address']}"
    raise RuntimeError("the API did not start")


def wrk(url: str, duration: int, connections: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s",
         "-s", str(LUA), url],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def bench(rows: int, duration: int, connections: int, keep: Path | None = None,
          routes: str = "", generate_only: bool = False) -> list[dict[str, Any]]:
    if keep is None:
        folder = Path(tempfile.mkdtemp(prefix="s5a-bench-api-"))
    else:
        folder = keep / str(rows)
        folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    server = EmbeddedPostgres(folder / "pg", durable=False)
    stamp_file = folder / "end.txt"
    results: list[dict[str, Any]] = []
    try:
        url = server.start()
        run_migration(url)
        if stamp_file.is_file():
            end = datetime.fromisoformat(stamp_file.read_text().strip())
            log(f"{rows:,} rows: reusing {folder} (data up to {end:%Y-%m-%d %H:%M} UTC)")
            now = end
            asyncio.run(vacuum(url))  # the migration may have filled new tables
        else:
            end = datetime.now(UTC)
            log(f"{rows:,} rows: writing")
            started = time.monotonic()
            asyncio.run(fill(url, rows, end))
            log(f"{rows:,} rows written in {time.monotonic() - started:.0f} s; vacuum analyze")
            asyncio.run(vacuum(url))
            if keep is not None:
                stamp_file.write_text(end.isoformat())
            now = datetime.now(UTC)
        if generate_only:
            return results
        api, base = start_api(url, folder)
        try:
            for window_name, span in (("24 h", timedelta(hours=24)), ("30 d", SPAN)):
                since = (now - span).strftime("%Y-%m-%dT%H:%M:%SZ")
                until = (now + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
                for name, path in ROUTES:
                    if routes and not re.search(routes, name):
                        continue
                    sep = "&" if "?" in path else "?"
                    window = f"from={since}&to={until}"
                    url_ = f"{base}{path}{sep}{window}" if path != "/nodes" else base + path
                    # latency with one client at a time, throughput with `connections`
                    single = wrk(url_, duration, 1)
                    loaded = wrk(url_, duration, connections)
                    result = {**single, "rps": loaded["rps"], "loaded_p95_us": loaded["p95_us"],
                              "non_2xx": single["non_2xx"] + loaded["non_2xx"],
                              "socket_errors": single["socket_errors"]
                              + loaded["socket_errors"],
                              "load": os.getloadavg()[0]}
                    result.update(rows=rows, window=window_name, route=name, path=path)
                    results.append(result)
                    log(f"  {window_name} {name}: p50 {result['p50_us'] / 1000:.1f} ms, "
                        f"p95 {result['p95_us'] / 1000:.1f} ms (1 client); "
                        f"{result['rps']:.0f} req/s, p95 {loaded['p95_us'] / 1000:.1f} ms "
                        f"({connections} clients), load {result['load']:.1f}"
                        + (f", {result['non_2xx']} non-2xx" if result["non_2xx"] else ""))
        finally:
            api.terminate()
            api.wait(30)
    finally:
        server.stop()
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| rows | window | route | p50 ms | p95 ms | p99 ms | req/s (loaded) "
             "| p95 ms (loaded) | errors | load avg |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['window']} | `{r['path']}` | {r['p50_us'] / 1000:.1f} "
            f"| {r['p95_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} | {r['rps']:.0f} "
            f"| {r['loaded_p95_us'] / 1000:.1f} | {r['non_2xx'] + r['socket_errors']} "
            f"| {r.get('load', float('nan')):.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk per route")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep (or reuse) the databases in this folder")
    parser.add_argument("--routes", default="", help="only the routes whose name matches")
    parser.add_argument("--generate-only", action="store_true", help="write the data, no wrk")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    for rows in args.rows:
        results += bench(rows, args.duration, args.connections, args.keep, args.routes,
                         args.generate_only)
    if args.generate_only:
        return 0
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    meta = {"date": stamp, "cpus": os.cpu_count(), "duration_s": args.duration,
            "connections": args.connections, "load": os.getloadavg()}
    (RESULTS / f"api-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                          indent=1))
    text = table(results)
    (RESULTS / f"api-{stamp}.md").write_text(f"{json.dumps(meta)}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
