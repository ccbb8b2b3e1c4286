"""Every stats query is served by a rollup or an index: EXPLAIN shows no Seq Scan on raw rows.

The table is filled with 30 days of skewed traffic (a few domains, sources and users take
most of it) by generate_series inside PostgreSQL, the rollups are computed from it with the
repository's own upsert, and the statistics are gathered. Each repository call is then
made with the queries it sends recorded, and each recorded query is EXPLAINed with its
arguments.

Not checked: the `node` filter combined with a domain, source or user breakdown. No rollup
keys those by node and there is no node index, so that query reads the window's raw rows
(a documented trade-off: per-node views are served by the totals rollup).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from dbtools import run_in_thread

from socks5_analytics.storage import Repository, StatsFilter
from socks5_analytics.storage import _sql as storage_sql
from socks5_analytics.storage.embedded import EmbeddedPostgres
from socks5_analytics.storage.repository import ROLL_UP_LAG

ROWS = 300_000
DAYS = 30
# The last noon (UTC): the 30-day window's first daily partition then holds half a day of
# rows whenever the suite runs. (Run just after midnight, it held a minute's, and a
# sequential scan of those few rows was the planner's right choice.)
_NOON = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
NOW = _NOON if datetime.now(UTC) >= _NOON else _NOON - timedelta(days=1)

GENERATE = f"""
INSERT INTO traffic_logs (event_id, node_id, started_at, ended_at, source_ip, source_port,
    user_name, command, protocol, dest_host, domain, dest_ip, dest_port, registered_domain,
    status, reply_code, close_reason, connect_ms, ttfb_ms, duration_ms, bytes_out, bytes_in)
SELECT gen_random_uuid(), 'node-' || (g % 4), t, t + interval '2 seconds',
       ('10.' || (s / 250) || '.' || (s % 250) || '.1')::inet, 40000 + g % 20000,
       CASE WHEN u = 0 THEN '' ELSE 'user' || u END, 'connect', 'tcp',
       coalesce(domain, '198.51.100.7'), domain, '198.51.100.7', 443, domain,
       CASE WHEN g % 20 = 0 THEN 'refused' ELSE 'ok' END, 0, 'client',
       random() * 300, 5, 2000, (random() * 1e4)::bigint, (random() * 1e6)::bigint
FROM (
    SELECT g, $1::timestamptz - g * interval '{DAYS * 86400 / ROWS} seconds' AS t,
           CASE WHEN g % 10 = 0 THEN NULL
                ELSE 'd' || floor(power(random(), 4) * 2000)::int || '.example' END AS domain,
           floor(power(random(), 3) * 5000)::int AS s,
           floor(power(random(), 2) * 200)::int AS u
    FROM generate_series(1, {ROWS}) AS g
) AS generated
"""

# The minute tiers only (the watermark starts at minus infinity); the roll-up then fills
# the coarse tiers up to 5 minutes before NOW, as a collector's would have them.
_TIERS = ",\n".join([
    *(storage_sql.with_tiers(rollup, "facts", coarse_before_watermark=True)
      for rollup in storage_sql.ROLLUPS),
    storage_sql.with_domain_ranks("rollup_domains_late"),
])
ROLLUPS_FROM_RAW = f"""
WITH facts AS (
    SELECT date_trunc('minute', started_at) AS bucket, node_id, source_ip, user_name, domain,
           registered_domain, status, 1 AS connections, bytes_in, bytes_out, connect_ms
    FROM traffic_logs
),
{_TIERS}
SELECT 1
"""


@pytest.fixture(scope="module")
def big_database(pg_server: EmbeddedPostgres, template_url: str) -> Iterator[str]:
    """A database with 30 days of generated traffic and its rollups, analyzed."""
    name = "t_explain"

    async def build() -> None:
        admin = await asyncpg.connect(pg_server.dsn)
        try:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE s5a_template")
        finally:
            await admin.close()
        connection = await asyncpg.connect(pg_server.url_for(name),
                                           server_settings={"timezone": "UTC"})
        try:
            first = (NOW - timedelta(days=DAYS + 1)).date()
            await connection.execute("SELECT s5a_create_day_partitions($1, $2)", first,
                                     NOW.date() + timedelta(days=1))
            await connection.execute(GENERATE, NOW)
            await connection.execute(ROLLUPS_FROM_RAW)
            await connection.fetchval(storage_sql.ROLL_UP, NOW - ROLL_UP_LAG)
            await connection.execute("ANALYZE")
        finally:
            await connection.close()

    async def drop() -> None:
        admin = await asyncpg.connect(pg_server.dsn)
        try:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        finally:
            await admin.close()

    run_in_thread(build)
    yield pg_server.url_for(name)
    run_in_thread(drop)


@pytest_asyncio.fixture
async def recorded(big_database: str) -> AsyncIterator[tuple[Repository, list[Any]]]:
    """A repository whose connections record every query they run."""
    queries: list[Any] = []

    async def record(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(queries.append)

    pool = await asyncpg.create_pool(big_database, min_size=1, max_size=2, init=record,
                                     server_settings={"timezone": "UTC"})
    repository = Repository(pool)
    try:
        yield repository, queries
    finally:
        await repository.close()


def _scans(plan: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield plan["Node Type"], plan.get("Relation Name", "")
    for child in plan.get("Plans", []):
        yield from _scans(child)


DAY = StatsFilter(since=NOW - timedelta(hours=24), until=NOW)
# Filter values of realistic selectivity: one user, source and domain among many.
USER, SOURCE, DOMAIN = "user150", IPv4Address("10.8.100.1"), "d1500.example"

Call = Callable[[Repository], Awaitable[Any]]
CALLS: dict[str, Call] = {
    "top-domains": lambda r: r.top_domains(flt=DAY),
    "top-domains by bytes, registered": lambda r: r.top_domains(
        flt=DAY, sort="bytes", group="registered_domain"),
    "top-domains status=ok": lambda r: r.top_domains(flt=replace(DAY, status="ok")),
    "top-domains domain=": lambda r: r.top_domains(flt=replace(DAY, domain=DOMAIN)),
    "top-domains user=": lambda r: r.top_domains(flt=replace(DAY, user=USER)),
    "top-domains source_ip=": lambda r: r.top_domains(flt=replace(DAY, source_ip=SOURCE)),
    "source-ips": lambda r: r.top_source_ips(flt=DAY),
    "source-ips user=": lambda r: r.top_source_ips(flt=replace(DAY, user=USER)),
    "source-ips domain=": lambda r: r.top_source_ips(flt=replace(DAY, domain=DOMAIN)),
    "users": lambda r: r.top_users(flt=DAY, sort="bytes"),
    "users domain=": lambda r: r.top_users(flt=replace(DAY, domain=DOMAIN)),
    "statuses": lambda r: r.statuses(flt=DAY),
    "statuses node=": lambda r: r.statuses(flt=replace(DAY, node="node-1")),
    "statuses user=": lambda r: r.statuses(flt=replace(DAY, user=USER)),
    "traffic 1m": lambda r: r.traffic(flt=DAY, interval="1m"),
    "traffic 1h node=": lambda r: r.traffic(flt=replace(DAY, node="node-1"), interval="1h"),
    "traffic 1d, 30 days": lambda r: r.traffic(
        flt=replace(DAY, since=NOW - timedelta(days=DAYS)), interval="1d"),
    "traffic 5m domain=": lambda r: r.traffic(flt=replace(DAY, domain=DOMAIN), interval="5m"),
    "traffic 5m user=, domain=": lambda r: r.traffic(
        flt=replace(DAY, user=USER, domain=DOMAIN), interval="5m"),
    "latency": lambda r: r.latency(flt=DAY),
    "latency source_ip=": lambda r: r.latency(flt=replace(DAY, source_ip=SOURCE)),
    "latency by domain": lambda r: r.latency_by_domain(flt=DAY),
    "logs": lambda r: r.logs(flt=DAY),
    "logs status=refused": lambda r: r.logs(flt=replace(DAY, status="refused")),
    "logs user=": lambda r: r.logs(flt=replace(DAY, user=USER)),
    "logs source_ip=": lambda r: r.logs(flt=replace(DAY, source_ip=SOURCE)),
    "logs domain=": lambda r: r.logs(flt=replace(DAY, domain=DOMAIN)),
    "logs user=, domain=, 30 days": lambda r: r.logs(
        flt=replace(DAY, since=NOW - timedelta(days=DAYS), user=USER, domain=DOMAIN)),
}
# Unfiltered breakdowns must not touch the raw rows at all: the rollups answer them.
ROLLUP_ONLY = {"top-domains", "top-domains by bytes, registered", "top-domains status=ok",
               "top-domains domain=", "source-ips", "source-ips user=", "users", "statuses",
               "statuses node=", "statuses user=", "traffic 1m", "traffic 1h node=",
               "traffic 1d, 30 days", "traffic 5m domain=", "latency",
               "latency source_ip=", "latency by domain"}


@pytest.mark.parametrize("name", list(CALLS))
async def test_no_seq_scan_on_raw_rows(name: str, recorded: tuple[Repository, list[Any]],
                                       big_database: str) -> None:
    repository, queries = recorded
    result = await CALLS[name](repository)
    assert result is not None
    assert queries, "the call ran no query"
    connection = await asyncpg.connect(big_database, server_settings={"timezone": "UTC"})
    try:
        for logged in queries:
            if not any(table in logged.query for table in ("traffic_logs", "rollup_")):
                continue  # the pool's own housekeeping
            plan_text = await connection.fetchval(
                f"EXPLAIN (FORMAT JSON) {logged.query}", *logged.args)
            plan = json.loads(plan_text)[0]["Plan"]
            scans = list(_scans(plan))
            raw_seq = [relation for node, relation in scans
                       if node == "Seq Scan" and relation.startswith("traffic_logs")]
            assert not raw_seq, f"{name}: seq scan on {raw_seq}\n{logged.query}"
            if name in ROLLUP_ONLY:
                raw = [relation for _, relation in scans if relation.startswith("traffic_logs")]
                assert not raw, f"{name}: read raw rows {raw} instead of a rollup"
    finally:
        await connection.close()


async def test_the_table_is_realistically_sized(big_database: str) -> None:
    connection = await asyncpg.connect(big_database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM traffic_logs") == ROWS
        top_share = await connection.fetchval(
            "SELECT max(n)::float / sum(n) FROM (SELECT count(*) AS n FROM traffic_logs "
            "WHERE domain IS NOT NULL GROUP BY domain) AS per_domain")
        assert top_share > 0.05  # skewed: the top domain alone takes a good share
        # Rolled up as a collector would have it: days up to 5 minutes ago, minutes since.
        watermark = await connection.fetchval("SELECT rolled_until FROM rollup_watermark")
        assert watermark == NOW - ROLL_UP_LAG
        assert await connection.fetchval(
            "SELECT (SELECT sum(connections) FROM rollup_totals_day) + (SELECT sum(connections) "
            "FROM rollup_totals WHERE bucket >= $1)", watermark) == ROWS
    finally:
        await connection.close()
