#!/usr/bin/env python3
"""The repository's batch insert against raw binary COPY, and the stats queries at 1 M rows.

Usage: .venv/bin/python bench/storage.py [--runs N] [--quick] [--rows N] [--skip-stats]
                                         [--skip-inserts] [--unchecked]

Part 1, inserts (issue 3's target: insert_batch >= 60 % of raw COPY at the same batch size).
One throwaway embedded PostgreSQL (non-durable: fsync, synchronous_commit and
full_page_writes off), migrated. For each run and each batch size (1,000 and 5,000): fresh
generated events (bench/socksbench/pgdata.py: Zipf domains, clients, users; 93 % ok), then

  - `Repository.insert_batch` (rows as the collector hands them over, `checked` by its
    normalizer; `--unchecked`: the repository's row checks too; binary COPY into the
    staging table, INSERT into traffic_logs, the rollup queue from its RETURNING), one
    call per batch, with the repository's background roll-forward of the queue into the
    rollups' minute tiers, and its roll-up of the coarse tiers 5 minutes behind its clock,
    on a second pooled connection, as in a collector; timed until the queue is empty
    again (and, separately, until the last insert_batch returned: the acknowledgement).
    The passes are a live stream: each pass's events close in the minute before its
    clock, 6 minutes after the previous pass's, so each pass rolls up the pass before it,
    as a collector rolls each minute up 5 minutes later,
  - the same serially on one connection, other fresh rows: insert_batch without the
    background roll-forward, and a roll-forward after every 10,000 rows and at the end
    (all the work, none of it overlapped), and
  - raw: asyncpg `copy_records_to_table` of the same rows, pre-built as tuples, into a bare
    copy of traffic_logs (same columns, checks, primary key and three indexes, partitioned
    by day alike; no dedupe, no rollups), one transaction per batch, one connection,

in an order rotated from run to run; then the same batches again
through insert_batch (every row a duplicate: the cost of a retried batch). Rows/s medians and
insert_batch / raw ratios.

Part 2, stats queries: N rows (default 1,000,000) over the last 30 days, generated in SQL
(generate_series) with a skew (a few domains, clients and users take most of the traffic),
written day by day through the repository's own SQL (staging table, INSERT ... ON CONFLICT,
rollups, roll-forward of the queue; the roll-up to 5 minutes before now), VACUUM ANALYZE,
then every stats query of the
repository over a 24-hour and a 30-day window: median of several timed calls after one warm-up call.

Progress on stderr; markdown on stdout and in bench/results/storage-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from socksbench import pgdata, report

from socks5_analytics.storage import Repository, StatsFilter, _sql
from socks5_analytics.storage.repository import ROLL_UP_LAG

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.monotonic()
BATCH_SIZES = (1_000, 5_000)
SERIAL_EVERY = 10_000


def log(message: str) -> None:
    pgdata.log_to_stderr(T0, message)


# -- part 1: inserts ---------------------------------------------------------------------------


async def insert_runs(url: str, pg_pid: int | None, runs: int, rows: int,
                      out: dict[str, Any], unchecked: bool = False) -> None:
    samples: dict[str, list[float]] = out.setdefault("samples", {})
    loads: list[dict[str, float]] = out.setdefault("loads", [])
    rng = random.Random(3)
    # As the collector hands them over: rows its normalizer built, which the repository need
    # not check again (`--unchecked`: as an untrusted caller's, every row checked).
    checked: dict[str, Any] = {} if unchecked else {"checked": True}
    # Two connections: insert_batch's, and the background roll-forward's.
    repo = await Repository.open(url=url, min_size=2, max_size=2)
    # One connection, no background work: inserts, then a roll-forward per SERIAL_EVERY rows.
    serial = await Repository.open(url=url, min_size=1, max_size=1)
    serial.auto_roll_forward = False
    # A live stream, pass after pass: each pass's events close in the minute before its
    # own time now (the repositories' clock), 6 minutes after the last pass's. A roll-forward
    # rolls the coarse tiers up to ROLL_UP_LAG (5 minutes) before now, as a collector's
    # does: so each pass also rolls up the pass before it (a pass of the same size, on the
    # roll-forward's connection, alongside its inserts), as a live collector rolls each
    # minute up five minutes later. The work per pass is the whole work per event; only
    # the roll-up runs one pass late, as it does live.
    spacing = ROLL_UP_LAG + timedelta(minutes=1)
    start = (datetime.now(UTC).replace(second=0, microsecond=0)
             - spacing * (3 + runs * len(BATCH_SIZES) * 2))
    passes = iter(range(1, 1_000))

    def pass_events(count: int) -> tuple[list[Any], datetime]:
        end = start + spacing * next(passes)
        return pgdata.events(count, rng, end=end), end

    def live_at(repository: Repository, end: datetime) -> None:
        repository.clock = lambda: end

    raw = await asyncpg.connect(url)
    try:
        await repo.ensure_partitions()
        today = datetime.now(UTC).date()
        await pgdata.create_raw_table(raw, [today - timedelta(days=1), today])
        # warm-up: plans, caches, the staging table, and a pass for the first to roll up
        warm, warm_end = pass_events(rows)
        live_at(repo, warm_end)
        for batch in pgdata.chunks(warm, BATCH_SIZES[-1]):
            await repo.insert_batch(events=batch)
        await repo.roll_forward()
        await pgdata.raw_copy(raw, [pgdata.records(warm[:2_000])])
        for run in range(runs):
            for size in BATCH_SIZES:
                # Rotated from run to run, so drift of the machine hits each alike.
                order = ["raw", "repo", "serial"]
                order = order[run % 3:] + order[:run % 3]
                # The events of the pass that runs first are the earlier ones.
                if order.index("repo") < order.index("serial"):
                    made, made_end = pass_events(rows)
                    serial_made, serial_end = pass_events(rows)
                else:
                    serial_made, serial_end = pass_events(rows)
                    made, made_end = pass_events(rows)
                batches = pgdata.chunks(made, size)
                serial_batches = pgdata.chunks(serial_made, size)
                tuples = [pgdata.records(batch) for batch in batches]
                meter = pgdata.LoadMeter([pg_pid])

                acked: list[float] = []

                async def through_repo(batches: list[Any] = batches,
                                       acked: list[float] = acked,
                                       made_end: datetime = made_end) -> float:
                    live_at(repo, made_end)
                    started = time.perf_counter()
                    for batch in batches:
                        result = await repo.insert_batch(events=batch, **checked)
                        assert result.inserted == len(batch), result
                    acked.append(time.perf_counter() - started)
                    # Honest: the domain and client rollups are up to date only now.
                    await repo.roll_forward()
                    assert await repo.queue_length() == 0
                    return time.perf_counter() - started

                async def through_serial(batches: list[Any] = serial_batches,
                                         serial_end: datetime = serial_end) -> float:
                    live_at(serial, serial_end)
                    started = time.perf_counter()
                    queued = 0
                    for batch in batches:
                        result = await serial.insert_batch(events=batch, **checked)
                        assert result.inserted == len(batch), result
                        queued += len(batch)
                        if queued >= SERIAL_EVERY:
                            await serial.roll_forward()
                            queued = 0
                    await serial.roll_forward()
                    return time.perf_counter() - started

                timed: dict[str, float] = {}
                for name in order:
                    if name == "raw":
                        timed[name] = await pgdata.raw_copy(raw, tuples)
                    elif name == "repo":
                        timed[name] = await through_repo()
                    else:
                        timed[name] = await through_serial()
                raw_s, repo_s, serial_s, ack_s = (timed["raw"], timed["repo"], timed["serial"],
                                                  acked[0])
                started = time.perf_counter()
                for batch in batches:
                    result = await repo.insert_batch(events=batch)
                    assert result.inserted == 0 and result.duplicates == len(batch), result
                dup_s = time.perf_counter() - started
                load = meter.stop()
                loads.append(load)
                figures = {f"repo_{size}": rows / repo_s, f"raw_{size}": rows / raw_s,
                           f"ratio_{size}": raw_s / repo_s, f"dup_{size}": rows / dup_s,
                           f"ack_{size}": rows / ack_s, f"ack_ratio_{size}": raw_s / ack_s,
                           f"serial_{size}": rows / serial_s,
                           f"serial_ratio_{size}": raw_s / serial_s,
                           f"other_cores_{size}": load["other_cores"]}
                for key, value in figures.items():
                    samples.setdefault(key, []).append(value)
                log(f"run {run + 1}/{runs} batch {size}: insert_batch "
                    f"{rows / repo_s:,.0f} rows/s, raw COPY {rows / raw_s:,.0f} rows/s, "
                    f"ratio {raw_s / repo_s:.2f} (acked: {raw_s / ack_s:.2f}, "
                    f"serial: {raw_s / serial_s:.2f}); "
                    f"duplicates {rows / dup_s:,.0f} rows/s; "
                    f"other load {load['other_cores']:.2f} cores")
    finally:
        await raw.close()
        await repo.close()
        await serial.close()


# -- part 2: stats queries ---------------------------------------------------------------------

# One day's rows, generated in SQL with a skew: rank = floor(n * u^k) puts most rows on the
# first ranks (u^5 over 20,000 domains: the top 1 % of domains get about 40 % of the rows).
# Each address belongs to one of 300 users, as in socksbench/pgdata.py (`--independent-users`:
# a user drawn per connection, u^3, as the first measurements had it).
FILL_DAY = f"""
INSERT INTO {_sql.STAGE_TABLE} ({", ".join(_sql.EVENT_COLUMNS)})
SELECT gen_random_uuid(), 'node-' || (r1 * 4)::int % 4, st,
       st + make_interval(secs => dur / 1000), src, 1024 + (r2 * 60000)::int, usr,
       'connect', 'tcp', dom, dom, NULL, 443, dom, status,
       CASE WHEN status = 'ok' THEN 0 ELSE 5 END,
       CASE WHEN status = 'ok' THEN 'client' ELSE 'error' END,
       CASE WHEN status IN ('ok', 'timeout') THEN -ln(1 - r3) * 30 END, NULL, dur,
       CASE WHEN status = 'ok' THEN (-ln(1 - r4) * 2000)::bigint ELSE 0 END,
       CASE WHEN status = 'ok' THEN (-ln(1 - r5) * 50000)::bigint ELSE 0 END, NULL
FROM (
    SELECT $1::timestamptz - (random() * interval '1 day') AS st,
           -ln(1 - random()) * 3000 AS dur,
           ('10.0.' || (c / 250) || '.' || (c % 250 + 1))::inet AS src,
           'user' || lpad((c * 7 % 300)::text, 5, '0') AS usr,
           'd' || lpad(d::text, 5, '0') || '.example.com' AS dom,
           CASE WHEN s < 0.93 THEN 'ok' WHEN s < 0.95 THEN 'refused'
                WHEN s < 0.965 THEN 'timeout' WHEN s < 0.98 THEN 'denied_destination'
                ELSE 'dns_failed' END AS status,
           r1, r2, r3, r4, r5
    FROM (
        SELECT floor(2000 * power(random(), 4))::int AS c,
               floor(20000 * power(random(), 5))::int AS d,
               random() AS s, random() AS r1, random() AS r2, random() AS r3,
               random() AS r4, random() AS r5, g
        FROM generate_series(1, $2::int) AS g
    ) AS raw
) AS shaped
"""


FILL_DAY_INDEPENDENT = FILL_DAY.replace(
    "(c * 7 % 300)::text", "floor(300 * power(random(), 3))::int::text")


async def fill(url: str, rows: int, now: datetime, days: int = 30,
               independent_users: bool = False) -> float:
    started = time.perf_counter()
    connection = await asyncpg.connect(url, server_settings={"timezone": "UTC"})
    try:
        first = (now - timedelta(days=days + 1)).date()
        await connection.fetch(_sql.CREATE_PARTITIONS, first, now.date() + timedelta(days=3))
        await connection.execute(_sql.CREATE_STAGE)
        per_day = rows // days
        for day in range(days):
            async with connection.transaction():
                await connection.execute(FILL_DAY_INDEPENDENT if independent_users
                                         else FILL_DAY, now - timedelta(days=day), per_day)
                inserted = await connection.fetchval(_sql.INSERT_EVENTS)
            assert inserted == per_day, inserted
            while await connection.fetchval(_sql.ROLL_FORWARD, 200_000) == 200_000:
                pass
            if day % 10 == 9:
                log(f"  {per_day * (day + 1):,} rows")
        # The coarse tiers up to where a collector's roll-up would have them now.
        await connection.fetchval(
            _sql.ROLL_UP, now.replace(second=0, microsecond=0) - ROLL_UP_LAG)
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()
    return time.perf_counter() - started


def stats_calls(repo: Repository, flt: StatsFilter) -> list[tuple[str, Any]]:
    return [
        ("top_domains (by connections)", lambda: repo.top_domains(flt=flt)),
        ("top_domains (by bytes)", lambda: repo.top_domains(flt=flt, sort="bytes")),
        ("top_domains (registered domain)",
         lambda: repo.top_domains(flt=flt, group="registered_domain")),
        ("top_source_ips", lambda: repo.top_source_ips(flt=flt)),
        ("top_users", lambda: repo.top_users(flt=flt)),
        ("statuses", lambda: repo.statuses(flt=flt)),
        ("traffic (1 h points)", lambda: repo.traffic(flt=flt, interval="1h")),
        ("latency", lambda: repo.latency(flt=flt)),
        ("latency_by_domain", lambda: repo.latency_by_domain(flt=flt)),
        ("count_events", lambda: repo.count_events(flt=flt)),
        ("logs (first page, with total)", lambda: repo.logs(flt=flt, limit=50)),
    ]


async def time_stats(url: str, now: datetime, repeats: int, cap_s: float) -> list[dict[str, Any]]:
    results = []
    repo = await Repository.open(url=url, min_size=1, max_size=1, statement_timeout=120)
    try:
        for window, span in (("24 h", timedelta(hours=24)), ("30 d", timedelta(days=30))):
            flt = StatsFilter(since=now - span, until=now)
            for name, call in stats_calls(repo, flt):
                await call()  # warm-up
                times = []
                deadline = time.monotonic() + cap_s
                for _ in range(repeats):
                    started = time.perf_counter()
                    await call()
                    times.append((time.perf_counter() - started) * 1000)
                    if time.monotonic() > deadline:
                        break
                results.append({"window": window, "query": name, "ms": times,
                                "median_ms": statistics.median(times)})
                log(f"  {window} {name}: {statistics.median(times):.1f} ms "
                    f"(median of {len(times)})")
    finally:
        await repo.close()
    return results


# -- report ------------------------------------------------------------------------------------


def insert_table(samples: dict[str, list[float]]) -> str:
    med = {k: statistics.median(v) for k, v in samples.items()}
    lines = ["| Batch size | insert_batch rows/s (rollups up to date) | raw COPY rows/s "
             "| insert_batch / raw | target | serial, 1 connection: rows/s (ratio) "
             "| acknowledged rows/s (ratio) "
             "| resent batch (all duplicates) rows/s | other CPU load (cores) |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for size in BATCH_SIZES:
        ratio = med[f"ratio_{size}"]
        lines.append(
            f"| {size:,} | {report.fmt(med[f'repo_{size}'])} | {report.fmt(med[f'raw_{size}'])} "
            f"| {ratio:.2f} (runs: {', '.join(f'{r:.2f}' for r in samples[f'ratio_{size}'])}) "
            f"| {'met' if ratio >= 0.6 else 'missed'} (>= 0.60) "
            f"| {report.fmt(med[f'serial_{size}'])} ({med[f'serial_ratio_{size}']:.2f}) "
            f"| {report.fmt(med[f'ack_{size}'])} ({med[f'ack_ratio_{size}']:.2f}) "
            f"| {report.fmt(med[f'dup_{size}'])} | {med[f'other_cores_{size}']:.2f} |")
    return "\n".join(lines)


def stats_table(results: list[dict[str, Any]]) -> str:
    by_query: dict[str, dict[str, float]] = {}
    for r in results:
        by_query.setdefault(r["query"], {})[r["window"]] = r["median_ms"]
    lines = ["| Query | 24 h window, ms | 30 d window, ms |", "|---|---:|---:|"]
    for query, windows in by_query.items():
        lines.append(f"| `{query}` | {windows.get('24 h', 0):.1f} | {windows.get('30 d', 0):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="insert runs (default 5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run")
    parser.add_argument("--insert-rows", type=int,
                        help="rows per insert measurement (default 60,000, quick 10,000)")
    parser.add_argument("--rows", type=int,
                        help="rows for the stats queries (default 1,000,000, quick 100,000)")
    parser.add_argument("--skip-stats", action="store_true", help="inserts only")
    parser.add_argument("--skip-inserts", action="store_true", help="stats queries only")
    parser.add_argument("--independent-users", action="store_true",
                        help="stats data: a user drawn per connection, not one per address")
    parser.add_argument("--unchecked", action="store_true",
                        help="inserts: the repository checks every row (an untrusted caller)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = args.runs or (1 if args.quick else 5)
    insert_rows = args.insert_rows or (10_000 if args.quick else 60_000)
    stats_rows = args.rows or (100_000 if args.quick else 1_000_000)
    out: dict[str, Any] = {}
    load0 = os.getloadavg()
    if not args.skip_inserts:
        with pgdata.embedded_postgres() as server:
            pg_pid = pgdata.postmaster_pid(server)
            log(f"PostgreSQL at {server.dsn} (non-durable); inserts: {runs} run(s) of "
                f"{insert_rows:,} rows per batch size")
            asyncio.run(insert_runs(server.url_for("postgres"), pg_pid, runs, insert_rows,
                                    out, unchecked=args.unchecked))
    stats: list[dict[str, Any]] = []
    fill_s = None
    if not args.skip_stats:
        with pgdata.embedded_postgres() as server:
            now = datetime.now(UTC)
            log(f"stats: generating {stats_rows:,} rows over 30 days")
            fill_s = asyncio.run(fill(server.dsn, stats_rows, now,
                                      independent_users=args.independent_users))
            log(f"stats: {stats_rows:,} rows written and analyzed in {fill_s:.0f} s")
            stats = asyncio.run(time_stats(server.dsn, now, 3 if args.quick else 5, 10.0))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": report.machine_info(),
        "commit": report.git_state(),
        "runs": runs,
        "insert_rows": insert_rows,
        "stats_rows": stats_rows,
        "stats_fill_s": fill_s,
        "independent_users": args.independent_users,
        "unchecked": args.unchecked,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "elapsed_s": round(time.monotonic() - T0, 1),
    }
    md = (f"Measured {meta['date']} on {meta['machine']['cpu']}, {meta['machine']['cores']} "
          f"cores, commit {meta['commit']}; embedded PostgreSQL, non-durable; {runs} run(s) of "
          f"{insert_rows:,} rows per batch size, medians; load average "
          f"{load0[0]:.2f} before, {meta['loadavg_after'][0]:.2f} after.\n\n"
          + (insert_table(out["samples"]) + "\n" if "samples" in out else ""))
    if stats:
        md += (f"\nStats queries at {stats_rows:,} rows over 30 days (written in "
               f"{fill_s:.0f} s), median ms:\n\n" + stats_table(stats) + "\n")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"meta": meta, "inserts": out, "stats": stats}
    (RESULTS / f"storage-{stamp}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"storage-{stamp}.md").write_text(md)
    print(md)
    log(f"done in {meta['elapsed_s']} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
