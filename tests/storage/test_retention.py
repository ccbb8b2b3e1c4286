"""Retention: whole expired days are detached and dropped, every other day is untouched."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
from storage_data import NOW, make_event, make_interim

from socks5_analytics.storage import NodeReport, Repository, StatsFilter
from socks5_analytics.storage.schema import PARTITIONED_TABLES, WEEKLY_TABLES

DAILY_TABLES = tuple(table for table in PARTITIONED_TABLES if table not in WEEKLY_TABLES)

PARTITIONS_SQL = """
SELECT child.relname FROM pg_inherits i
JOIN pg_class parent ON parent.oid = i.inhparent JOIN pg_class child ON child.oid = i.inhrelid
WHERE parent.relname = $1 ORDER BY 1
"""


async def _partitions(db: asyncpg.Connection, table: str) -> list[str]:
    return [row[0] for row in await db.fetch(PARTITIONS_SQL, table)]


async def test_retention_drops_exactly_the_expired_days(
    database_url: str, db: asyncpg.Connection
) -> None:
    repo = await Repository.open(url=database_url, retention_days=2, partitions_ahead_days=1)
    try:
        # Five days of traffic, each written on its own day (before it could expire).
        per_day = {}
        for back in range(5):
            moment = NOW - timedelta(days=back)
            events = [make_event(started_at=moment - timedelta(minutes=n)) for n in range(back + 3)]
            await repo.insert_batch(events=events, now=moment)
            per_day[moment.date()] = len(events)
        # An open connection last heard of on the oldest day, and a node gone as long.
        old = make_event(started_at=NOW - timedelta(days=4, hours=1))
        await repo.insert_batch(interims=[make_interim(old, at=old.started_at, bytes_in=5)],
                                now=NOW - timedelta(days=4))
        await repo.upsert_node(report=NodeReport(
            node_id="gone", version="0", started_at=NOW - timedelta(days=5),
            last_seen=NOW - timedelta(days=4), policy_version="", active_connections=0))

        result = await repo.run_maintenance(now=NOW)
    finally:
        await repo.close()

    expired_days = sorted(day for day in per_day if day < NOW.date() - timedelta(days=2))
    assert len(expired_days) == 2
    expected_dropped = {f"{table}_p{day:%Y%m%d}" for table in DAILY_TABLES
                        for day in expired_days}
    assert set(result.dropped) == expected_dropped
    # Tomorrow is a Wednesday: its week's partition was there already.
    assert set(result.created) == {f"{table}_p{NOW + timedelta(days=1):%Y%m%d}"
                                   for table in DAILY_TABLES}
    assert (result.progress_purged, result.nodes_purged) == (1, 1)
    for name in expected_dropped:
        assert await db.fetchval("SELECT to_regclass($1)", name) is None
    kept = {day: count for day, count in per_day.items() if day not in expired_days}
    rows = dict(await db.fetch(
        "SELECT (started_at AT TIME ZONE 'UTC')::date, count(*) FROM traffic_logs GROUP BY 1"
    ))
    assert rows == kept
    assert await db.fetchval("SELECT sum(connections) FROM rollup_totals") == sum(kept.values())
    for table in DAILY_TABLES:
        days = [name.rsplit("_p", 1)[1] for name in await _partitions(db, table)]
        assert days == sorted(f"{NOW + timedelta(days=n):%Y%m%d}" for n in range(-2, 2))
    # NOW is a Tuesday: the week before still has its Sunday, NOW - 2 days, so it stays.
    for table in WEEKLY_TABLES:
        assert await _partitions(db, table) == [f"{table}_p20260302", f"{table}_p20260309"]


async def test_an_interrupted_pass_is_finished(database_url: str, db: asyncpg.Connection) -> None:
    """A partition left detached but not dropped (a crash between the two) is dropped next."""
    repo = await Repository.open(url=database_url, retention_days=2)
    try:
        old = NOW - timedelta(days=5)
        await repo.insert_batch(events=[make_event(started_at=old)], now=old)
        orphan = f"traffic_logs_p{old:%Y%m%d}"
        await db.execute(f"ALTER TABLE traffic_logs DETACH PARTITION {orphan}")
        result = await repo.drop_expired_partitions(now=NOW)
        assert orphan in result
        assert await db.fetchval("SELECT to_regclass($1)", orphan) is None
        # A second pass has nothing left to do.
        assert await repo.drop_expired_partitions(now=NOW) == ()
    finally:
        await repo.close()


async def test_the_maintenance_loop_runs_until_stopped(repo: Repository,
                                                       db: asyncpg.Connection) -> None:
    import asyncio
    from datetime import UTC, datetime

    from socks5_analytics.storage.maintenance import run_maintenance_forever

    stop = asyncio.Event()
    task = asyncio.create_task(run_maintenance_forever(repo, interval=3600, stop=stop))
    today = f"traffic_logs_p{datetime.now(UTC):%Y%m%d}"
    async with asyncio.timeout(30):
        while await db.fetchval("SELECT to_regclass($1)", today) is None:
            await asyncio.sleep(0.01)  # polling a condition, with the deadline above
    stop.set()
    async with asyncio.timeout(10):
        await task


async def test_queued_deltas_of_a_dropped_day_go_with_it(database_url: str,
                                                         db: asyncpg.Connection) -> None:
    """Retention may drop a day whose domain and client deltas are still queued (a batch
    committed between a maintenance pass's roll-forward and its drop): the next
    roll-forward drops them too instead of failing on the missing partitions forever."""
    repo = await Repository.open(url=database_url, retention_days=2)
    repo.auto_roll_forward = False
    try:
        old, recent = NOW - timedelta(days=4), NOW - timedelta(hours=1)
        await repo.insert_batch(events=[make_event(started_at=old)], now=old)
        await repo.insert_batch(events=[make_event(started_at=recent, bytes_in=7)], now=NOW)
        assert await repo.queue_length() == 2
        await repo.drop_expired_partitions(now=NOW)
        assert await repo.roll_forward() == 2
        assert await repo.queue_length() == 0
        for tier in ("rollup_clients", "rollup_clients_hour", "rollup_clients_day"):
            assert await db.fetchrow(
                f"SELECT sum(connections), sum(bytes_in) FROM {tier}") == (1, 7), tier
    finally:
        await repo.close()


async def test_a_week_without_its_first_days_is_read_from_the_days_left(
    database_url: str, db: asyncpg.Connection
) -> None:
    """A weekly partition goes with the last of its days; until then a window holding that
    whole week reads the days still kept, not the week's row, which counts the dropped days
    too. So the domains agree with the totals (which have no weekly tier) throughout."""
    repo = await Repository.open(url=database_url, retention_days=2)
    try:
        # NOW is Tuesday 2026-03-10; the week of Monday 2026-03-02 ends on Sunday the 8th.
        for back, count in ((4, 1), (3, 2), (2, 4), (1, 8)):
            moment = NOW - timedelta(days=back)
            await repo.insert_batch(now=moment, events=[
                make_event(started_at=moment - timedelta(minutes=n)) for n in range(count)])
        await repo.roll_forward()
        whole_week = StatsFilter(since=NOW - timedelta(days=10), until=NOW - timedelta(days=1,
                                 hours=12, minutes=30))  # Mar 1 (Sunday) to Mar 9 00:00
        before = await repo.top_domains(flt=whole_week)
        assert [item.connections for item in before.items] == [1 + 2 + 4]

        await repo.run_maintenance(now=NOW)  # keeps Mar 8 onwards
        assert await _partitions(db, "rollup_domains_week") == [
            "rollup_domains_week_p20260302", "rollup_domains_week_p20260309"]
        after = await repo.top_domains(flt=whole_week)
        statuses = await repo.statuses(flt=whole_week)
        assert [item.connections for item in after.items] == [4]
        assert [item.connections for item in statuses.items] == [4]

        await repo.run_maintenance(now=NOW + timedelta(days=1))  # Mar 8 goes, and its week
        assert await _partitions(db, "rollup_domains_week") == [
            "rollup_domains_week_p20260309"]
        gone = await repo.top_domains(flt=whole_week)
        assert (gone.items, gone.total) == ((), 0)
    finally:
        await repo.close()


async def test_creating_partitions_never_deadlocks_a_reader(
    repo: Repository, db: asyncpg.Connection, database_url: str
) -> None:
    """A new day's partitions are created one parent after another in one transaction,
    each under an exclusive lock of its parent. A reader that holds one parent (a ranking
    reads several tiers in one snapshot) and then wants another that the creator holds used
    to deadlock with it, and one of the two failed. The creator now gives up its locks when
    one is not free at once, and tries again: both succeed."""
    first = await repo.ensure_partitions(now=NOW + timedelta(days=10))
    parents = [name.rsplit("_p", 1)[0] for name in first]
    created_first, created_last = parents[0], parents[-1]
    reader = await asyncpg.connect(database_url)
    try:
        async with reader.transaction(isolation="repeatable_read"):
            await reader.fetchval(f"SELECT count(*) FROM {created_last}")
            creating = asyncio.ensure_future(repo.ensure_partitions(now=NOW + timedelta(days=20)))
            # Until the creator holds the first parent and waits for the last one.
            for _ in range(200):
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "WHERE NOT l.granted AND c.relname = $1", created_last)
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert waiting, "the creator never waited for the reader's table"
            assert await reader.fetchval(f"SELECT count(*) FROM {created_first}") == 0
        created = await asyncio.wait_for(creating, timeout=30)
    finally:
        await reader.close()
    assert {name.rsplit("_p", 1)[0] for name in created} == set(parents)


async def test_one_maintenance_pass_at_a_time(repo: Repository, db: asyncpg.Connection) -> None:
    """While another process (a second collector) runs a pass, a pass does nothing."""
    from socks5_analytics.storage._sql import MAINTENANCE_LOCK

    later = NOW + timedelta(days=30)
    await db.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
    try:
        result = await repo.run_maintenance(now=later)
    finally:
        await db.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
    assert result.skipped and result.created == ()
    result = await repo.run_maintenance(now=later)
    assert not result.skipped
    assert f"traffic_logs_p{later:%Y%m%d}" in result.created
