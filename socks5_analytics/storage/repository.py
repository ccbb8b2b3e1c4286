"""The repository: the only code that talks to PostgreSQL.

Writes. `insert_batch` takes a batch of final events and interim reports and, in one
transaction, stores the new events in `traffic_logs` (binary COPY into a session-local
staging table, then a plain `INSERT` in a savepoint, or `INSERT ... ON CONFLICT DO NOTHING`
when some of them are stored already) and adds exactly those rows, and the interim growth,
to the per-minute rollups.

Exactly-once. The idempotency key is the event's own `event_id` (with `started_at`, the
partition key), not a batch id: a proxy node's spool may replay the same events in other
batches, and two collectors may both receive one event; a batch-id table would let those
through twice. A conflicting row is skipped, and since the rollups are fed from the
`RETURNING` of that same INSERT, a skipped row adds nothing to them. Interim reports carry
cumulative counts, so a repeated report adds zero; a batch with reports takes an advisory
lock exclusively that batches of final events share, so a report and its connection's
final event, written at once, never both count the same bytes.

Reads. Every stats query is answered from a per-minute rollup when the rollup's key covers
the query's filters (totals: node, status; domains: domain, status; clients: source IP,
user, status), else from `traffic_logs` through its indexes. The raw fallback counts a
connection's bytes in the minute it started: only the rollups know when interim bytes
flowed.

Errors. asyncpg's and the OS's exceptions are caught by class at this boundary and raised
again as the `errors` module's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, cast

import asyncpg
import structlog

from socks5_analytics.storage import _sql
from socks5_analytics.storage.codecs import use_fast_inet
from socks5_analytics.storage.errors import (
    DatabaseUnavailableError,
    InvalidBatchError,
    InvalidQueryError,
    SchemaMissingError,
    StorageError,
    TransientError,
)
from socks5_analytics.storage.models import (
    BatchResult,
    ClientStat,
    DomainLatency,
    DomainStat,
    HistogramBucket,
    InterimReport,
    LatencyStats,
    LogPage,
    MaintenanceResult,
    NodeInfo,
    NodeReport,
    Page,
    RejectedRow,
    StatsFilter,
    StatusCount,
    StoredEvent,
    TrafficInterval,
    TrafficPoint,
    TrafficSeries,
)
from socks5_analytics.storage.schema import (
    LATENCY_BUCKETS_MS,
    PARTITIONED_TABLES,
    WEEKLY_TABLES,
)
from socks5_analytics.storage.tiers import (
    RANK_SUM_COSTS,
    SUM_COSTS,
    Piece,
    Tier,
    buckets,
    split_window,
    split_window_for_sums,
)
from socks5_analytics.storage.validation import check_event, check_interim

__all__ = ["Repository"]

_log = structlog.get_logger(__name__)
# Queue rows one roll-forward transaction takes at most (a backlog goes in several).
_ROLL_FORWARD_CHUNK = 200_000
# The background roll-forward starts once this many rows were queued since the last one
# began, or this many seconds after the first of fewer. Larger chunks upsert fewer rows per
# event (keys repeat): at b = 1,000, rolling every commit cost 42-49 µs of PostgreSQL CPU
# an event, every 10,000 rows 24-25 µs. Below that many, a second: at a few thousand events
# a second a roll-forward every 0.25 s was mostly per-statement cost, and the queue that
# readers scan is no longer than the row threshold either way.
_ROLL_FORWARD_ROWS = 5_000
_ROLL_FORWARD_DELAY = 1.0
# The queue is a heap of short-lived rows, and every roll-forward and every reader scans it
# whole, dead rows too; autovacuum looks at it once a minute at best, by when a busy minute
# has left some 30 MB of dead rows (a scan of the empty queue took 17 ms). So a roll-forward
# vacuums it (without truncating: its pages are reused) after this many rows were taken.
_VACUUM_QUEUE_ROWS = 20_000
# The coarse tiers of the rollups (hour, day, week, the domain ranking tiers) are rolled up
# from the minute tiers up to this long before the time now (after a roll-forward, at most
# once a minute): a connection counts in the minute it started, and most of a minute's
# connections have ended (and been sent) this long after it. A later one still goes into
# every tier at once; readers take the minutes since the watermark from the minute tiers.
ROLL_UP_LAG = timedelta(minutes=5)
# A reader that does not roll up (the API) reads the watermark at most this often (seconds):
# any value once seen stays a lower bound, since it never moves back.
_WATERMARK_READ_EVERY = 30.0
_NEVER = datetime(1, 1, 1, tzinfo=UTC)  # a watermark floor that bounds nothing
# Creating a day's partitions locks each parent in turn, exclusively, in one transaction. A
# reader holding one parent while it wants another that the creator holds would deadlock
# with it; so the creator waits for no lock longer than this, then lets every lock go and
# tries again after a pause (a reader's statements take milliseconds), at most this often.
_CREATE_LOCK_TIMEOUT = "50ms"
_CREATE_TRIES = 50
_CREATE_PAUSE = 0.05


def _event_record(e: StoredEvent) -> tuple[Any, ...]:
    """A row for COPY, in `_sql.EVENT_COLUMNS` order, built as cheaply as asyncpg encodes it.

    Addresses go as their packed bytes: the pool's inet codec (`codecs.py`) writes them as
    they are, and asyncpg's own (a pool made elsewhere) takes them without parsing, where it
    turns an address object back into text and parses that (about 4 µs an IPv4 address,
    13 µs an IPv6 one).
    """
    dest_ip = e.dest_ip
    return (e.event_id, e.node_id, e.started_at, e.ended_at, e.source_ip.packed,
            e.source_port, e.user_name, e.command, e.protocol, e.dest_host, e.domain,
            None if dest_ip is None else dest_ip.packed, e.dest_port, e.registered_domain,
            e.status, e.reply_code, e.close_reason, e.connect_ms, e.ttfb_ms, e.duration_ms,
            e.bytes_out, e.bytes_in, e.trace_id)


_MINUTE = timedelta(minutes=1)
_INTERVALS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
# Latency measures (count, sum, max, histogram) summed over rollup rows.
_ROLLUP_LATENCY = ("coalesce(sum(connect_count), 0) AS n, "
                   "coalesce(sum(connect_ms_sum), 0) AS total_ms, "
                   f"max(connect_ms_max) AS max_ms, {_sql.HISTOGRAM_SUMS_AS}")
_TIER_ORDER: tuple[Tier, ...] = ("minute", "hour", "day", "week")
# The integer sums of a ranking statement (its counts and bytes).
_INTEGER_SUM = re.compile(r"\bsum\((connections|bytes_in|bytes_out|connect_count)\)")
# The coarsest tier whose buckets each interval's buckets are made of.
_COARSEST: dict[str, Tier] = {"1m": "minute", "5m": "minute", "1h": "hour", "1d": "day"}
# date_bin's origin: buckets of every interval start at whole UTC minutes, hours, days.
_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
_RAW_COLUMN = {
    "user": "user_name",
    "source_ip": "source_ip",
    "domain": "domain",
    "node": "node_id",
    "status": "status",
}
_FILTER_NAMES = tuple(_RAW_COLUMN)


@contextlib.contextmanager
def _translated() -> Any:
    """Turn asyncpg's and the OS's exceptions into the storage layer's, by class."""
    try:
        yield
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError,
            asyncpg.UndefinedColumnError) as exc:
        raise SchemaMissingError(
            f"the database schema is missing or old ({exc.__class__.__name__}): "
            "run `socks5-analytics migrate`"
        ) from exc
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        constraint = getattr(exc, "constraint_name", None)
        raise InvalidBatchError(
            f"the database refused the data ({exc.sqlstate}"
            f"{', constraint ' + constraint if constraint else ''})",
            constraint=constraint,
        ) from exc
    except asyncpg.QueryCanceledError as exc:
        raise TransientError("the query was cancelled (statement_timeout)") from exc
    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
            asyncpg.LockNotAvailableError) as exc:
        raise TransientError(f"a lock conflict: {exc.__class__.__name__}") from exc
    except (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
            asyncpg.AdminShutdownError, asyncpg.TooManyConnectionsError,
            asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise DatabaseUnavailableError(f"the database is unavailable: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StorageError(f"database error {exc.sqlstate}: {exc}") from exc


async def _create_partitions(connection: asyncpg.Connection, first: date,
                             last: date) -> tuple[str, ...]:
    """Create the partitions of the days `first` to `last` that do not exist yet; return
    their names. See `_CREATE_LOCK_TIMEOUT`: a busy parent makes it start over."""
    for _ in range(_CREATE_TRIES - 1):
        try:
            return await _create_partitions_once(connection, first, last)
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(_CREATE_PAUSE * random.uniform(0.5, 1.5))
    # Still busy: the caller gets a TransientError (translated) and tries again later.
    return await _create_partitions_once(connection, first, last)


async def _create_partitions_once(connection: asyncpg.Connection, first: date,
                                  last: date) -> tuple[str, ...]:
    async with connection.transaction():
        await connection.execute(f"SET LOCAL lock_timeout = '{_CREATE_LOCK_TIMEOUT}'")
        rows = await connection.fetch(_sql.CREATE_PARTITIONS, first, last)
    return tuple(row[0] for row in rows)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _floor_minute(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def _ceil_minute(moment: datetime) -> datetime:
    floored = _floor_minute(moment)
    return floored if floored == moment else floored + _MINUTE


def _encode_cursor(started_at: datetime, event_id: uuid.UUID) -> str:
    micros = (started_at - _ORIGIN) // timedelta(microseconds=1)
    raw = f"{micros}:{event_id.hex}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Exactly what _encode_cursor writes: int() and UUID() alone would also take "+5", " 5",
# "5_0", other scripts' digits, and UUIDs with dashes, braces or "urn:uuid:".
_CURSOR = re.compile(r"-?[0-9]{1,19}:[0-9a-f]{32}")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not _CURSOR.fullmatch(raw):
            raise ValueError(raw)
        micros, _, hex_id = raw.partition(":")
        return _ORIGIN + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id)
    except (ValueError, binascii.Error, OverflowError) as exc:
        raise InvalidQueryError("malformed cursor") from exc


class _Where:
    """Conditions and their `$n` arguments, built up for one query."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def add(self, template: str, *values: Any) -> None:
        """Add a condition whose `{}` placeholders become the next `$n`."""
        numbers = []
        for value in values:
            self.args.append(value)
            numbers.append(f"${len(self.args)}")
        self.conditions.append(template.format(*numbers))

    def param(self, value: Any) -> str:
        """Add an argument without a condition; return its `$n`."""
        self.args.append(value)
        return f"${len(self.args)}"

    @property
    def sql(self) -> str:
        return " AND ".join(self.conditions) or "TRUE"


def _active_filters(flt: StatsFilter) -> dict[str, Any]:
    return {name: getattr(flt, name) for name in _FILTER_NAMES if getattr(flt, name) is not None}


def _window(flt: StatsFilter) -> tuple[datetime, datetime]:
    """The stats window widened to whole minutes, as the rollups count."""
    if flt.since.utcoffset() is None or flt.until.utcoffset() is None:
        raise InvalidQueryError("since and until must be timezone-aware")
    if flt.since > flt.until:
        raise InvalidQueryError("since is after until")
    return _floor_minute(flt.since), _ceil_minute(flt.until)


def _where(
    flt: StatsFilter, *, time_column: str, since: datetime, until: datetime
) -> _Where:
    where = _Where()
    where.add(f"{time_column} >= {{}} AND {time_column} < {{}}", since, until)
    for name, value in _active_filters(flt).items():
        where.add(f"{_RAW_COLUMN[name]} = {{}}", value)
    return where


def _choose_rollup(
    flt: StatsFilter, candidates: Iterable[_sql.Rollup]
) -> _sql.Rollup | None:
    wanted = set(_active_filters(flt))
    for rollup in candidates:
        if wanted <= rollup.filters:
            return rollup
    return None


def _rollup_source(
    rollup: _sql.Rollup, flt: StatsFilter, since: datetime, until: datetime, where: _Where,
    *, coarsest: Tier = "week", condition: str | None = None,
    sums_as_of: datetime | None = None, select: tuple[str, ...] | None = None,
    point_lookups: bool = False, rolled_floor: datetime | None = None,
) -> str:
    """A FROM item with `rollup`'s rows for [since, until) that match the filters.

    Whole days come from the daily tier, whole hours from the hourly one, the rest from the
    minutes (`tiers.split_window`); a deferred family takes the minutes since the roll-up's
    watermark from its minute tier and adds what is still queued. One statement, so one
    snapshot: a roll-forward or roll-up that commits meanwhile moves rows between the queue
    and the tiers without their being counted twice or missed.

    With `sums_as_of` (the time now), a partial hour, day or week at an end may be read as
    its whole bucket less the rest of it (`tiers.split_window_for_sums`): fewer rows, exact
    for the sums, but with no maximum (`connect_ms_max` is null) and rows of a key that add
    up to zero. `select` narrows the rows to these columns (keys and sums); when they are
    all in the domain ranking tiers and no status filter applies, whole days and weeks come
    from those (one row per domain, not per domain and status).

    `point_lookups` (with a `condition` on a few keys) also names every hour, day and week
    bucket of the window (`bucket = ANY(...)`), so that each is one descent of the primary
    key (bucket first) per key rather than a scan of the bucket range for each key.

    `rolled_floor`, a time the watermark was seen at (it never moves back), bounds the
    minutes read from the watermark on by a constant too, so the planner skips the minute
    partitions before it (the watermark itself is known only when the statement runs).
    """
    conditions = [f"{_RAW_COLUMN[name]} = {where.param(value)}"
                  for name, value in _active_filters(flt).items()]
    conditions.append(rollup.where)
    if condition is not None:
        conditions.append(condition)
    filters = " AND ".join(conditions)
    all_columns = rollup.row_columns
    columns = all_columns if select is None else select
    keys = ("bucket", *rollup.keys, *(c for c, _, _ in rollup.extra))
    ranks = (rollup is _sql.DOMAINS and flt.status is None and select is not None
             and set(select) <= {"domain", "registered_domain", *_sql.RANK_MEASURES})

    def table(tier: Tier) -> str:
        if ranks and tier in _sql.DOMAIN_RANK_TABLES:
            return _sql.DOMAIN_RANK_TABLES[tier]
        return rollup.tier_table(tier)

    branches = []
    coarsest = min(coarsest, cast(Tier, rollup.tiers[-1]), key=_TIER_ORDER.index)
    pieces = (split_window(since, until, coarsest=coarsest) if sums_as_of is None else
              split_window_for_sums(since, until, now=sums_as_of, coarsest=coarsest,
                                    costs=RANK_SUM_COSTS if ranks else SUM_COSTS))
    selected = ", ".join(columns)
    negated = ", ".join(
        column if column in keys
        else "NULL::double precision" if column == "connect_ms_max" else f"-{column}"
        for column in columns)
    # A deferred family's coarse tiers hold only the minutes before the roll-up's watermark:
    # the minutes from it on are read from the minute tier, once, for the whole window, and
    # no piece of minutes reads them again. (Coarse pieces hold nothing from there on.)
    rolled_up = rollup.deferred and any(piece.tier != "minute" for piece in pieces)
    for piece in pieces:
        start, end = where.param(piece.start), where.param(piece.end)
        if rolled_up and piece.tier == "minute":
            end = f"{end} AND bucket < {_sql.ROLLED_UNTIL}"
        branch = (f"SELECT {selected if piece.sign > 0 else negated} FROM {{table}} "
                  f"WHERE bucket >= {start} AND bucket < {end} AND {filters}")

        def points(tier: Tier, piece: Piece = piece) -> str:
            if not point_lookups or tier == "minute":
                return ""
            every = where.param(buckets(Piece(tier, piece.start, piece.end)))
            return f" AND bucket = ANY({every}::timestamptz[])"

        if piece.tier != "week":
            branches.append(branch.format(table=table(piece.tier)) + points(piece.tier))
            continue
        # A week whose first days retention dropped is read from the days left: its
        # weekly row would still count the dropped ones. Both conditions are evaluated
        # once per statement (no row is read from the branch not taken).
        branches.append(branch.format(table=table("week")) + points("week")
                        + f" AND {_sql.OLDEST_DAY} <= {start}")
        branches.append(branch.format(table=table("day")) + points("day")
                        + f" AND {_sql.OLDEST_DAY} > {start}")
    if rolled_up:
        start, end = where.param(since), where.param(until)
        floor = f" AND bucket >= {where.param(rolled_floor)}" if rolled_floor else ""
        branches.append(f"SELECT {selected} FROM {table('minute')} "
                        f"WHERE bucket >= {start} AND bucket >= {_sql.ROLLED_UNTIL}{floor} "
                        f"AND bucket < {end} AND {filters}")
    if rollup.deferred and since < until:
        start, end = where.param(since), where.param(until)
        branches.append(f"SELECT {selected} FROM ({_sql.queue_rows(rollup)}) "
                        f"AS q({', '.join(all_columns)}) "
                        f"WHERE bucket >= {start} AND bucket < {end} AND {filters}")
    if not branches:  # an empty window; the filters still type their parameters
        branches.append(f"SELECT {selected} FROM {rollup.table} WHERE FALSE AND {filters}")
    return "(" + "\n    UNION ALL ".join(branches) + ") AS r"


def _percentile(
    histogram: Sequence[int], count: int, fraction: float, max_ms: float | None
) -> float | None:
    """The `fraction` quantile, interpolated linearly inside its histogram bucket."""
    if count == 0:
        return None
    rank = fraction * count
    seen = 0
    lower = 0.0
    uppers = [float(bound) for bound in LATENCY_BUCKETS_MS] + [max_ms or math.inf]
    for in_bucket, upper in zip(histogram, uppers, strict=True):
        if in_bucket and seen + in_bucket >= rank:
            upper = min(upper, max_ms) if max_ms is not None else upper
            lower = min(lower, upper)
            return lower + (upper - lower) * (rank - seen) / in_bucket
        seen += in_bucket
        lower = upper
    return max_ms


def _latency(count: int, total_ms: float, max_ms: float | None,
             histogram: Sequence[int]) -> LatencyStats:
    bounds = [float(bound) for bound in LATENCY_BUCKETS_MS] + [math.inf]
    return LatencyStats(
        count=count,
        avg_ms=total_ms / count if count else None,
        p50_ms=_percentile(histogram, count, 0.50, max_ms),
        p95_ms=_percentile(histogram, count, 0.95, max_ms),
        p99_ms=_percentile(histogram, count, 0.99, max_ms),
        max_ms=max_ms,
        histogram=tuple(
            HistogramBucket(le_ms=bound, count=int(n))
            for bound, n in zip(bounds, histogram, strict=True)
        ),
    )


def _event_from_row(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(*(row[column] for column in _sql.EVENT_COLUMNS))


class Repository:
    """Typed access to the analytics database over an asyncpg pool.

    Open with `await Repository.open(url=...)` (or `from_settings`) and `await close()` it,
    or use `async with`. Every method is keyword-only; results are frozen dataclasses.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        retention_days: int = 30,
        partitions_ahead_days: int = 3,
    ) -> None:
        self._pool = pool
        self.retention_days = retention_days
        self.partitions_ahead_days = partitions_ahead_days
        # Days whose partitions we know exist; maintenance and batches keep it current.
        self._known_days: set[date] = set()
        self._partition_lock = asyncio.Lock()
        # The roll-forward that follows commits: one at a time, run again if asked meanwhile.
        self.auto_roll_forward = True
        self._roller: asyncio.Task[None] | None = None
        self._roll_timer: asyncio.TimerHandle | None = None
        self._pending_rows = 0  # queued by this process since its last roll-forward began
        self._rolled_since_vacuum = 0  # queue rows this process took since it vacuumed it
        # The time now, for choosing the cheapest tiers of a ranking and for the roll-up
        # (tests set it).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        # How far behind the time now a roll-forward rolls the coarse tiers up (None: only
        # `roll_up` and maintenance do; tests and benchmarks set it).
        self.roll_up_lag: timedelta | None = ROLL_UP_LAG
        self._rolled_until: datetime | None = None  # the watermark, as last seen here
        self._watermark_read_at = -math.inf  # time.monotonic() of the last read

    # -- opening and closing --------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        *,
        url: str,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        retention_days: int = 30,
        partitions_ahead_days: int = 3,
        application_name: str = "socks5-analytics",
    ) -> Repository:
        """Open a connection pool to `url` and return a repository over it."""
        server_settings = {
            "timezone": "UTC",
            "application_name": application_name,
            "statement_timeout": str(int(statement_timeout * 1000)),
        }
        with _translated():
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                server_settings=server_settings,
                init=use_fast_inet,
            )
        return cls(
            pool, retention_days=retention_days, partitions_ahead_days=partitions_ahead_days
        )

    @classmethod
    async def from_settings(
        cls, settings: Any, *, url: str | None = None, application_name: str = "socks5-analytics"
    ) -> Repository:
        """Open from a `config.DatabaseSettings`; `url` overrides `settings.url`."""
        dsn = url or settings.url
        if not dsn:
            raise StorageError("no database URL (start the embedded server first)")
        return await cls.open(
            url=dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            connect_timeout=settings.connect_timeout,
            statement_timeout=settings.statement_timeout,
            retention_days=settings.retention_days,
            partitions_ahead_days=settings.partitions_ahead_days,
            application_name=application_name,
        )

    async def close(self) -> None:
        """Close the pool, waiting for connections in use (and a roll-forward) to finish."""
        if self._roll_timer is not None:  # roll what is waiting for the timer now
            self._roll_timer.cancel()
            self._roll_timer = None
            if self._pending_rows and (self._roller is None or self._roller.done()):
                self._roller = asyncio.get_running_loop().create_task(
                    self._roll_in_background())
        roller = self._roller
        if roller is not None and not roller.done():
            try:
                await asyncio.wait_for(asyncio.shield(roller), timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                roller.cancel()  # rolled back: its rows stay queued for the next one
        await self._pool.close()

    async def __aenter__(self) -> Repository:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        with _translated():
            async with self._pool.acquire() as connection:
                yield connection

    def pool_usage(self) -> tuple[int, int]:
        """Connections of the pool (in use, idle), for the metrics."""
        size, idle = self._pool.get_size(), self._pool.get_idle_size()
        return size - idle, idle

    async def ping(self) -> None:
        """Raise unless the database answers and has the schema (readiness)."""
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1 FROM traffic_logs LIMIT 0")

    async def schema_revision(self) -> str | None:
        """The alembic revision the database is at, None before the first migration."""
        async with self._connection() as connection:
            if await connection.fetchval("SELECT to_regclass('alembic_version')") is None:
                return None
            revision: str | None = await connection.fetchval(
                "SELECT version_num FROM alembic_version"
            )
            return revision

    # -- writing --------------------------------------------------------------------------

    def _horizon(self, now: datetime) -> tuple[date, date]:
        today = _utc_day(now)
        return (today - timedelta(days=self.retention_days),
                today + timedelta(days=self.partitions_ahead_days))

    async def insert_batch(
        self,
        *,
        events: Sequence[StoredEvent] = (),
        interims: Sequence[InterimReport] = (),
        now: datetime | None = None,
        checked: bool = False,
    ) -> BatchResult:
        """Store a batch exactly once: new events, their rollups and interim byte counts.

        Rows that fail the row checks are set aside (`rejected`, with the reason naming the
        field) and the rest are written; rows older than the retention are skipped
        (`expired`); rows stamped after the last day partitions are kept for (clock skew)
        are rejected. Should the database still refuse the batch, `InvalidBatchError` is
        raised and nothing of it is written, so the caller can keep it.

        `checked`: the caller vouches that every row already passes `validation.check_event`
        / `check_interim` (the collector's normalizer builds rows only from values it
        checked), so those checks are skipped; the retention and clock-skew limits still
        apply, and the database's constraints remain the last line of defence.
        """
        now = now or datetime.now(UTC)
        oldest, newest = self._horizon(now)
        rejected: list[RejectedRow] = []
        expired = 0
        good_events: Sequence[StoredEvent] = []
        days: set[date] = set()
        first_day = last_day = None
        if checked and events:
            first_day = _utc_day(min(event.started_at for event in events))
            last_day = _utc_day(max(event.ended_at for event in events))
        if first_day is not None and last_day is not None and (
                oldest <= first_day and last_day <= newest):
            # All within the kept days: no row to set aside, nothing to look at row by row.
            good_events = events
            days.update(first_day + timedelta(days=n)
                        for n in range((last_day - first_day).days + 1))
        else:
            kept: list[StoredEvent] = []
            for event in events:
                reason = None if checked else check_event(event)
                if reason is None:
                    first, last = _utc_day(event.started_at), _utc_day(event.ended_at)
                    if first < oldest:
                        expired += 1
                        continue
                    if last > newest:
                        reason = f"ended_at {event.ended_at.isoformat()} is beyond {newest}"
                    else:
                        days.update((first, last))
                        kept.append(event)
                        continue
                rejected.append(RejectedRow(event.event_id, "event", reason))
            good_events = kept
        good_interims: list[InterimReport] = []
        for report in interims:
            reason = None if checked else check_interim(report)
            if reason is None:
                day = _utc_day(report.reported_at)
                if day < oldest or _utc_day(report.started_at) < oldest:
                    expired += 1
                    continue
                if day > newest:
                    reason = f"reported_at {report.reported_at.isoformat()} is beyond {newest}"
                else:
                    days.add(day)
                    good_interims.append(report)
                    continue
            rejected.append(RejectedRow(report.event_id, "interim", reason))

        await self._ensure_days(days)
        inserted = interim_applied = 0
        if good_events or good_interims:
            async with self._connection() as connection:
                try:
                    async with connection.transaction():
                        if good_events:
                            # A batch of events alone takes its shared lock in the same
                            # round trip; one with reports waits for its exclusive lock
                            # after the copy, which needs no lock.
                            await connection.execute(
                                _sql.CREATE_STAGE if good_interims
                                else _sql.CREATE_STAGE_FOR_EVENTS)
                            await connection.copy_records_to_table(
                                _sql.STAGE_TABLE,
                                records=map(_event_record, good_events),
                                columns=_sql.EVENT_COLUMNS,
                            )
                        if good_interims:
                            await connection.execute(_sql.LOCK_PROGRESS_FOR_INTERIMS)
                            interim_applied = await self._apply_interims(
                                connection, good_interims
                            )
                        if good_events:
                            inserted = await self._insert_staged(connection)
                except BaseException:
                    # A partition dropped meanwhile (another process's retention) must be
                    # looked up again rather than trusted from the cache.
                    self._known_days.clear()
                    raise
            if inserted or interim_applied:
                self._schedule_roll_forward(inserted + interim_applied)
        return BatchResult(
            inserted=inserted,
            duplicates=len(good_events) - inserted,
            interim_applied=interim_applied,
            expired=expired,
            rejected=tuple(rejected),
        )

    @staticmethod
    async def _insert_staged(connection: asyncpg.Connection) -> int:
        """Move the staged events into traffic_logs, the rollups and the queue; return how
        many were new. A plain INSERT first (no conflict checks), in a savepoint; should one
        of the events be stored already, the INSERT that skips those instead."""
        await connection.execute(_sql.NEW_EVENTS_SAVEPOINT)
        try:
            inserted: int = await connection.fetchval(_sql.INSERT_NEW_EVENTS)
        except asyncpg.UniqueViolationError:
            await connection.execute(_sql.ROLLBACK_NEW_EVENTS)
            inserted = await connection.fetchval(_sql.INSERT_EVENTS)
        return inserted

    @staticmethod
    async def _apply_interims(
        connection: asyncpg.Connection, reports: Sequence[InterimReport]
    ) -> int:
        columns: list[list[Any]] = [[] for _ in range(10)]
        for report in reports:
            values = (report.event_id, report.node_id, report.started_at, report.reported_at,
                      report.source_ip, report.user_name, report.domain,
                      report.registered_domain, report.bytes_out, report.bytes_in)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        applied: int = await connection.fetchval(_sql.APPLY_INTERIM, *columns)
        return applied

    async def upsert_node(self, *, report: NodeReport) -> None:
        """Record a node's heartbeat; an older report never overwrites a newer one."""
        async with self._connection() as connection:
            await connection.execute(
                _sql.UPSERT_NODE, report.node_id, report.version, report.started_at,
                report.last_seen, report.policy_version, report.active_connections,
            )

    # -- rolling the queue forward ---------------------------------------------------------

    def _schedule_roll_forward(self, rows: int) -> None:
        """Roll the queue forward in the background, after the caller's commit.

        The batch is acknowledged without waiting: readers add what is still queued, so the
        rollups' lag never shows. Roll-forwards are fewer and larger than commits: one
        starts once `_ROLL_FORWARD_ROWS` rows were queued since the last one began, or
        `_ROLL_FORWARD_DELAY` seconds after the first of fewer (keys repeat within a chunk,
        so a larger one upserts fewer rows per event). At most one runs per repository,
        taking everything queued by then. It waits for another process's roll-forward
        rather than skip: that one may have started before our commit, and nothing else
        would take our rows until the next batch.
        """
        if not self.auto_roll_forward:
            return
        self._pending_rows += rows
        if self._roller is not None and not self._roller.done():
            return  # it looks again when it is done
        if self._pending_rows >= _ROLL_FORWARD_ROWS:
            self._start_roller()
        elif self._roll_timer is None:
            self._roll_timer = asyncio.get_running_loop().call_later(
                _ROLL_FORWARD_DELAY, self._start_roller)

    def _start_roller(self) -> None:
        if self._roll_timer is not None:
            self._roll_timer.cancel()
            self._roll_timer = None
        if self._roller is None or self._roller.done():
            self._roller = asyncio.get_running_loop().create_task(self._roll_in_background())

    async def _roll_in_background(self) -> None:
        while True:
            self._pending_rows = 0
            try:
                await self.roll_forward()
            except StorageError as exc:
                # The next commit or maintenance pass tries again; nothing is lost.
                _log.warning("rollup roll-forward failed", error=str(exc))
                return
            if self._pending_rows >= _ROLL_FORWARD_ROWS:
                continue
            if self._pending_rows and self._roll_timer is None:
                self._roll_timer = asyncio.get_running_loop().call_later(
                    _ROLL_FORWARD_DELAY, self._start_roller)
            return

    async def roll_forward(self, *, wait: bool = True) -> int:
        """Move every queued rollup delta into the minute tiers (and into the coarse tiers,
        for minutes already rolled up), then roll the coarse tiers up to
        `roll_up_lag` before now if they are a minute or more behind that.

        Each chunk is one transaction (DELETE ... RETURNING, then the upserts), so a row is
        counted in every tier exactly once, whichever of several collectors takes it. Only
        one roll-forward runs at a time in the whole database: with `wait=False` a busy one
        means there is nothing to do here (it, or its successor, takes our rows). Returns the
        queue rows taken.
        """
        taken = 0
        async with self._connection() as connection:
            while True:
                async with connection.transaction():
                    if wait:
                        await connection.execute(_sql.WAIT_ROLL_FORWARD_LOCK)
                    elif not await connection.fetchval(_sql.TRY_ROLL_FORWARD_LOCK):
                        break
                    chunk: int = await connection.fetchval(
                        _sql.ROLL_FORWARD, _ROLL_FORWARD_CHUNK)
                taken += chunk
                if chunk < _ROLL_FORWARD_CHUNK:
                    break
            self._rolled_since_vacuum += taken
            if self._rolled_since_vacuum >= _VACUUM_QUEUE_ROWS:
                self._rolled_since_vacuum = 0
                await self._vacuum_queue(connection)
            if self.roll_up_lag is not None:
                target = _floor_minute(self.clock()) - self.roll_up_lag
                if self._rolled_until is None or target > self._rolled_until:
                    await self._roll_up(connection, target, wait=wait)
        return taken

    async def roll_up(self, *, until: datetime | None = None) -> datetime:
        """Fill the coarse tiers (hour, day, week, the domain ranking tiers) from the minute
        tiers up to `until` (a whole minute; default: `roll_up_lag` before now) and return
        the watermark: the coarse tiers hold exactly the minutes before it. It never moves
        back, and readers' answers never change by it; only which tier holds a minute."""
        if until is None:
            until = _floor_minute(self.clock()) - (self.roll_up_lag or ROLL_UP_LAG)
        if until.utcoffset() is None or until.second or until.microsecond:
            raise ValueError(f"until must be a timezone-aware whole minute, got {until}")
        async with self._connection() as connection:
            return await self._roll_up(connection, until, wait=True)

    async def _roll_up(self, connection: asyncpg.Connection, until: datetime, *,
                       wait: bool) -> datetime:
        async with connection.transaction():
            if wait:
                await connection.execute(_sql.WAIT_ROLL_FORWARD_LOCK)
            elif not await connection.fetchval(_sql.TRY_ROLL_FORWARD_LOCK):
                return self._rolled_until or until  # a busy one rolls up meanwhile
            watermark: datetime = await connection.fetchval(_sql.ROLL_UP, until)
        self._rolled_until = watermark
        return watermark

    @staticmethod
    async def _vacuum_queue(connection: asyncpg.Connection) -> None:
        """Make the queue's dead rows' space reusable (see `_VACUUM_QUEUE_ROWS`). Skipped
        while another vacuum of it runs; a role that does not own the table gets a warning
        from PostgreSQL and nothing is done (autovacuum still comes by)."""
        try:
            await connection.execute(_sql.VACUUM_QUEUE)
        except asyncpg.PostgresError as exc:
            _log.warning("rollup queue vacuum failed", error=str(exc))

    async def queue_length(self) -> int:
        """Rows waiting in the rollup queue (for metrics and tests)."""
        rows = await self._fetch(_sql.QUEUE_LENGTH, ())
        return int(rows[0][0])

    # -- partitions and retention ---------------------------------------------------------

    async def _ensure_days(self, days: Iterable[date]) -> None:
        missing = sorted(set(days) - self._known_days)
        if not missing:
            return
        async with self._partition_lock, self._connection() as connection:
            for day in missing:
                if day not in self._known_days:
                    await _create_partitions(connection, day, day)
                    self._known_days.add(day)

    async def ensure_partitions(self, *, now: datetime | None = None) -> tuple[str, ...]:
        """Create the partitions of today and the configured days ahead; return new names."""
        today = _utc_day(now or datetime.now(UTC))
        last = today + timedelta(days=self.partitions_ahead_days)
        async with self._partition_lock, self._connection() as connection:
            names = await _create_partitions(connection, today, last)
            self._known_days.update(today + timedelta(days=n)
                                    for n in range(self.partitions_ahead_days + 1))
        return names

    async def drop_expired_partitions(self, *, now: datetime | None = None) -> tuple[str, ...]:
        """Detach (concurrently) and drop every partition older than the retention.

        A partition holds one UTC day; it goes once that whole day is more than
        `retention_days` days before today. Never a DELETE: readers and writers of the
        other partitions are not blocked.
        """
        oldest, _ = self._horizon(now or datetime.now(UTC))
        dropped: list[str] = []
        async with self._partition_lock, self._connection() as connection:
            rows = await connection.fetch(_sql.LIST_PARTITIONS, list(PARTITIONED_TABLES))
            for row in rows:
                # A weekly partition goes with the last of its seven days.
                days = 7 if row["parent"] in WEEKLY_TABLES else 1
                if row["day"] + timedelta(days=days - 1) >= oldest:
                    continue
                parent = _quote_ident(row["parent"])
                child = _quote_ident(row["child"])
                mode = "FINALIZE" if row["pending"] else "CONCURRENTLY"
                # Each statement on its own: DETACH CONCURRENTLY refuses a transaction.
                await connection.execute(f"ALTER TABLE {parent} DETACH PARTITION {child} {mode}")
                await connection.execute(f"DROP TABLE {child}")
                dropped.append(row["child"])
                self._known_days.discard(row["day"])
            for row in await connection.fetch(_sql.LIST_ORPHANS, list(PARTITIONED_TABLES)):
                if row["day"] < oldest:
                    await connection.execute(
                        f"DROP TABLE {_quote_ident(row['child'])}"
                    )
                    dropped.append(row["child"])
        return tuple(dropped)

    async def run_maintenance(self, *, now: datetime | None = None) -> MaintenanceResult:
        """One maintenance pass: partitions ahead, the rollup queue, expired partitions,
        stale progress rows. Skipped while another process runs one (two collectors
        detaching the same partition would fail each other)."""
        async with self._connection() as guard:
            if not await guard.fetchval(_sql.TRY_MAINTENANCE_LOCK):
                return MaintenanceResult((), (), 0, 0, skipped=True)
            try:
                return await self._maintain(now or datetime.now(UTC))
            finally:
                await guard.execute(_sql.UNLOCK_MAINTENANCE)

    async def _maintain(self, now: datetime) -> MaintenanceResult:
        created = await self.ensure_partitions(now=now)
        # Before the drop: what is queued for a day about to go is still rolled (and dropped
        # with it), and a queue left by a crashed writer does not wait for the next batch.
        await self.roll_forward()
        dropped = await self.drop_expired_partitions(now=now)
        cutoff = _day_start(self._horizon(now)[0])
        async with self._connection() as connection:
            progress = await connection.execute(_sql.PURGE_PROGRESS, cutoff)
            nodes = await connection.execute(_sql.PURGE_NODES, cutoff)
        return MaintenanceResult(
            created=created,
            dropped=dropped,
            progress_purged=int(progress.split()[-1]),
            nodes_purged=int(nodes.split()[-1]),
        )

    # -- stats ----------------------------------------------------------------------------

    async def _fetch(self, query: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        await self._see_watermark()
        async with self._connection() as connection:
            rows: list[asyncpg.Record] = await connection.fetch(query, *args)
            return rows

    async def _see_watermark(self) -> None:
        """Read the roll-up's watermark now and then (`_WATERMARK_READ_EVERY`): the stats
        queries built after it bound their minute reads by it (`rolled_floor`)."""
        now = time.monotonic()
        if now - self._watermark_read_at < _WATERMARK_READ_EVERY:
            return
        self._watermark_read_at = now
        async with self._connection() as connection:
            seen: datetime = await connection.fetchval(_sql.READ_WATERMARK)
        # As it is, even if lower than seen before: only a migration (0006 downgraded and
        # upgraded again) moves it back. Minus infinity is asyncpg's naive datetime.min.
        self._rolled_until = seen if seen.tzinfo is not None else None

    async def _count_after_end(self, query: str, args: Sequence[Any]) -> int:
        """The total of a page requested past its end, where the window count is absent."""
        async with self._connection() as connection:
            total: int = await connection.fetchval(f"SELECT count(*) FROM ({query}) AS q", *args)
            return total

    async def top_domains(
        self,
        *,
        flt: StatsFilter,
        sort: Literal["connections", "bytes"] = "connections",
        group: Literal["domain", "registered_domain"] = "domain",
        limit: int = 10,
        offset: int = 0,
    ) -> Page[DomainStat]:
        """Destinations by connections or bytes; connections to IP literals are not here."""
        since, until = _window(flt)
        rollup = _choose_rollup(flt, [_sql.DOMAINS])
        column = "registered_domain" if group == "registered_domain" else "domain"
        if rollup is not None:
            measures = ("sum(connections) AS connections, sum(bytes_in) AS bytes_in, "
                        "sum(bytes_out) AS bytes_out, "
                        "sum(connect_ms_sum) / nullif(sum(connect_count), 0) AS avg_ms")
            rank = ("sum(connections)" if sort == "connections"
                    else "sum(bytes_in) + sum(bytes_out)")
            # All sums: computed with the ranking, in one statement.
            rows, total = await self._ranked(rollup, flt, since, until, column=column,
                                             rank=rank, measures=measures, limit=limit,
                                             offset=offset, summed=True)
        else:
            where = _where(flt, time_column="started_at", since=since, until=until)
            measures = ("count(*) AS connections, sum(bytes_in) AS bytes_in, "
                        "sum(bytes_out) AS bytes_out, avg(connect_ms) AS avg_ms")
            where.add(f"{column} IS NOT NULL")
            order = "connections" if sort == "connections" else "bytes_in + bytes_out"
            grouped = (f"SELECT {column} AS key, {measures} FROM traffic_logs "
                       f"WHERE {where.sql} GROUP BY {column}")
            rows, total = await self._page(grouped, where, order, limit, offset)
        items = tuple(
            DomainStat(
                domain=row["key"], connections=int(row["connections"]),
                bytes_in=int(row["bytes_in"]), bytes_out=int(row["bytes_out"]),
                bytes_total=int(row["bytes_in"] + row["bytes_out"]),
                avg_connect_ms=None if row["avg_ms"] is None else float(row["avg_ms"]),
            )
            for row in rows
        )
        return Page(items=items, total=total, limit=limit, offset=offset)

    async def _page(
        self, grouped: str, where: _Where, order: str, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        limit_param, offset_param = where.param(limit), where.param(offset)
        query = (f"SELECT *, count(*) OVER () AS total FROM ({grouped}) AS g "
                 f"ORDER BY {order} DESC, key LIMIT {limit_param} OFFSET {offset_param}")
        rows = await self._fetch(query, where.args)
        if rows:
            return rows, int(rows[0]["total"])
        if offset == 0:
            return rows, 0
        return rows, await self._count_after_end(grouped, where.args[:-2])

    async def _ranked(
        self, rollup: _sql.Rollup, flt: StatsFilter, since: datetime, until: datetime, *,
        column: str, rank: str, measures: str, limit: int, offset: int,
        summed: bool = False,
    ) -> tuple[list[asyncpg.Record], int]:
        """A page of `column`'s values by `rank` (desc, then the key), with `measures`.

        Ordering a window's keys takes one aggregate over all of them. `summed` measures
        (sums of `_sql.RANK_MEASURES` only) come with it; other measures (distinct counts,
        fourteen histogram buckets, a maximum) are computed afterwards for the page's keys
        only. Both statements read one repeatable-read snapshot, so they agree with each
        other as a single statement would.
        """
        await self._see_watermark()
        # One floor for both statements, taken before their snapshot: a watermark seen
        # meanwhile (a roll-up, another request) may be past the snapshot's, and the minutes
        # between the two would be in neither part of the second statement.
        floor = self._rolled_until
        first = _Where()
        # Sums only, so partial periods may be whole ones less their rest; a key is in the
        # window if anything of it is (every rollup row has a connection or bytes).
        source = _rollup_source(rollup, flt, since, until, first,
                                sums_as_of=self.clock(),
                                select=(column, *_sql.RANK_MEASURES),
                                rolled_floor=floor)
        extra = f", {measures}" if summed else ""
        grouped = (f"SELECT {column} AS key, {rank} AS rank{extra} FROM {source} "
                   f"WHERE {column} IS NOT NULL GROUP BY {column} HAVING sum(connections) <> 0 "
                   f"OR sum(bytes_in) <> 0 OR sum(bytes_out) <> 0")
        limit_p, offset_p = first.param(limit), first.param(offset)
        async with self._connection() as connection, connection.transaction(
                isolation="repeatable_read", readonly=True):
            if await connection.fetchval(_sql.RANKING_SETUP, floor or _NEVER):
                # Every count and byte sum of this snapshot fits a double exactly (see
                # _sql.RANKING_SETUP): sum them as doubles, ~20 % faster than as numerics.
                grouped = _INTEGER_SUM.sub(r"sum(\1::float8)", grouped)
            page = (f"SELECT *, count(*) OVER () AS total FROM ({grouped}) AS g "
                    f"ORDER BY rank DESC, key LIMIT {limit_p} OFFSET {offset_p}")
            ranked = await connection.fetch(page, *first.args)
            if not ranked:
                if offset == 0:
                    return [], 0
                total: int = await connection.fetchval(
                    f"SELECT count(*) FROM ({grouped}) AS q", *first.args[:-2])
                return [], total
            if summed:
                return ranked, int(ranked[0]["total"])
            second = _Where()
            keys = second.param([row["key"] for row in ranked])
            # Named buckets pay when the key follows the bucket in the primary key (domains,
            # source addresses); a user's rows are spread over each bucket's addresses.
            source = _rollup_source(rollup, flt, since, until, second,
                                    condition=f"{column} = ANY({keys})",
                                    point_lookups=column == rollup.keys[0],
                                    rolled_floor=floor)
            details = {row["key"]: row for row in await connection.fetch(
                f"SELECT {column} AS key, {measures} FROM {source} GROUP BY {column}",
                *second.args)}
        return [details[row["key"]] for row in ranked], int(ranked[0]["total"])

    async def _clients(
        self, *, flt: StatsFilter, by: Literal["source_ip", "user_name"],
        sort: Literal["connections", "bytes"], limit: int, offset: int,
    ) -> Page[ClientStat]:
        since, until = _window(flt)
        rollup = _choose_rollup(flt, [_sql.CLIENTS])
        other = "user_name" if by == "source_ip" else "source_ip"
        # Unauthenticated connections have the user name '': it is no user to count.
        distinct = ("count(DISTINCT nullif(user_name, ''))" if other == "user_name"
                    else "count(DISTINCT source_ip)")
        rest = (f"sum(bytes_in) AS bytes_in, sum(bytes_out) AS bytes_out, "
                f"{distinct} AS distinct_count")
        if rollup is not None:
            rank = ("sum(connections)" if sort == "connections"
                    else "sum(bytes_in) + sum(bytes_out)")
            rows, total = await self._ranked(
                rollup, flt, since, until, column=by, rank=rank,
                measures=f"sum(connections) AS connections, {rest}", limit=limit,
                offset=offset)
        else:
            where = _where(flt, time_column="started_at", since=since, until=until)
            grouped = (f"SELECT {by} AS key, count(*) AS connections, {rest} "
                       f"FROM traffic_logs WHERE {where.sql} GROUP BY {by}")
            order = "connections" if sort == "connections" else "bytes_in + bytes_out"
            rows, total = await self._page(grouped, where, order, limit, offset)
        items = tuple(
            ClientStat(
                key=str(row["key"]), connections=int(row["connections"]),
                bytes_in=int(row["bytes_in"]), bytes_out=int(row["bytes_out"]),
                bytes_total=int(row["bytes_in"] + row["bytes_out"]),
                distinct=int(row["distinct_count"]),
            )
            for row in rows
        )
        return Page(items=items, total=total, limit=limit, offset=offset)

    async def top_source_ips(
        self, *, flt: StatsFilter, sort: Literal["connections", "bytes"] = "connections",
        limit: int = 10, offset: int = 0,
    ) -> Page[ClientStat]:
        """Client addresses by connections or bytes; `distinct` counts their user names."""
        return await self._clients(flt=flt, by="source_ip", sort=sort, limit=limit,
                                   offset=offset)

    async def top_users(
        self, *, flt: StatsFilter, sort: Literal["connections", "bytes"] = "connections",
        limit: int = 10, offset: int = 0,
    ) -> Page[ClientStat]:
        """Users by connections or bytes (`''` is no authentication); `distinct` counts
        their source addresses."""
        return await self._clients(flt=flt, by="user_name", sort=sort, limit=limit,
                                   offset=offset)

    async def statuses(
        self, *, flt: StatsFilter, limit: int = 10, offset: int = 0
    ) -> Page[StatusCount]:
        """Connections per status, most first."""
        since, until = _window(flt)
        rollup = _choose_rollup(flt, _sql.ROLLUPS)
        if rollup is not None:
            where = _Where()
            source = _rollup_source(rollup, flt, since, until, where,
                                    rolled_floor=self._rolled_until)
            grouped = (f"SELECT status AS key, sum(connections) AS connections "
                       f"FROM {source} GROUP BY status HAVING sum(connections) > 0")
        else:
            where = _where(flt, time_column="started_at", since=since, until=until)
            grouped = (f"SELECT status AS key, count(*) AS connections FROM traffic_logs "
                       f"WHERE {where.sql} GROUP BY status")
        rows, total = await self._page(grouped, where, "connections", limit, offset)
        items = tuple(StatusCount(status=row["key"], connections=int(row["connections"]))
                      for row in rows)
        return Page(items=items, total=total, limit=limit, offset=offset)

    async def traffic(
        self, *, flt: StatsFilter, interval: TrafficInterval = "1h", max_points: int = 10_000
    ) -> TrafficSeries:
        """Connections and bytes per bucket of `interval`, every bucket of the window."""
        if interval not in _INTERVALS:
            raise InvalidQueryError(f"unknown interval {interval!r}")
        step = _INTERVALS[interval]
        since, until = _window(flt)
        if (until - since) / step > max_points:
            raise InvalidQueryError(
                f"{interval} buckets over this window exceed {max_points} points"
            )
        rollup = _choose_rollup(flt, _sql.ROLLUPS)
        if rollup is not None:
            where = _Where()
            time_column, connections = "bucket", "sum(connections)"
            source = _rollup_source(rollup, flt, since, until, where,
                                    coarsest=_COARSEST[interval],
                                    rolled_floor=self._rolled_until)
        else:
            where = _where(flt, time_column="started_at", since=since, until=until)
            time_column, connections = "started_at", "count(*)"
            source = "traffic_logs"
        step_p, origin_p = where.param(step), where.param(_ORIGIN)
        since_p, until_p = where.param(since), where.param(until)
        query = f"""
            WITH agg AS (
                SELECT date_bin({step_p}, {time_column}, {origin_p}) AS ts,
                       {connections} AS connections, sum(bytes_in) AS bytes_in,
                       sum(bytes_out) AS bytes_out
                FROM {source} WHERE {where.sql} GROUP BY 1
            )
            SELECT s.ts, coalesce(agg.connections, 0) AS connections,
                   coalesce(agg.bytes_in, 0) AS bytes_in, coalesce(agg.bytes_out, 0) AS bytes_out
            FROM generate_series(date_bin({step_p}, {since_p}::timestamptz, {origin_p}),
                                 {until_p}::timestamptz - interval '1 microsecond',
                                 {step_p}) AS s(ts)
            LEFT JOIN agg ON agg.ts = s.ts
            ORDER BY s.ts
        """
        rows = await self._fetch(query, where.args)
        points = tuple(
            TrafficPoint(ts=row["ts"], connections=int(row["connections"]),
                         bytes_in=int(row["bytes_in"]), bytes_out=int(row["bytes_out"]))
            for row in rows
        )
        return TrafficSeries(interval=interval, points=points)

    def _latency_source(self, flt: StatsFilter, candidates: Sequence[_sql.Rollup]) -> tuple[
        str, _Where, str
    ]:
        """FROM, WHERE and the measures (count, sum, max, histogram) for a latency query."""
        since, until = _window(flt)
        rollup = _choose_rollup(flt, candidates)
        if rollup is not None:
            where = _Where()
            source = _rollup_source(rollup, flt, since, until, where,
                                    rolled_floor=self._rolled_until)
            return source, where, _ROLLUP_LATENCY
        where = _where(flt, time_column="started_at", since=since, until=until)
        measures = ("count(connect_ms) AS n, coalesce(sum(connect_ms), 0) AS total_ms, "
                    f"max(connect_ms) AS max_ms, {_sql.HISTOGRAM_FROM_RAW_AS}")
        return "traffic_logs", where, measures

    @staticmethod
    def _latency_from_row(row: asyncpg.Record, first_bucket: int) -> LatencyStats:
        histogram = [int(row[first_bucket + index]) for index in range(len(LATENCY_BUCKETS_MS) + 1)]
        max_ms = None if row["max_ms"] is None else float(row["max_ms"])
        return _latency(int(row["n"]), float(row["total_ms"]), max_ms, histogram)

    async def latency(self, *, flt: StatsFilter) -> LatencyStats:
        """Connect latency: count, mean, max exactly; percentiles from histogram buckets."""
        source, where, measures = self._latency_source(flt, _sql.ROLLUPS)
        rows = await self._fetch(f"SELECT {measures} FROM {source} WHERE {where.sql}",
                                 where.args)
        return self._latency_from_row(rows[0], first_bucket=3)

    async def latency_by_domain(
        self, *, flt: StatsFilter, limit: int = 10, offset: int = 0
    ) -> Page[DomainLatency]:
        """Connect latency per destination domain, the most measured domains first."""
        since, until = _window(flt)
        rollup = _choose_rollup(flt, [_sql.DOMAINS])
        if rollup is not None:
            rows, total = await self._ranked(
                rollup, flt, since, until, column="domain",
                rank="coalesce(sum(connect_count), 0)", measures=_ROLLUP_LATENCY,
                limit=limit, offset=offset)
        else:
            source, where, measures = self._latency_source(flt, [_sql.DOMAINS])
            where.add("domain IS NOT NULL")
            grouped = (f"SELECT domain AS key, {measures} FROM {source} "
                       f"WHERE {where.sql} GROUP BY domain")
            rows, total = await self._page(grouped, where, "n", limit, offset)
        items = tuple(DomainLatency(domain=row["key"],
                                    latency=self._latency_from_row(row, first_bucket=4))
                      for row in rows)
        return Page(items=items, total=total, limit=limit, offset=offset)

    # -- logs -----------------------------------------------------------------------------

    async def count_events(self, *, flt: StatsFilter) -> int:
        """How many events started in [since, until) and match the filters, exactly.

        Whole minutes come from a rollup whose key covers the filters; the partial minutes
        at either end, or everything when no rollup covers the filters, from traffic_logs.
        """
        _window(flt)  # validates
        inner_since, inner_until = _ceil_minute(flt.since), _floor_minute(flt.until)
        rollup = _choose_rollup(flt, _sql.ROLLUPS)
        if rollup is None or inner_since >= inner_until:
            return await self._count_raw(flt, flt.since, flt.until)
        where = _Where()
        source = _rollup_source(rollup, flt, inner_since, inner_until, where,
                                rolled_floor=self._rolled_until)
        rows = await self._fetch(
            f"SELECT coalesce(sum(connections), 0) FROM {source}", where.args,
        )
        middle = int(rows[0][0])
        head = await self._count_raw(flt, flt.since, inner_since)
        tail = await self._count_raw(flt, inner_until, flt.until)
        return head + middle + tail

    async def _count_raw(self, flt: StatsFilter, since: datetime, until: datetime) -> int:
        if since >= until:
            return 0
        where = _where(flt, time_column="started_at", since=since, until=until)
        rows = await self._fetch(f"SELECT count(*) FROM traffic_logs WHERE {where.sql}",
                                 where.args)
        return int(rows[0][0])

    async def logs(
        self,
        *,
        flt: StatsFilter,
        limit: int = 10,
        offset: int = 0,
        cursor: str | None = None,
        with_total: bool = True,
    ) -> LogPage:
        """Raw events that started in [since, until), newest first.

        Page by `offset`, or better by `cursor` (the previous page's `next_cursor`), which
        stays fast however deep the page and never repeats or skips a row as new rows
        arrive. `total` counts the whole filtered window (`with_total=False` skips it, -1).
        """
        if flt.since.utcoffset() is None or flt.until.utcoffset() is None:
            raise InvalidQueryError("since and until must be timezone-aware")
        where = _where(flt, time_column="started_at", since=flt.since, until=flt.until)
        if cursor is not None:
            after_time, after_id = _decode_cursor(cursor)
            where.add("(started_at, event_id) < ({}, {})", after_time, after_id)
        # One row past the page says whether another page follows (no cursor on the last).
        limit_p, offset_p = where.param(limit + 1), where.param(offset)
        query = (f"SELECT {', '.join(_sql.EVENT_COLUMNS)} FROM traffic_logs "
                 f"WHERE {where.sql} ORDER BY started_at DESC, event_id DESC "
                 f"LIMIT {limit_p} OFFSET {offset_p}")
        rows = await self._fetch(query, where.args)
        items = tuple(_event_from_row(row) for row in rows[:limit])
        next_cursor = None
        if len(rows) > limit and items:
            next_cursor = _encode_cursor(items[-1].started_at, items[-1].event_id)
        total = await self.count_events(flt=flt) if with_total else -1
        return LogPage(items=items, total=total, limit=limit, offset=offset,
                       next_cursor=next_cursor)

    # -- nodes ----------------------------------------------------------------------------

    async def nodes(
        self, *, flt: StatsFilter | None = None, limit: int = 100, offset: int = 0
    ) -> Page[NodeInfo]:
        """The proxy nodes seen, by id, with what each reported last.

        With `flt`: the nodes up at some time in [since, until) (started before its end, a
        heartbeat since its start), `node` naming one; the event filters (user, source_ip,
        domain, status) keep the nodes that carried such an event in the window.
        """
        where = _Where()
        if flt is not None:
            _window(flt)  # validates
            where.add("n.last_seen >= {} AND n.started_at < {}", flt.since, flt.until)
            if flt.node is not None:
                where.add("n.node_id = {}", flt.node)
            carried = {name: value for name, value in _active_filters(flt).items()
                       if name != "node"}
            if carried:
                event = [f"t.node_id = n.node_id AND t.started_at >= {where.param(flt.since)} "
                         f"AND t.started_at < {where.param(flt.until)}"]
                event += [f"t.{_RAW_COLUMN[name]} = {where.param(value)}"
                          for name, value in carried.items()]
                where.conditions.append(
                    f"EXISTS (SELECT 1 FROM traffic_logs t WHERE {' AND '.join(event)})")
        conditions, condition_args = where.sql, tuple(where.args)
        page = f"LIMIT {where.param(limit)} OFFSET {where.param(offset)}"
        rows = await self._fetch(_sql.SELECT_NODES.format(where=conditions, page=page),
                                 tuple(where.args))
        items = tuple(
            NodeInfo(node_id=row["node_id"], version=row["version"],
                     started_at=row["started_at"], last_seen=row["last_seen"],
                     policy_version=row["policy_version"],
                     active_connections=row["active_connections"])
            for row in rows
        )
        total = int(rows[0]["total"]) if rows else 0
        if not rows and offset:
            counted = await self._fetch(_sql.COUNT_NODES.format(where=conditions),
                                        condition_args)
            total = int(counted[0][0])
        return Page(items=items, total=total, limit=limit, offset=offset)
