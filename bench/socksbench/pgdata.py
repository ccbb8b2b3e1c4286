"""Shared pieces of the storage and pipeline benchmarks (bench/storage.py, bench/pipeline.py).

A throwaway embedded PostgreSQL (non-durable: fsync, synchronous_commit and
full_page_writes off, as the storage tests use), migrated to head; generated connection
events with a realistic skew; the "raw COPY" baseline (asyncpg's binary
`copy_records_to_table` into a bare copy of `traffic_logs`: the same columns, constraints,
primary key and three secondary indexes, partitioned by day the same way, but no staging,
no dedupe and no rollups); and the CPU accounting of everything else on the machine.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from .procstat import system_busy_seconds, tree_cpu_seconds

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from socks5_analytics.storage import StoredEvent  # noqa: E402
from socks5_analytics.storage._sql import EVENT_COLUMNS  # noqa: E402
from socks5_analytics.storage.embedded import EmbeddedPostgres  # noqa: E402
from socks5_analytics.storage.migrate import run_migration  # noqa: E402

RAW_TABLE = "bench_raw"


def log_to_stderr(t0: float, message: str) -> None:
    elapsed = int(time.monotonic() - t0)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def embedded_postgres(commit_timestamps: bool = False) -> Iterator[EmbeddedPostgres]:
    """A fresh non-durable embedded server, migrated to head, removed afterwards.

    `commit_timestamps` turns on track_commit_timestamp (a restart), so that a row's commit
    time is `pg_xact_commit_timestamp(xmin)`: the moment it became visible.
    """
    folder = Path(tempfile.mkdtemp(prefix="s5a-bench-pg-"))
    folder.chmod(0o755)  # as root the server runs as another user, who must get in
    server = EmbeddedPostgres(folder / "pg", durable=False)
    try:
        url = server.start()
        if commit_timestamps:
            import asyncio

            import asyncpg

            async def enable() -> None:
                connection = await asyncpg.connect(url)
                try:
                    await connection.execute("ALTER SYSTEM SET track_commit_timestamp = on")
                finally:
                    await connection.close()

            asyncio.run(enable())
            server.stop()
            server.start()
        run_migration(server.dsn)
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def postmaster_pid(server: EmbeddedPostgres) -> int | None:
    """The server's postmaster process id (its children are the backends)."""
    try:
        return int((server.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class LoadMeter:
    """Machine-wide CPU use over a span, split into ours (the processes given) and other."""

    def __init__(self, pids: Sequence[int | None]) -> None:
        self.pids = [pid for pid in pids if pid]
        self.wall0 = time.monotonic()
        self.busy0 = system_busy_seconds()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        own = os.times()
        return own.user + own.system + sum(tree_cpu_seconds(pid) for pid in self.pids
                                           if pid != os.getpid())

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.wall0, 1e-3)
        busy = system_busy_seconds() - self.busy0
        ours = self._ours() - self.ours0
        return {"wall_s": wall, "ours_cores": ours / wall,
                "other_cores": max(0.0, busy - ours) / wall}


# -- generated traffic -------------------------------------------------------------------------


def _zipf(n: int, s: float = 1.1) -> list[float]:
    """Cumulative Zipf weights over n ranks (random.choices' cum_weights)."""
    return list(itertools.accumulate(1 / (rank ** s) for rank in range(1, n + 1)))


DOMAINS = [(f"d{n:05d}.example.com", f"d{n:05d}.example.com") if n % 3 else
           (f"www.d{n:05d}.example.com", f"d{n:05d}.example.com") for n in range(20_000)]
CLIENTS = [IPv4Address(int(IPv4Address("10.0.0.0")) + n * 7 + 1) for n in range(2_000)]
USERS = [f"user{n:05d}" for n in range(300)]
STATUSES = ["ok", "refused", "timeout", "denied_destination", "dns_failed", "auth_failed"]
_STATUS_W = list(itertools.accumulate([930, 20, 15, 15, 15, 5]))
_DOMAIN_W, _CLIENT_W = _zipf(len(DOMAINS)), _zipf(len(CLIENTS))


def events(count: int, rng: random.Random, *, end: datetime | None = None,
           span: timedelta = timedelta(seconds=60), nodes: int = 4) -> list[StoredEvent]:
    """`count` connections that closed in the `span` before `end` (default now), as a live
    batch holds them: each started its duration (log-normal, median about 1 s, some last
    minutes) before it closed.

    Zipf-distributed domains (20,000) and clients (2,000); each client address belongs to
    one of 300 users (users and addresses go together, as they do in practice); 93 % `ok`;
    log-normal bytes and latencies, as bench/api/run.py generates them.
    """
    end = end or datetime.now(UTC)
    span_us = int(span / timedelta(microseconds=1))
    domains = rng.choices(DOMAINS, cum_weights=_DOMAIN_W, k=count)
    clients = rng.choices(range(len(CLIENTS)), cum_weights=_CLIENT_W, k=count)
    statuses = rng.choices(STATUSES, cum_weights=_STATUS_W, k=count)
    made = []
    for domain, client_no, status in zip(domains, clients, statuses, strict=True):
        client, user = CLIENTS[client_no], USERS[client_no * 7 % len(USERS)]
        ended = end - timedelta(microseconds=rng.randrange(span_us))
        ok = status == "ok"
        duration = rng.lognormvariate(7, 2) if ok else rng.uniform(0.1, 50)
        started = ended - timedelta(milliseconds=duration)
        made.append(StoredEvent(
            event_id=uuid.UUID(int=rng.getrandbits(128) & ~(0xF << 76) | (4 << 76)),
            node_id=f"node-{rng.randrange(nodes)}", started_at=started,
            ended_at=ended,
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


def records(batch: Sequence[StoredEvent]) -> list[tuple[Any, ...]]:
    """The rows of `batch` as the repository hands them to COPY (traffic_logs' column order,
    addresses as packed bytes, which asyncpg encodes fastest): the same records for both."""
    try:
        from socks5_analytics.storage.repository import _event_record
    except ImportError:  # an older repository
        return [tuple(getattr(event, column) for column in EVENT_COLUMNS) for event in batch]
    return [_event_record(event) for event in batch]


# -- the raw COPY baseline ---------------------------------------------------------------------


async def create_raw_table(connection: Any, days: Sequence[date]) -> None:
    """A bare copy of traffic_logs (columns, checks, primary key, the three indexes) with
    day partitions for `days`; no rollups, no staging."""
    await connection.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
    await connection.execute(
        f"CREATE TABLE {RAW_TABLE} (LIKE traffic_logs INCLUDING ALL) "
        "PARTITION BY RANGE (started_at)")
    for day in sorted(set(days)):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        await connection.execute(
            f"CREATE TABLE {RAW_TABLE}_p{day:%Y%m%d} PARTITION OF {RAW_TABLE} "
            f"FOR VALUES FROM ('{start.isoformat()}') TO "
            f"('{(start + timedelta(days=1)).isoformat()}')")


async def raw_copy(connection: Any, batches: Sequence[list[tuple[Any, ...]]]) -> float:
    """COPY every batch, one transaction each, into the bare table; return seconds."""
    started = time.perf_counter()
    for rows in batches:
        async with connection.transaction():
            await connection.copy_records_to_table(RAW_TABLE, records=rows,
                                                   columns=EVENT_COLUMNS)
    return time.perf_counter() - started


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
