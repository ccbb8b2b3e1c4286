"""Alembic owns the schema: upgrade, downgrade and upgrade again leave the same schema."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest
from storage_data import NOW, make_event

from socks5_analytics.storage import Repository, SchemaMissingError, StatsFilter
from socks5_analytics.storage import schema as app_schema
from socks5_analytics.storage.errors import DatabaseUnavailableError, MigrationError
from socks5_analytics.storage.migrate import downgrade, head_revision, script_location, upgrade

# Everything the migrations create, described so that two states compare equal.
SCHEMA_QUERY = """
SELECT 'column' AS kind, c.relname || '.' || a.attname || ' ' ||
       format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'constraint', conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'function', p.oid::regprocedure::text FROM pg_proc p
WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'partitioned', c.relname || ' ' || pg_get_partkeydef(c.oid) FROM pg_class c
WHERE c.relkind = 'p' AND c.relnamespace = 'public'::regnamespace
ORDER BY 1, 2
"""


async def _schema(url: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await connection.fetch(SCHEMA_QUERY)]
    finally:
        await connection.close()


async def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    before = await _schema(empty_database_url)
    await upgrade(empty_database_url)
    first = await _schema(empty_database_url)
    assert any("traffic_logs" in text for _, text in first)

    await downgrade(empty_database_url, "base")
    after_down = await _schema(empty_database_url)
    # Only alembic's own bookkeeping table may remain after a downgrade to base.
    assert [item for item in after_down if "alembic_version" not in item[1]] == before

    await upgrade(empty_database_url)
    assert await _schema(empty_database_url) == first


async def test_head_is_recorded(database_url: str) -> None:
    repository = await Repository.open(url=database_url)
    try:
        assert await repository.schema_revision() == head_revision()
    finally:
        await repository.close()


async def test_unmigrated_database_is_a_clear_error(empty_database_url: str) -> None:
    repository = await Repository.open(url=empty_database_url)
    try:
        assert await repository.schema_revision() is None
        with pytest.raises(SchemaMissingError, match="migrate"):
            await repository.ping()
    finally:
        await repository.close()


async def test_unknown_revision_is_a_migration_error(empty_database_url: str) -> None:
    with pytest.raises(MigrationError, match="nope"):
        await upgrade(empty_database_url, "nope")


async def test_unreachable_database(empty_database_url: str) -> None:
    # A port nothing listens on: bind one, read it back, close it.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DatabaseUnavailableError):
        await upgrade(f"postgresql://postgres@127.0.0.1:{port}/x")


def _migration_module(revision: str = "0001") -> ModuleType:
    path = next((script_location() / "versions").glob(f"{revision}_*.py"))
    spec = importlib.util.spec_from_file_location(f"migration_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_application_constants_match_the_migration() -> None:
    migration = _migration_module()
    assert set(migration.STATUSES) == app_schema.STATUSES
    assert set(migration.COMMANDS) == app_schema.COMMANDS
    assert set(migration.PROTOCOLS) == app_schema.PROTOCOLS
    assert set(migration.CLOSE_REASONS) == app_schema.CLOSE_REASONS
    assert migration.LATENCY_BUCKETS_MS == app_schema.LATENCY_BUCKETS_MS
    tiers = _migration_module("0002")
    assert tiers.LATENCY_BUCKETS_MS == app_schema.LATENCY_BUCKETS_MS
    assert tiers.OLD_PARTITIONED == migration.PARTITIONED
    weekly = _migration_module("0003")
    assert weekly.LATENCY_BUCKETS_MS == app_schema.LATENCY_BUCKETS_MS
    assert set(weekly.DAILY_0002) == set(tiers.PARTITIONED)
    ranks = _migration_module("0004")
    assert set(ranks.DAILY_0003) == set(weekly.DAILY_0002)
    assert set(ranks.WEEKLY_0003) == set(weekly.WEEKLY)
    assert set(ranks.WEEKLY) == app_schema.WEEKLY_TABLES
    assert set(ranks.DAILY + ranks.WEEKLY) == set(app_schema.PARTITIONED_TABLES)
    watermark = _migration_module("0006")
    assert watermark.LATENCY_COLUMNS == app_schema.LATENCY_COLUMNS
    assert set(watermark.RANKS) | {f"{table}_{tier}" for table, (_, tiers)
                                   in watermark.FAMILIES.items() for tier in tiers} == {
        name for name in app_schema.PARTITIONED_TABLES
        if name.startswith("rollup_") and name not in (
            "rollup_totals", "rollup_domains", "rollup_clients")}


def test_offline_sql_renders() -> None:
    """`alembic upgrade head --sql` works from the checkout (for DBAs who review DDL)."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(root / "alembic.ini"), "upgrade", "head",
         "--sql"],
        capture_output=True, text=True, cwd=root, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE traffic_logs" in result.stdout
    assert "PARTITION BY RANGE (started_at)" in result.stdout


async def test_0002_keeps_the_history_of_a_deployed_0001(empty_database_url: str) -> None:
    """Upgrading fills the hour and day tiers from the minute rollups already there;
    downgrading puts what is still queued into the minute rollups 0001's code reads."""
    await upgrade(empty_database_url, "0001")
    connection = await asyncpg.connect(empty_database_url, server_settings={"timezone": "UTC"})
    try:
        await connection.execute("SELECT s5a_create_day_partitions('2026-03-09', '2026-03-10')")
        for bucket, n in (("2026-03-09 23:59", 2), ("2026-03-10 00:01", 3),
                          ("2026-03-10 00:59", 5), ("2026-03-10 01:00", 7)):
            await connection.execute(
                "INSERT INTO rollup_domains (bucket, domain, registered_domain, status, "
                "connections, bytes_in, connect_count, connect_ms_sum, connect_ms_max, lat_le_5) "
                "VALUES ($1::text::timestamptz, 'a.example', 'example', 'ok', $2::bigint, "
                "$2 * 10, $2, $2, $2, $2)", bucket, n)
        await upgrade(empty_database_url)
        day = await connection.fetch(
            "SELECT bucket::text, connections, bytes_in, connect_ms_max, lat_le_5, "
            "registered_domain FROM rollup_domains_day ORDER BY 1")
        assert [tuple(row) for row in day] == [
            ("2026-03-09 00:00:00+00", 2, 20, 2.0, 2, "example"),
            ("2026-03-10 00:00:00+00", 15, 150, 7.0, 15, "example")]
        hour = await connection.fetch(
            "SELECT bucket::text, connections FROM rollup_domains_hour ORDER BY 1")
        assert [tuple(row) for row in hour] == [
            ("2026-03-09 23:00:00+00", 2), ("2026-03-10 00:00:00+00", 8),
            ("2026-03-10 01:00:00+00", 7)]

        # A delta still queued at the downgrade: its connection in one minute, bytes in the next.
        await connection.execute(
            "INSERT INTO rollup_queue (started_bucket, ended_bucket, source_ip, user_name, "
            "domain, registered_domain, status, connections, connect_ms, bytes_in, bytes_out) "
            "VALUES ('2026-03-10 00:01', '2026-03-10 00:02', '192.0.2.1', 'alice', "
            "'a.example', 'example', 'ok', 1, 3.0, 100, 10)")
        await downgrade(empty_database_url, "0001")
        minutes = await connection.fetch(
            "SELECT bucket::text, connections, bytes_in, lat_le_5 FROM rollup_domains "
            "WHERE bucket >= '2026-03-10 00:01' AND bucket < '2026-03-10 00:03' ORDER BY 1")
        assert [tuple(row) for row in minutes] == [
            ("2026-03-10 00:01:00+00", 4, 30, 4), ("2026-03-10 00:02:00+00", 0, 100, 0)]
        clients = await connection.fetch(
            "SELECT bucket::text, source_ip::text, connections, bytes_out FROM rollup_clients "
            "ORDER BY 1")
        assert [tuple(row) for row in clients] == [
            ("2026-03-10 00:01:00+00", "192.0.2.1/32", 1, 0),
            ("2026-03-10 00:02:00+00", "192.0.2.1/32", 0, 10)]
    finally:
        await connection.close()


async def test_0003_fills_the_weeks_from_the_days(empty_database_url: str) -> None:
    """Upgrading to 0003 sums a deployed 0002's daily domain rows into ISO weeks (partitions
    made for them), later days get their week's partition too; downgrading drops the tier
    and the partition function makes days only again."""
    await upgrade(empty_database_url, "0002")
    connection = await asyncpg.connect(empty_database_url, server_settings={"timezone": "UTC"})
    try:
        # 2026-03-08 is a Sunday, 2026-03-09 and 2026-03-16 Mondays.
        await connection.execute("SELECT s5a_create_day_partitions('2026-03-08', '2026-03-16')")
        for bucket, status, n in (("2026-03-08", "ok", 2), ("2026-03-09", "ok", 3),
                                  ("2026-03-15", "ok", 5), ("2026-03-15", "refused", 1),
                                  ("2026-03-16", "ok", 7)):
            await connection.execute(
                "INSERT INTO rollup_domains_day (bucket, domain, registered_domain, status, "
                "connections, bytes_in, connect_count, connect_ms_sum, connect_ms_max, lat_le_5) "
                "VALUES ($1::text::timestamptz, 'a.example', 'example', $2, $3::bigint, "
                "$3 * 10, $3, $3, $3, $3)", bucket, status, n)
        await upgrade(empty_database_url)
        weeks = await connection.fetch(
            "SELECT bucket::text, status, connections, bytes_in, connect_ms_max, lat_le_5, "
            "registered_domain, tableoid::regclass::text FROM rollup_domains_week ORDER BY 1, 2")
        assert [tuple(row) for row in weeks] == [
            ("2026-03-02 00:00:00+00", "ok", 2, 20, 2.0, 2, "example",
             "rollup_domains_week_p20260302"),
            ("2026-03-09 00:00:00+00", "ok", 8, 80, 5.0, 8, "example",
             "rollup_domains_week_p20260309"),
            ("2026-03-09 00:00:00+00", "refused", 1, 10, 1.0, 1, "example",
             "rollup_domains_week_p20260309"),
            ("2026-03-16 00:00:00+00", "ok", 7, 70, 7.0, 7, "example",
             "rollup_domains_week_p20260316")]
        created = await connection.fetch(
            "SELECT s5a_create_day_partitions('2026-03-22', '2026-03-24')")
        assert "rollup_domains_week_p20260323" in {row[0] for row in created}
        assert "rollup_domains_week_p20260316" not in {row[0] for row in created}

        await downgrade(empty_database_url, "0002")
        assert await connection.fetchval("SELECT to_regclass('rollup_domains_week')") is None
        created = await connection.fetch(
            "SELECT s5a_create_day_partitions('2026-03-30', '2026-03-30')")
        assert not any("week" in row[0] for row in created)
        assert "rollup_domains_day_p20260330" in {row[0] for row in created}
    finally:
        await connection.close()


async def test_0004_fills_the_ranking_tiers(empty_database_url: str) -> None:
    """Upgrading to 0004 sums a deployed 0003's daily and weekly domain rows over their
    statuses (partitions made for them), later days get theirs too; downgrading drops the
    ranking tiers and the partition function makes 0003's tables only again."""
    await upgrade(empty_database_url, "0003")
    connection = await asyncpg.connect(empty_database_url, server_settings={"timezone": "UTC"})
    try:
        await connection.execute("SELECT s5a_create_day_partitions('2026-03-08', '2026-03-09')")
        for bucket, status, n in (("2026-03-08", "ok", 2), ("2026-03-08", "refused", 1),
                                  ("2026-03-09", "ok", 3)):
            for table in ("rollup_domains_day", "rollup_domains_week"):
                await connection.execute(
                    f"INSERT INTO {table} AS r (bucket, domain, registered_domain, status, "
                    "connections, bytes_in, bytes_out, connect_count, connect_ms_sum, "
                    "connect_ms_max) VALUES (date_trunc($4, $1::text::timestamptz), "
                    "'a.example', 'example', $2, $3::bigint, $3 * 10, $3 * 100, $3, $3 * 1.5, "
                    "$3) ON CONFLICT (bucket, domain, status) DO UPDATE SET "
                    "connections = r.connections + excluded.connections, "
                    "bytes_in = r.bytes_in + excluded.bytes_in, "
                    "bytes_out = r.bytes_out + excluded.bytes_out, "
                    "connect_count = r.connect_count + excluded.connect_count, "
                    "connect_ms_sum = r.connect_ms_sum + excluded.connect_ms_sum",
                    bucket, status, n, "day" if table.endswith("day") else "week")
        await connection.execute(
            "INSERT INTO rollup_domains_hour (bucket, domain, registered_domain, status, "
            "connections, bytes_in) VALUES ('2026-03-08 05:00', 'a.example', 'example', 'ok', "
            "1, 10), ('2026-03-08 06:00', 'a.example', 'example', 'ok', 2, 20), "
            "('2026-03-08 11:00', 'a.example', 'example', 'refused', 4, 0)")
        await upgrade(empty_database_url, "0004")
        quarters = [tuple(row) for row in await connection.fetch(
            "SELECT bucket::text, connections, bytes_in, tableoid::regclass::text "
            "FROM rollup_domain_ranks_quarter ORDER BY 1")]
        assert quarters == [
            ("2026-03-08 00:00:00+00", 1, 10, "rollup_domain_ranks_quarter_p20260308"),
            ("2026-03-08 06:00:00+00", 6, 20, "rollup_domain_ranks_quarter_p20260308")]
        ranks = {
            tier: [tuple(row) for row in await connection.fetch(
                "SELECT bucket::text, domain, registered_domain, connections, bytes_in, "
                f"bytes_out, connect_count, connect_ms_sum, tableoid::regclass::text "
                f"FROM rollup_domain_ranks_{tier} ORDER BY 1")]
            for tier in ("day", "week")}
        assert ranks["day"] == [
            ("2026-03-08 00:00:00+00", "a.example", "example", 3, 30, 300, 3, 4.5,
             "rollup_domain_ranks_day_p20260308"),
            ("2026-03-09 00:00:00+00", "a.example", "example", 3, 30, 300, 3, 4.5,
             "rollup_domain_ranks_day_p20260309")]
        assert ranks["week"] == [  # 2026-03-08 is a Sunday, 2026-03-09 a Monday
            ("2026-03-02 00:00:00+00", "a.example", "example", 3, 30, 300, 3, 4.5,
             "rollup_domain_ranks_week_p20260302"),
            ("2026-03-09 00:00:00+00", "a.example", "example", 3, 30, 300, 3, 4.5,
             "rollup_domain_ranks_week_p20260309")]
        created = {row[0] for row in await connection.fetch(
            "SELECT s5a_create_day_partitions('2026-03-22', '2026-03-23')")}
        assert {"rollup_domain_ranks_day_p20260322", "rollup_domain_ranks_quarter_p20260323",
                "rollup_domain_ranks_week_p20260316",
                "rollup_domain_ranks_week_p20260323", "rollup_domains_week_p20260323"} <= created

        await downgrade(empty_database_url, "0003")
        for tier in ("quarter", "day", "week"):
            assert await connection.fetchval(
                f"SELECT to_regclass('rollup_domain_ranks_{tier}')") is None
        created = {row[0] for row in await connection.fetch(
            "SELECT s5a_create_day_partitions('2026-03-30', '2026-03-30')")}
        assert not any("ranks" in name for name in created)
        assert {"rollup_domains_day_p20260330", "rollup_domains_week_p20260330"} <= created
    finally:
        await connection.close()


async def test_0005_adds_bigints_as_bigints(empty_database_url: str) -> None:
    """0005's aggregate sums bigints to a bigint (null for no rows, an error on overflow);
    downgrading to 0004 removes it."""
    await upgrade(empty_database_url, "0005")
    connection = await asyncpg.connect(empty_database_url)
    try:
        row = await connection.fetchrow(
            "SELECT s5a_isum(x), pg_typeof(s5a_isum(x))::text, sum(x)::bigint "
            "FROM (VALUES (1::bigint), (NULL), (9007199254740993)) AS t(x)")
        assert tuple(row) == (9007199254740994, "bigint", 9007199254740994)
        assert await connection.fetchval(
            "SELECT s5a_isum(x) FROM (SELECT 1::bigint WHERE FALSE) AS t(x)") is None
        with pytest.raises(asyncpg.NumericValueOutOfRangeError):
            await connection.fetchval(
                "SELECT s5a_isum(x) FROM (VALUES (9223372036854775807), (1::bigint)) AS t(x)")
        await downgrade(empty_database_url, "0004")
        assert await connection.fetchval("SELECT to_regprocedure('s5a_isum(bigint)')") is None
    finally:
        await connection.close()


# Each coarse tier of the deferred families, and what its rows sum from the minute tier.
_COARSE = {
    "rollup_domains_hour": ("rollup_domains", "date_trunc('hour', bucket)", "domain, status"),
    "rollup_domains_week": ("rollup_domains", "date_trunc('week', bucket)", "domain, status"),
    "rollup_domain_ranks_quarter": (
        "rollup_domains", "date_bin('6 hours', bucket, TIMESTAMPTZ '2000-01-01 00:00+00')",
        "domain"),
    "rollup_clients_day": ("rollup_clients", "date_trunc('day', bucket)",
                           "source_ip, user_name, status"),
}


async def _coarse_differences(connection: asyncpg.Connection) -> dict[str, int]:
    """Rows in which each coarse tier differs from its minute tier summed into buckets."""
    differences = {}
    for table, (minutes, bucket, keys) in _COARSE.items():
        measures = "connections, bytes_in, bytes_out, connect_count"
        summed = ", ".join(f"sum({m})::bigint" for m in measures.split(", "))
        differences[table] = await connection.fetchval(
            f"SELECT count(*) FROM ((SELECT bucket, {keys}, {measures} FROM {table} "
            f"EXCEPT SELECT {bucket}, {keys}, {summed} FROM {minutes} GROUP BY 1, {keys}) "
            f"UNION ALL (SELECT {bucket}, {keys}, {summed} FROM {minutes} GROUP BY 1, {keys} "
            f"EXCEPT SELECT bucket, {keys}, {measures} FROM {table})) AS d")
    return differences


async def test_0006_watermark_round_trip(empty_database_url: str) -> None:
    """0006 starts the watermark after the last minute stored (minus infinity for none);
    downgrading to 0005 first rolls every minute from the watermark on into the coarse
    tiers, which then equal their minute tiers summed, as 0005's code expects; upgrading
    again answers as before."""
    await upgrade(empty_database_url, "0006")
    connection = await asyncpg.connect(empty_database_url, server_settings={"timezone": "UTC"})
    repo = await Repository.open(url=empty_database_url)
    try:
        assert await connection.fetchval(
            "SELECT rolled_until = '-infinity' FROM rollup_watermark")
        repo.roll_up_lag, repo.auto_roll_forward = None, False
        events = [make_event(started_at=NOW - timedelta(minutes=7 * n), domain=f"d{n % 3}.example",
                             registered_domain=f"d{n % 3}.example", bytes_in=100 * n)
                  for n in range(60)]  # seven hours, one every 7 minutes
        await repo.insert_batch(events=events, now=NOW)
        await repo.roll_forward()
        watermark = (NOW - timedelta(hours=3)).replace(second=0, microsecond=0)
        assert await repo.roll_up(until=watermark) == watermark
        # And some still queued: their totals too are only in the queue.
        queued = [make_event(started_at=NOW - timedelta(minutes=n), bytes_in=n)
                  for n in range(1, 11)]
        await repo.insert_batch(events=queued, now=NOW)
        assert await repo.queue_length() == 10
        flt = StatsFilter(since=NOW - timedelta(hours=8), until=NOW + timedelta(minutes=1))

        async def answers(repo: Repository) -> tuple[object, ...]:
            return (await repo.top_domains(flt=flt), await repo.top_users(flt=flt),
                    await repo.statuses(flt=flt), await repo.traffic(flt=flt, interval="1h"))

        before = await answers(repo)
        assert sum(d.connections for d in before[0].items) == 70
        assert sum(s.connections for s in before[2].items) == 70
        assert all((await _coarse_differences(connection)).values())  # minutes not rolled up
        await repo.close()

        await downgrade(empty_database_url, "0005")
        assert await connection.fetchval("SELECT to_regclass('rollup_watermark')") is None
        assert await _coarse_differences(connection) == dict.fromkeys(_COARSE, 0)
        # 0005's totals hold every stored event, queued ones too, in every tier.
        for table in ("rollup_totals", "rollup_totals_hour", "rollup_totals_day"):
            assert await connection.fetchval(f"SELECT sum(connections) FROM {table}") == 70
            assert await connection.fetchval(f"SELECT sum(bytes_in) FROM {table}") == (
                await connection.fetchval("SELECT sum(bytes_in) FROM traffic_logs"))
        assert await connection.fetchval("SELECT count(*) FROM rollup_queue") == 10

        # Upgrading again: the rows queued under 0005 are in its totals already.
        await upgrade(empty_database_url, "0006")
        last = await connection.fetchval("SELECT max(bucket) FROM rollup_totals")
        assert await connection.fetchval(
            "SELECT rolled_until FROM rollup_watermark") == last + timedelta(minutes=1)
        repo = await Repository.open(url=empty_database_url)
        assert await answers(repo) == before
        await repo.roll_forward()
        assert await repo.queue_length() == 0
        assert await answers(repo) == before
    finally:
        await repo.close()
        await connection.close()
