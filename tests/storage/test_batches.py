"""Batch inserts: exactly once, bad rows set aside, interim byte counts, node heartbeats."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import replace
from datetime import timedelta
from ipaddress import IPv6Address

import asyncpg
import pytest
from storage_data import NOW, make_event, make_interim

from socks5_analytics.storage import InvalidBatchError, NodeReport, Repository, StatsFilter

TOTALS_SQL = """
SELECT coalesce(sum(connections), 0), coalesce(sum(bytes_in), 0), coalesce(sum(bytes_out), 0)
FROM {table}
"""


async def _totals(db: asyncpg.Connection, table: str) -> tuple[int, int, int]:
    row = await db.fetchrow(TOTALS_SQL.format(table=table))
    return int(row[0]), int(row[1]), int(row[2])


async def _assert_rollups(repo: Repository, db: asyncpg.Connection, connections: int,
                          bytes_in: int, bytes_out: int) -> None:
    """The stats count the batch at once (from the queue); once rolled forward and up,
    every tier of the totals and client rollups holds the batch's sums, once."""
    statuses = await repo.statuses(flt=StatsFilter(since=NOW - timedelta(hours=1),
                                                   until=NOW + timedelta(minutes=1)))
    assert sum(item.connections for item in statuses.items) == connections
    await repo.roll_forward()
    assert await repo.queue_length() == 0
    for family in ("rollup_totals", "rollup_clients"):
        for table in (family, f"{family}_hour", f"{family}_day"):
            assert await _totals(db, table) == (connections, bytes_in, bytes_out), table


async def test_batch_is_stored_with_every_field(repo: Repository, db: asyncpg.Connection) -> None:
    event = make_event(source_ip=IPv6Address("2001:db8::1"), trace_id="ab" * 16, ttfb_ms=None)
    result = await repo.insert_batch(events=[event], now=NOW)
    assert (result.inserted, result.duplicates, result.rejected) == (1, 0, ())

    page = await repo.logs(flt=StatsFilter(since=NOW - timedelta(hours=1), until=NOW))
    assert page.items == (event,)
    row = await db.fetchrow("SELECT pg_typeof(source_ip)::text AS t, family(source_ip) AS f "
                            "FROM traffic_logs")
    assert (row["t"], row["f"]) == ("inet", 6)


async def test_same_batch_twice_is_stored_once(repo: Repository, db: asyncpg.Connection) -> None:
    events = [make_event(bytes_in=n) for n in range(1, 101)]
    first = await repo.insert_batch(events=events, now=NOW)
    second = await repo.insert_batch(events=events, now=NOW)

    assert (first.inserted, first.duplicates) == (100, 0)
    assert (second.inserted, second.duplicates) == (0, 100)
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 100
    await _assert_rollups(repo, db, 100, sum(range(1, 101)), 100 * 1_000)


async def test_rebatched_events_are_stored_once(repo: Repository, db: asyncpg.Connection) -> None:
    """A spool replay regroups events into other batches: the key is the event, not the batch."""
    events = [make_event() for _ in range(10)]
    await repo.insert_batch(events=events[:6], now=NOW)
    result = await repo.insert_batch(events=events[3:] + events[3:5], now=NOW)
    assert (result.inserted, result.duplicates) == (4, 5)
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 10
    await _assert_rollups(repo, db, 10, 10 * 50_000, 10 * 1_000)


async def test_a_stored_event_at_the_end_of_a_batch(repo: Repository, db: asyncpg.Connection
                                                   ) -> None:
    """A batch goes in by a plain INSERT first; the conflict at its last row undoes that
    attempt (not the interim report applied before it in the same transaction), and the
    batch goes again skipping the stored event."""
    stored = make_event(bytes_in=7)
    await repo.insert_batch(events=[stored], now=NOW)
    fresh = [make_event(bytes_in=n) for n in range(1, 51)]
    open_one = make_event(bytes_in=0, bytes_out=0)
    report = make_interim(open_one, at=open_one.started_at + timedelta(seconds=1),
                          bytes_in=1_000)
    result = await repo.insert_batch(events=[*fresh, stored], interims=[report], now=NOW)
    assert (result.inserted, result.duplicates, result.interim_applied) == (50, 1, 1)
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 51
    await _assert_rollups(repo, db, 51, 7 + sum(range(1, 51)) + 1_000, 51 * 1_000)


async def test_concurrent_copies_of_a_batch_are_stored_once(
    repo: Repository, db: asyncpg.Connection
) -> None:
    """Two collectors write the same batch at once (a retry racing the original)."""
    events = [make_event() for _ in range(200)]
    results = await asyncio.gather(*(repo.insert_batch(events=events, now=NOW) for _ in range(3)))
    assert sum(result.inserted for result in results) == 200
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 200
    await _assert_rollups(repo, db, 200, 200 * 50_000, 200 * 1_000)


async def test_bad_rows_are_set_aside_and_the_rest_is_written(
    repo: Repository, db: asyncpg.Connection
) -> None:
    good = [make_event() for _ in range(3)]
    bad_status = make_event(status="exploded")
    bad_bytes = make_event(bytes_in=-5)
    bad_time = make_event(ended_at=NOW - timedelta(hours=2))
    bad_latency = make_event(connect_ms=math.nan)
    batch = [good[0], bad_status, good[1], bad_bytes, bad_time, bad_latency, good[2]]

    result = await repo.insert_batch(events=batch, now=NOW)

    assert result.inserted == 3
    reasons = {row.event_id: row.reason for row in result.rejected}
    assert set(reasons) == {bad_status.event_id, bad_bytes.event_id, bad_time.event_id,
                            bad_latency.event_id}
    assert "status 'exploded'" in reasons[bad_status.event_id]
    assert "bytes_in" in reasons[bad_bytes.event_id]
    assert "ended_at is before started_at" in reasons[bad_time.event_id]
    assert "connect_ms" in reasons[bad_latency.event_id]
    stored = {row[0] for row in await db.fetch("SELECT event_id FROM traffic_logs")}
    assert stored == {event.event_id for event in good}
    await _assert_rollups(repo, db, 3, 3 * 50_000, 3 * 1_000)


async def test_rows_outside_the_kept_days(repo: Repository, db: asyncpg.Connection) -> None:
    """Older than the retention: skipped. Beyond the partitions ahead (a skewed clock): rejected."""
    expired = make_event(started_at=NOW - timedelta(days=40))
    future = make_event(started_at=NOW + timedelta(days=10))
    late_but_kept = make_event(started_at=NOW - timedelta(days=29))
    result = await repo.insert_batch(events=[expired, future, late_but_kept], now=NOW)
    assert (result.inserted, result.expired) == (1, 1)
    assert [row.event_id for row in result.rejected] == [future.event_id]
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 1


async def test_interim_bytes_land_in_the_minutes_they_flowed(
    repo: Repository, db: asyncpg.Connection
) -> None:
    """A 3-minute download reports twice while open; the final row still counts once."""
    start = NOW.replace(second=0, microsecond=0) - timedelta(minutes=3)
    event = make_event(started_at=start, ended_at=start + timedelta(minutes=3, seconds=10),
                       bytes_in=9_000, bytes_out=90)
    one = make_interim(event, at=start + timedelta(minutes=1, seconds=5), bytes_in=4_000,
                       bytes_out=40)
    two = make_interim(event, at=start + timedelta(minutes=2, seconds=5), bytes_in=7_000,
                       bytes_out=70)
    assert (await repo.insert_batch(interims=[one], now=NOW)).interim_applied == 1
    # The same report again, and an older one arriving late, add nothing.
    await repo.insert_batch(interims=[one, two, one], now=NOW)
    await repo.insert_batch(events=[event], interims=[two], now=NOW)
    # A report that arrives after the final row changes nothing either.
    late = make_interim(event, at=start + timedelta(minutes=2, seconds=50), bytes_in=8_000)
    assert (await repo.insert_batch(interims=[late], now=NOW)).interim_applied == 0

    await repo.roll_forward()
    rows = await db.fetch("SELECT bucket, connections, bytes_in, bytes_out FROM rollup_totals "
                          "ORDER BY bucket")
    minute = timedelta(minutes=1)
    assert [tuple(row) for row in rows] == [
        (start, 1, 0, 0),
        (start + minute, 0, 4_000, 40),
        (start + 2 * minute, 0, 3_000, 30),
        (start + 3 * minute, 0, 2_000, 20),
    ]
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 1
    assert await db.fetchval("SELECT count(*) FROM connection_progress") == 0
    series = await repo.traffic(
        flt=StatsFilter(since=start, until=start + 4 * minute), interval="1m"
    )
    assert [point.bytes_in for point in series.points] == [0, 4_000, 3_000, 2_000]


async def test_interim_and_final_in_one_batch(repo: Repository, db: asyncpg.Connection) -> None:
    event = make_event(bytes_in=10_000, bytes_out=0)
    report = make_interim(event, at=event.started_at + timedelta(seconds=10), bytes_in=6_000)
    result = await repo.insert_batch(events=[event], interims=[report], now=NOW)
    assert (result.inserted, result.interim_applied) == (1, 1)
    await _assert_rollups(repo, db, 1, 10_000, 0)


async def test_node_heartbeats_keep_the_newest(repo: Repository) -> None:
    first = NodeReport(node_id="node-a", version="0.1.0", started_at=NOW - timedelta(hours=1),
                       last_seen=NOW, policy_version="p1", active_connections=5)
    await repo.upsert_node(report=first)
    await repo.upsert_node(report=replace(first, last_seen=NOW + timedelta(seconds=5),
                                          active_connections=7, policy_version="p2"))
    await repo.upsert_node(report=replace(first, last_seen=NOW - timedelta(seconds=5),
                                          active_connections=1))
    await repo.upsert_node(report=replace(first, node_id="node-b"))
    page = await repo.nodes()
    assert page.total == 2
    assert [(node.node_id, node.active_connections, node.policy_version)
            for node in page.items] == [("node-a", 7, "p2"), ("node-b", 5, "p1")]


async def test_logs_pages_by_cursor_and_offset(repo: Repository) -> None:
    events = [make_event(started_at=NOW - timedelta(minutes=n, seconds=30)) for n in range(25)]
    await repo.insert_batch(events=events, now=NOW)
    flt = StatsFilter(since=NOW - timedelta(hours=1), until=NOW)
    newest_first = [event.event_id for event in events]

    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page = await repo.logs(flt=flt, limit=10, cursor=cursor)
        assert page.total == 25
        seen.extend(item.event_id for item in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == newest_first

    by_offset = await repo.logs(flt=flt, limit=10, offset=20)
    assert [item.event_id for item in by_offset.items] == newest_first[20:]
    filtered = await repo.logs(flt=replace(flt, user="nobody"))
    assert (filtered.items, filtered.total) == ((), 0)


@pytest.mark.parametrize(("limit", "offset", "pages_with_cursor"), [
    (5, 0, 4),    # 25 rows in 5 full pages: the fifth, full as it is, is the last
    (25, 0, 0),   # one page holds them all
    (24, 0, 1),   # one row left for a second page
    (5, 20, 0),   # the last 5 by offset
    (5, 19, 1),
])
async def test_logs_last_page_has_no_cursor(repo: Repository, limit: int, offset: int,
                                            pages_with_cursor: int) -> None:
    """`next_cursor` is null on the last page, also when that page is exactly full."""
    events = [make_event(started_at=NOW - timedelta(minutes=n, seconds=30)) for n in range(25)]
    await repo.insert_batch(events=events, now=NOW)
    flt = StatsFilter(since=NOW - timedelta(hours=1), until=NOW)
    page = await repo.logs(flt=flt, limit=limit, offset=offset)
    cursors = 0
    while page.next_cursor is not None:
        cursors += 1
        page = await repo.logs(flt=flt, limit=limit, cursor=page.next_cursor)
        assert page.items, "a cursor led to an empty page"
    assert cursors == pages_with_cursor


async def test_checked_rows_skip_the_row_checks_but_not_the_limits(
        repo: Repository, db: asyncpg.Connection) -> None:
    """`checked=True` (the collector's normalized rows) skips the row checks, so a row the
    checks would set aside reaches the database, whose constraints refuse the batch; the
    retention and clock-skew limits still apply to checked rows."""
    bad = make_event(status="no-such-status")
    unchecked = await repo.insert_batch(events=[bad], now=NOW)
    assert [row.event_id for row in unchecked.rejected] == [bad.event_id]
    with pytest.raises(InvalidBatchError):
        await repo.insert_batch(events=[bad], now=NOW, checked=True)

    old = make_event(started_at=NOW - timedelta(days=40))
    future = make_event(started_at=NOW + timedelta(days=10))
    fine = make_event()
    result = await repo.insert_batch(events=[old, fine, future], now=NOW, checked=True)
    assert (result.inserted, result.expired) == (1, 1)
    assert [row.event_id for row in result.rejected] == [future.event_id]
    # All in range: the whole batch goes in without a look at each row.
    many = [make_event(started_at=NOW - timedelta(hours=n)) for n in range(30)]
    assert (await repo.insert_batch(events=many, now=NOW, checked=True)).inserted == 30
    assert await db.fetchval("SELECT count(*) FROM traffic_logs") == 31


async def test_a_clean_close_rolls_forward_what_waits(database_url: str,
                                                      db: asyncpg.Connection) -> None:
    """A small batch's roll-forward waits for more rows (or a moment); closing the
    repository rolls it forward rather than leave it queued."""
    repo = await Repository.open(url=database_url)
    try:
        await repo.insert_batch(events=[make_event()], now=NOW)
    finally:
        await repo.close()
    assert await db.fetchval("SELECT count(*) FROM rollup_queue") == 0
    assert await db.fetchval("SELECT sum(connections) FROM rollup_domains_day") == 1


async def test_the_queue_is_vacuumed_by_the_roll_forward(
    repo: Repository, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every roll-forward leaves its rows dead in the queue's heap, which readers scan whole;
    after enough of them it vacuums the queue, so the next batches reuse that space rather
    than grow the heap round after round (autovacuum comes by once a minute at best)."""
    monkeypatch.setattr("socks5_analytics.storage.repository._VACUUM_QUEUE_ROWS", 1_000)
    repo.auto_roll_forward = False
    sizes = []
    for _ in range(6):
        await repo.insert_batch(events=[make_event() for _ in range(1_000)], now=NOW)
        assert await repo.roll_forward() == 1_000
        sizes.append(await db.fetchval("SELECT pg_relation_size('rollup_queue')"))
    assert await repo.queue_length() == 0
    # One round's rows fit in the pages the previous rounds left (some slack for the free
    # space map's granularity); without the vacuum it would be six rounds' pages.
    assert sizes[-1] <= 2 * sizes[0], sizes


@pytest.mark.parametrize("reported_before", [False, True], ids=["first-report", "later-report"])
async def test_an_interim_racing_its_final_counts_the_bytes_once(
    repo: Repository, db: asyncpg.Connection, reported_before: bool
) -> None:
    """An interim report and the final event of the same connection, written at the same
    moment by two writers (two collectors, or two of one collector's writers): whichever
    commits first, the connection's bytes are counted once. Without a lock between the two,
    neither transaction sees the other's uncommitted row, and the bytes count twice.

    `reported_before`: an earlier report is already stored, so the racing one updates the
    connection's progress row instead of inserting it."""
    rounds, filler = 24, 100
    for _ in range(rounds):
        event = make_event(bytes_in=10_000, bytes_out=100)
        if reported_before:
            early = make_interim(event, at=event.started_at + timedelta(seconds=5),
                                 bytes_in=2_000, bytes_out=20)
            await repo.insert_batch(interims=[early], now=NOW)
        report = make_interim(event, at=event.started_at + timedelta(seconds=10),
                              bytes_in=6_000, bytes_out=60)
        others = [make_event(bytes_in=1, bytes_out=1) for _ in range(2 * filler)]
        await asyncio.gather(
            repo.insert_batch(events=others[:filler], interims=[report], now=NOW),
            repo.insert_batch(events=[*others[filler:], event], now=NOW),
        )
    connections = rounds * (2 * filler + 1)
    await _assert_rollups(repo, db, connections, rounds * (10_000 + 2 * filler),
                          rounds * (100 + 2 * filler))
