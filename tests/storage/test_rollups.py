"""The per-minute rollups equal a brute-force aggregate of what was sent, on random traffic.

Random connections (some to IP literals, some failed, some long with interim reports that
are lost, repeated or late), sent in shuffled batches with some batches sent twice. A
reference model in plain Python applies the documented rules; every rollup row must match
it exactly, and the connection counts and latency histograms must also match an aggregate
over the raw rows of traffic_logs.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import IPv4Address
from typing import Any

import asyncpg
import pytest
from storage_data import NOW, make_event, make_interim

from socks5_analytics.storage import InterimReport, Repository, StatsFilter, StoredEvent
from socks5_analytics.storage.schema import LATENCY_BUCKETS_MS, LATENCY_COLUMNS

Batch = tuple[list[StoredEvent], list[InterimReport]]


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _bucket_index(connect_ms: float) -> int:
    for index, bound in enumerate(LATENCY_BUCKETS_MS):
        if connect_ms <= bound:
            return index
    return len(LATENCY_BUCKETS_MS)


@dataclass
class Measures:
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    connect_count: int = 0
    connect_ms_sum: float = 0.0
    connect_ms_max: float | None = None
    histogram: list[int] = field(default_factory=lambda: [0] * len(LATENCY_COLUMNS))

    def add(self, *, connections: int = 0, bytes_in: int = 0, bytes_out: int = 0,
            connect_ms: float | None = None) -> None:
        self.connections += connections
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if connect_ms is not None:
            self.connect_count += 1
            self.connect_ms_sum += connect_ms
            self.connect_ms_max = max(self.connect_ms_max or 0.0, connect_ms)
            self.histogram[_bucket_index(connect_ms)] += 1


class Model:
    """The documented rollup rules, applied to batches in the order they are sent."""

    def __init__(self) -> None:
        self.stored: set[uuid.UUID] = set()
        self.progress: dict[uuid.UUID, tuple[int, int]] = {}
        self.tables: dict[str, dict[tuple[Any, ...], Measures]] = {
            name: defaultdict(Measures)
            for name in ("rollup_totals", "rollup_domains", "rollup_clients")
        }

    def _add(self, bucket: datetime, node: str, source: Any, user: str, domain: str | None,
             status: str, **measures: Any) -> None:
        self.tables["rollup_totals"][(bucket, node, status)].add(**measures)
        self.tables["rollup_clients"][(bucket, source, user, status)].add(**measures)
        if domain is not None:
            self.tables["rollup_domains"][(bucket, domain, status)].add(**measures)

    def apply(self, events: Sequence[StoredEvent], interims: Sequence[InterimReport]) -> None:
        live = [report for report in interims if report.event_id not in self.stored]
        seen: dict[uuid.UUID, tuple[int, int]] = {}
        for report in sorted(live, key=lambda r: (r.reported_at, r.bytes_in, r.bytes_out)):
            before = seen.get(report.event_id, self.progress.get(report.event_id, (0, 0)))
            delta_in = max(report.bytes_in - before[0], 0)
            delta_out = max(report.bytes_out - before[1], 0)
            if delta_in or delta_out:
                self._add(_minute(report.reported_at), report.node_id, report.source_ip,
                          report.user_name, report.domain, "ok", bytes_in=delta_in,
                          bytes_out=delta_out)
            seen[report.event_id] = (max(before[0], report.bytes_in),
                                     max(before[1], report.bytes_out))
        self.progress.update(seen)
        for event in events:
            if event.event_id in self.stored:
                continue
            self.stored.add(event.event_id)
            self._add(_minute(event.started_at), event.node_id, event.source_ip,
                      event.user_name, event.domain, event.status, connections=1,
                      connect_ms=event.connect_ms)
            counted = self.progress.pop(event.event_id, (0, 0))
            rest_in = max(event.bytes_in - counted[0], 0)
            rest_out = max(event.bytes_out - counted[1], 0)
            if rest_in or rest_out:
                self._add(_minute(event.ended_at), event.node_id, event.source_ip,
                          event.user_name, event.domain, event.status, bytes_in=rest_in,
                          bytes_out=rest_out)


def _random_traffic(rng: random.Random, connections: int) -> list[Batch]:
    domains = [f"site{n}.example" for n in range(30)]
    users = ["", "alice", "bob", "carol"]
    sources = [IPv4Address(f"192.0.2.{n}") for n in range(1, 12)]
    statuses = ["ok"] * 8 + ["refused", "timeout", "dns_failed", "denied_whitelist"]
    messages: list[tuple[float, StoredEvent | InterimReport]] = []
    window = 3 * 3600
    for _ in range(connections):
        started = NOW - timedelta(seconds=rng.uniform(600, window),
                                  microseconds=rng.randrange(10**6))
        status = rng.choice(statuses)
        literal = rng.random() < 0.15
        domain = None if literal else rng.choice(domains[: rng.randint(1, len(domains))])
        long_lived = status == "ok" and rng.random() < 0.2
        duration = rng.uniform(61, 540) if long_lived else rng.uniform(0, 45)
        total_in = rng.randint(0, 5_000_000) if status == "ok" else 0
        total_out = rng.randint(0, 200_000) if status == "ok" else 0
        event = make_event(
            started_at=started, ended_at=started + timedelta(seconds=duration),
            node_id=rng.choice(["node-a", "node-b"]), source_ip=rng.choice(sources),
            user_name=rng.choice(users), status=status, domain=domain,
            registered_domain=domain, dest_host=domain or "198.51.100.7",
            connect_ms=(round(rng.lognormvariate(3, 1.5), 3) if status == "ok"
                        else rng.choice([None, 5000.0])),
            bytes_in=total_in, bytes_out=total_out, duration_ms=duration * 1000,
        )
        messages.append((duration, event))
        # Interim reports each minute, cumulative; some lost, some sent twice.
        reports = int(duration // 60)
        for n in range(1, reports + 1):
            if rng.random() < 0.15:
                continue
            share = n * 60 / duration
            report = make_interim(event, at=started + timedelta(seconds=60 * n),
                                  bytes_in=int(total_in * share), bytes_out=int(total_out * share))
            copies = 2 if rng.random() < 0.1 else 1
            messages.extend([(60.0 * n + rng.uniform(-90, 90), report)] * copies)
    # Roughly in time order, with jitter: some interim reports arrive after their final row.
    messages.sort(key=lambda item: (item[1].started_at + timedelta(seconds=item[0])))
    batches: list[Batch] = []
    while messages:
        size = rng.randint(20, 200)
        chunk, messages = messages[:size], messages[size:]
        events = [item for _, item in chunk if isinstance(item, StoredEvent)]
        interims = [item for _, item in chunk if isinstance(item, InterimReport)]
        batches.append((events, interims))
        if rng.random() < 0.2:
            batches.append((events, interims))  # a lost ack: the same batch again
    return batches


async def _rollup_rows(db: asyncpg.Connection, table: str,
                       keys: Sequence[str]) -> dict[tuple[Any, ...], Measures]:
    rows = await db.fetch(
        f"SELECT {', '.join(keys)}, connections, bytes_in, bytes_out, connect_count, "
        f"connect_ms_sum, connect_ms_max, {', '.join(LATENCY_COLUMNS)} FROM {table}"
    )
    found: dict[tuple[Any, ...], Measures] = {}
    for row in rows:
        width = len(keys)
        key = tuple(row[:width])
        if table == "rollup_clients":
            key = (key[0], IPv4Address(str(key[1])), *key[2:])
        found[key] = Measures(
            connections=row["connections"], bytes_in=row["bytes_in"],
            bytes_out=row["bytes_out"], connect_count=row["connect_count"],
            connect_ms_sum=row["connect_ms_sum"], connect_ms_max=row["connect_ms_max"],
            histogram=[row[column] for column in LATENCY_COLUMNS],
        )
    return found


def _same(expected: Measures, actual: Measures) -> bool:
    sums_match = math.isclose(expected.connect_ms_sum, actual.connect_ms_sum, rel_tol=1e-9,
                              abs_tol=1e-6)
    return sums_match and (
        (expected.connections, expected.bytes_in, expected.bytes_out, expected.connect_count,
         expected.connect_ms_max, expected.histogram)
        == (actual.connections, actual.bytes_in, actual.bytes_out, actual.connect_count,
            actual.connect_ms_max, actual.histogram)
    )


KEYS = {
    "rollup_totals": ("bucket", "node_id", "status"),
    "rollup_domains": ("bucket", "domain", "status"),
    "rollup_clients": ("bucket", "source_ip", "user_name", "status"),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_rollups_equal_brute_force(seed: int, repo: Repository,
                                         db: asyncpg.Connection) -> None:
    rng = random.Random(seed)
    model = Model()
    for events, interims in _random_traffic(rng, connections=800):
        await repo.insert_batch(events=events, interims=interims, now=NOW)
        model.apply(events, interims)

    for table, keys in KEYS.items():
        actual = await _rollup_rows(db, table, keys)
        expected = {key: value for key, value in model.tables[table].items()}
        assert set(actual) == set(expected), table
        wrong = [key for key in expected if not _same(expected[key], actual[key])]
        assert not wrong, (table, wrong[:3])

    # Connections and latency histograms equal those of the raw rows, minute by minute.
    raw = await db.fetch(
        "SELECT date_trunc('minute', started_at) AS bucket, node_id, status, count(*) AS n, "
        "count(connect_ms) AS measured, max(connect_ms) AS slowest FROM traffic_logs "
        "GROUP BY 1, 2, 3"
    )
    totals = await _rollup_rows(db, "rollup_totals", KEYS["rollup_totals"])
    for row in raw:
        rolled = totals[(row["bucket"], row["node_id"], row["status"])]
        assert (rolled.connections, rolled.connect_count, rolled.connect_ms_max) == (
            row["n"], row["measured"], row["slowest"])
    # Every byte of every closed connection is in the rollups, exactly once.
    closed = await db.fetchrow("SELECT sum(bytes_in), sum(bytes_out) FROM traffic_logs")
    open_progress = await db.fetchval("SELECT count(*) FROM connection_progress")
    assert open_progress == 0
    rolled_in = sum(m.bytes_in for m in totals.values())
    rolled_out = sum(m.bytes_out for m in totals.values())
    assert (rolled_in, rolled_out) == (closed[0], closed[1])

    # And the stats queries read them: the whole window's status counts match the raw rows.
    flt = StatsFilter(since=NOW - timedelta(hours=4), until=NOW + timedelta(hours=1))
    statuses = await repo.statuses(flt=flt, limit=100)
    raw_statuses = dict(await db.fetch("SELECT status, count(*) FROM traffic_logs GROUP BY 1"))
    assert {item.status: item.connections for item in statuses.items} == raw_statuses


async def test_rollup_and_raw_paths_agree(repo: Repository) -> None:
    """A filter no rollup covers (user and domain together) is answered from raw rows."""
    rng = random.Random(7)
    for events, interims in _random_traffic(rng, connections=300):
        await repo.insert_batch(events=events, interims=interims, now=NOW)
    flt = StatsFilter(since=NOW - timedelta(hours=4), until=NOW + timedelta(hours=1))
    by_rollup = await repo.top_domains(flt=flt, limit=1000)
    by_domain_raw = {}
    for item in by_rollup.items:
        narrowed = StatsFilter(since=flt.since, until=flt.until, domain=item.domain,
                               user="alice")
        users_rows = await repo.top_domains(flt=narrowed)
        by_domain_raw[item.domain] = sum(row.connections for row in users_rows.items)
    alice = await repo.top_users(flt=flt, limit=100)
    alice_total = next(item.connections for item in alice.items if item.key == "alice")
    literal = await repo.count_events(flt=StatsFilter(since=flt.since, until=flt.until,
                                                      user="alice"))
    assert alice_total == literal
    assert sum(by_domain_raw.values()) <= alice_total  # connections to IP literals excluded
    latency = await repo.latency(flt=flt)
    assert latency.count == sum(bucket.count for bucket in latency.histogram)
    assert latency.p50_ms is not None and latency.p99_ms is not None
    assert latency.p50_ms <= latency.p95_ms <= latency.p99_ms <= latency.max_ms  # type: ignore[operator]
