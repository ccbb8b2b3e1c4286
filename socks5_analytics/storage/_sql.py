"""The SQL text of the repository, built once at import.

The rollup upserts repeat one shape for three tables and fourteen histogram columns, so they
are generated here from `schema.py`; everything else is plain SQL with `$n` parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from socks5_analytics.storage.schema import LATENCY_BUCKETS_MS, LATENCY_COLUMNS

# traffic_logs' columns, in the order of StoredEvent's fields.
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "node_id", "started_at", "ended_at", "source_ip", "source_port", "user_name",
    "command", "protocol", "dest_host", "domain", "dest_ip", "dest_port",
    "registered_domain", "status", "reply_code", "close_reason", "connect_ms", "ttfb_ms",
    "duration_ms", "bytes_out", "bytes_in", "trace_id",
)
_EVENT_LIST = ", ".join(EVENT_COLUMNS)

STAGE_TABLE = "s5a_stage"
# A per-session scratch table for COPY: no indexes, no WAL, emptied at every commit.
CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} "
    "(LIKE traffic_logs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)


TIERS: tuple[str, ...] = ("minute", "hour", "day")
# The domains also have a weekly tier: ~17,000 domains are active on a busy day and nearly
# all of them every day, so 30 daily tiers hold 30 times the keys that 4 weeks do.
DOMAIN_TIERS: tuple[str, ...] = (*TIERS, "week")


@dataclass(frozen=True)
class Rollup:
    """A rollup family (a per-minute table and its hourly and daily tiers, keyed alike): its
    key columns and the filters its key can answer.

    `deferred` families are fed through `rollup_queue` and the roll-forward instead of by the
    insert itself; their readers add what is still queued. `tiers` are its tables, finest
    first.
    """

    table: str
    keys: tuple[str, ...]  # after bucket
    filters: frozenset[str]  # StatsFilter fields
    where: str = "TRUE"
    extra: tuple[tuple[str, str, str], ...] = ()  # (column, aggregate, on-conflict value)
    deferred: bool = False
    tiers: tuple[str, ...] = TIERS

    def tier_table(self, tier: str) -> str:
        """The table of `tier` ("minute", "hour", "day" or "week")."""
        return self.table if tier == "minute" else f"{self.table}_{tier}"

    @property
    def row_columns(self) -> tuple[str, ...]:
        """The columns of a rollup row, in the order every reader selects them."""
        return ("bucket", *self.keys, *(column for column, _, _ in self.extra), *_MEASURES)


# Queue rows from before migration 0006 have no node: the insert had added them to the
# totals already.
TOTALS = Rollup("rollup_totals", ("node_id", "status"), frozenset({"node", "status"}),
                where="node_id IS NOT NULL", deferred=True)
DOMAINS = Rollup(
    "rollup_domains",
    ("domain", "status"),
    frozenset({"domain", "status"}),
    where="domain IS NOT NULL",
    extra=(("registered_domain", "max(registered_domain)",
            "coalesce(excluded.registered_domain, r.registered_domain)"),),
    deferred=True,
    tiers=DOMAIN_TIERS,
)
CLIENTS = Rollup(
    "rollup_clients",
    ("source_ip", "user_name", "status"),
    frozenset({"source_ip", "user", "status"}),
    deferred=True,
)
ROLLUPS = (TOTALS, DOMAINS, CLIENTS)

# The ranking tiers of the domain rollups (migration 0004): per quarter day (6 hours from
# 00:00 UTC), day and ISO week, keyed by domain alone, holding only the sums a ranking
# reads. A week holds ~47,000 domain-and-status keys at 10 M events a month but ~20,000
# domains; six hours hold ~9,600 domains where six hourly rows hold ~21,500 keys. Rolled
# forward with the others.
DOMAIN_RANK_TABLES: dict[str, str] = {"quarter": "rollup_domain_ranks_quarter",
                                      "day": "rollup_domain_ranks_day",
                                      "week": "rollup_domain_ranks_week"}
RANK_MEASURES: tuple[str, ...] = ("connections", "bytes_in", "bytes_out", "connect_count",
                                  "connect_ms_sum")


# sum(bigint) is numeric: its result is converted to numeric and back for every rollup row.
# s5a_isum (migration 0005) adds bigints as bigints (int8pl; an overflow is an error, as
# the bigint column would make it anyway).
ISUM = "s5a_isum"


def _bucket_filters(column: str) -> list[str]:
    """FILTER conditions that put `column` into each histogram bucket (non-cumulative)."""
    conditions: list[str] = []
    lower: int | None = None
    for bound in LATENCY_BUCKETS_MS:
        low = f"{column} > {lower} AND " if lower is not None else ""
        conditions.append(f"{low}{column} <= {bound}")
        lower = bound
    conditions.append(f"{column} > {lower}")
    return conditions


HISTOGRAM_SUMS_AS = ", ".join(
    f"coalesce(sum({column}), 0) AS {column}" for column in LATENCY_COLUMNS
)
HISTOGRAM_FROM_RAW_AS = ", ".join(
    f"count(*) FILTER (WHERE {condition}) AS {column}"
    for condition, column in zip(_bucket_filters("connect_ms"), LATENCY_COLUMNS, strict=True)
)

_MEASURES = ("connections", "bytes_in", "bytes_out", "connect_count", "connect_ms_sum",
             "connect_ms_max", *LATENCY_COLUMNS)


def _aggregate(rollup: Rollup, facts: str) -> str:
    """Rollup rows (per minute) of the facts in CTE `facts`: one GROUP BY for every tier."""
    keys = ", ".join(("bucket", *rollup.keys))
    extras = "".join(f", {aggregate} AS {column}" for column, aggregate, _ in rollup.extra)
    histogram = ", ".join(
        f"count(*) FILTER (WHERE {condition}) AS {column}"
        for condition, column in zip(_bucket_filters("connect_ms"), LATENCY_COLUMNS,
                                     strict=True))
    return (f"SELECT {keys}{extras}, {ISUM}(connections) AS connections, "
            f"{ISUM}(bytes_in) AS bytes_in, {ISUM}(bytes_out) AS bytes_out, "
            f"count(connect_ms) AS connect_count, "
            f"coalesce(sum(connect_ms), 0) AS connect_ms_sum, max(connect_ms) AS connect_ms_max, "
            f"{histogram} FROM {facts} WHERE {rollup.where} GROUP BY {keys}")


def _upsert(rollup: Rollup, tier: str, rows: str) -> str:
    """An INSERT ... ON CONFLICT that adds the rollup rows of CTE `rows` into `tier`."""
    table = rollup.tier_table(tier)
    keys = ("bucket", *rollup.keys)
    key_list = ", ".join(keys)
    extra_columns = [column for column, _, _ in rollup.extra]
    columns = ", ".join([*keys, *extra_columns, *_MEASURES])
    sums = [f"max({m})" if m == "connect_ms_max" else
            f"sum({m})" if m == "connect_ms_sum" else f"{ISUM}({m})" for m in _MEASURES]
    selected = ", ".join([f"date_trunc('{tier}', bucket)", *rollup.keys,
                          *(f"max({column})" for column in extra_columns), *sums])
    group = ", ".join(["1", *rollup.keys])
    updates = [f"{column} = {value}" for column, _, value in rollup.extra]
    for measure in _MEASURES:
        if measure == "connect_ms_max":
            updates.append("connect_ms_max = greatest(r.connect_ms_max, excluded.connect_ms_max)")
        else:
            updates.append(f"{measure} = r.{measure} + excluded.{measure}")
    # ORDER BY: concurrent writers lock rollup rows in one order, so they cannot deadlock.
    return (
        f"INSERT INTO {table} AS r ({columns})\n"
        f"    SELECT {selected}\n"
        f"    FROM {rows} GROUP BY {group} ORDER BY {group}\n"
        f"    ON CONFLICT ({key_list}) DO UPDATE SET {', '.join(updates)}"
    )


# The deferred families' coarse tiers (hour, day, week, and the domain ranking tiers) hold
# exactly the minutes before this moment (migration 0006); their minute tier holds every
# minute. The roll-up (ROLL_UP) moves it forward.
WATERMARK_TABLE = "rollup_watermark"
READ_WATERMARK = f"SELECT rolled_until FROM {WATERMARK_TABLE}"
ROLLED_UNTIL = f"({READ_WATERMARK})"  # the same, as a scalar subquery inside a statement


def with_tiers(rollup: Rollup, facts: str, *, coarse_before_watermark: bool = False) -> str:
    """CTEs that aggregate CTE `facts` once and add the result to every tier of `rollup`.

    With `coarse_before_watermark`, only the minutes before the roll-up's watermark go into
    the coarse tiers too (CTE `<table>_late`); the rest waits in the minute tier for ROLL_UP.
    """
    name = rollup.table
    parts = [f"{name}_rows AS (\n    {_aggregate(rollup, facts)}\n)"]
    coarse = f"{name}_rows"
    if coarse_before_watermark:
        coarse = f"{name}_late"
        parts.append(f"{coarse} AS (\n    SELECT * FROM {name}_rows "
                     f"WHERE bucket < {ROLLED_UNTIL}\n)")
    parts += [f"{name}_{tier}_upsert AS (\n"
              f"    {_upsert(rollup, tier, f'{name}_rows' if tier == 'minute' else coarse)}\n)"
              for tier in rollup.tiers]
    return ",\n".join(parts)


def _coarse_upserts(rollup: Rollup, rows: str) -> str:
    """CTEs that add CTE `rows` (minute rows of `rollup`) to its coarse tiers."""
    return ",\n".join(f"{rollup.table}_{tier}_upsert AS (\n    {_upsert(rollup, tier, rows)}\n)"
                       for tier in rollup.tiers if tier != "minute")


_RANK_BUCKET = {"quarter": "date_bin('6 hours', bucket, TIMESTAMPTZ '2000-01-01 00:00+00')",
                "day": "date_trunc('day', bucket)", "week": "date_trunc('week', bucket)"}


def with_domain_ranks(rows: str) -> str:
    """CTEs that add CTE `rows` (domain rollup rows, by minute, domain and status) to the
    domain ranking tiers."""
    measures = ", ".join(RANK_MEASURES)
    sums = ", ".join(f"sum({m})" if m == "connect_ms_sum" else f"{ISUM}({m})"
                     for m in RANK_MEASURES)
    updates = ", ".join(f"{m} = r.{m} + excluded.{m}" for m in RANK_MEASURES)
    return ",\n".join(
        f"{table}_upsert AS (\n"
        f"    INSERT INTO {table} AS r (bucket, domain, registered_domain, {measures})\n"
        f"    SELECT {_RANK_BUCKET[tier]}, domain, max(registered_domain), {sums}\n"
        f"    FROM {rows} GROUP BY 1, domain ORDER BY 1, domain\n"
        f"    ON CONFLICT (bucket, domain) DO UPDATE SET registered_domain = "
        f"coalesce(excluded.registered_domain, r.registered_domain), {updates}\n)"
        for tier, table in DOMAIN_RANK_TABLES.items())


_QUEUE_COLUMNS = ("started_bucket, ended_bucket, node_id, source_ip, user_name, domain, "
                  "registered_domain, status, connections, connect_ms, bytes_in, bytes_out")


def queue_rows(rollup: Rollup) -> str:
    """What `rollup_queue` still holds for `rollup`, as rollup rows (one per fact)."""
    keys = ", ".join(rollup.keys)
    extras = "".join(f", {column}" for column, _, _ in rollup.extra)
    histogram = ", ".join(f"coalesce(({condition})::int, 0)::bigint"
                          for condition in _bucket_filters("connect_ms"))
    zeros = ", ".join("0::bigint" for _ in LATENCY_COLUMNS)
    same = "ended_bucket = started_bucket"
    return (
        f"SELECT started_bucket, {keys}{extras}, connections::bigint, "
        f"CASE WHEN {same} THEN bytes_in ELSE 0 END, "
        f"CASE WHEN {same} THEN bytes_out ELSE 0 END, "
        f"(connect_ms IS NOT NULL)::int::bigint, coalesce(connect_ms, 0), connect_ms, "
        f"{histogram} FROM rollup_queue WHERE (connections > 0 OR {same}) AND {rollup.where} "
        f"UNION ALL "
        f"SELECT ended_bucket, {keys}{extras}, 0::bigint, bytes_in, bytes_out, 0::bigint, "
        f"0::double precision, NULL::double precision, {zeros} FROM rollup_queue "
        f"WHERE ended_bucket <> started_bucket AND (bytes_in > 0 OR bytes_out > 0) "
        f"AND {rollup.where}"
    )


# The final events of a batch, staged by COPY: the rows that are new (ON CONFLICT skips the
# ones already stored, which makes a retried batch a no-op) go into traffic_logs, and only
# those rows feed the rollups. A connection counts in the minute it started; its bytes, less
# what interim reports already put into the rollups, in the minute it ended. Every rollup
# gets one queue row per new event, rolled forward later (ROLL_FORWARD).
INSERT_EVENTS = f"""
WITH inserted AS (
    INSERT INTO traffic_logs ({_EVENT_LIST})
    SELECT {_EVENT_LIST} FROM {STAGE_TABLE}
    ON CONFLICT (started_at, event_id) DO NOTHING
    RETURNING event_id, node_id, started_at, ended_at, source_ip, user_name, domain,
              registered_domain, status, connect_ms, bytes_in, bytes_out
),
progress AS (
    DELETE FROM connection_progress p USING inserted i
    WHERE p.event_id = i.event_id
    RETURNING p.event_id, p.bytes_in, p.bytes_out
),
remainder AS (
    SELECT i.*, greatest(i.bytes_in - coalesce(p.bytes_in, 0), 0) AS rest_in,
           greatest(i.bytes_out - coalesce(p.bytes_out, 0), 0) AS rest_out
    FROM inserted i LEFT JOIN progress p ON p.event_id = i.event_id
),
queued AS (
    INSERT INTO rollup_queue ({_QUEUE_COLUMNS})
    SELECT date_trunc('minute', started_at), date_trunc('minute', ended_at), node_id,
           source_ip, user_name, domain, registered_domain, status, 1, connect_ms, rest_in,
           rest_out
    FROM remainder
)
SELECT count(*) FROM inserted
"""

# The same for a batch none of whose events is stored yet (the common case): a plain INSERT
# costs less than one that checks every row for a conflict first (about 1.6 µs an event).
# Run in a savepoint: a duplicate is a unique violation, and the batch then goes again through
# INSERT_EVENTS, which skips the rows already stored (a resent batch fails at its first row).
INSERT_NEW_EVENTS = INSERT_EVENTS.replace(
    "\n    ON CONFLICT (started_at, event_id) DO NOTHING\n", "\n", 1)
assert INSERT_NEW_EVENTS != INSERT_EVENTS
NEW_EVENTS_SAVEPOINT = "SAVEPOINT s5a_new_events"
ROLLBACK_NEW_EVENTS = "ROLLBACK TO SAVEPOINT s5a_new_events"

# Interim reports of open connections: each adds to the rollups the growth of its cumulative
# counts over the largest already seen (stored in connection_progress, or earlier in the same
# batch), in the minute of the report. A report for a connection whose final row is already
# stored is ignored: the final event accounted for all its bytes.
APPLY_INTERIM = f"""
WITH reports AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                         $5::inet[], $6::text[], $7::text[], $8::text[], $9::bigint[],
                         $10::bigint[])
        AS t(event_id, node_id, started_at, reported_at, source_ip, user_name, domain,
             registered_domain, bytes_out, bytes_in)
),
live AS (
    SELECT rp.* FROM reports rp
    WHERE NOT EXISTS (
        SELECT 1 FROM traffic_logs t
        WHERE t.started_at = rp.started_at AND t.event_id = rp.event_id
    )
),
previous AS (
    SELECT p.event_id, p.bytes_in, p.bytes_out FROM connection_progress p
    WHERE p.event_id IN (SELECT event_id FROM live)
    FOR UPDATE
),
steps AS (
    SELECT l.*,
           greatest(coalesce(pv.bytes_in, 0), coalesce(max(l.bytes_in) OVER earlier, 0))
               AS seen_in,
           greatest(coalesce(pv.bytes_out, 0), coalesce(max(l.bytes_out) OVER earlier, 0))
               AS seen_out
    FROM live l LEFT JOIN previous pv ON pv.event_id = l.event_id
    WINDOW earlier AS (PARTITION BY l.event_id ORDER BY l.reported_at, l.bytes_in, l.bytes_out
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
saved AS (
    INSERT INTO connection_progress AS p (event_id, started_at, bytes_in, bytes_out, updated_at)
    SELECT event_id, min(started_at), max(bytes_in), max(bytes_out), max(reported_at)
    FROM live GROUP BY event_id ORDER BY event_id
    ON CONFLICT (event_id) DO UPDATE SET
        bytes_in = greatest(p.bytes_in, excluded.bytes_in),
        bytes_out = greatest(p.bytes_out, excluded.bytes_out),
        updated_at = greatest(p.updated_at, excluded.updated_at)
),
facts AS (
    SELECT date_trunc('minute', reported_at) AS bucket, node_id, source_ip, user_name, domain,
           registered_domain, 'ok'::text AS status, 0::bigint AS connections,
           greatest(bytes_in - seen_in, 0) AS bytes_in,
           greatest(bytes_out - seen_out, 0) AS bytes_out,
           NULL::double precision AS connect_ms
    FROM steps WHERE bytes_in > seen_in OR bytes_out > seen_out
),
queued AS (
    INSERT INTO rollup_queue ({_QUEUE_COLUMNS})
    SELECT bucket, bucket, node_id, source_ip, user_name, domain, registered_domain, status,
           0, NULL, bytes_in, bytes_out
    FROM facts
)
SELECT count(*) FROM live
"""

# Orders the writes of a connection's interim reports against the writes of final events.
# Neither sees the other's uncommitted rows: an interim report written beside its own
# connection's final event would find no final row and count its growth, while the final
# found no progress row and counted all its bytes, so those bytes counted twice. A batch
# with interim reports takes this lock exclusively, a batch of final events only shared
# (final events never wait for each other), each before the statements that look; the next
# statement's snapshot then sees what the other committed. One key, not one per connection:
# a batch of thousands of events would touch every stripe of any striping anyway.
# An arbitrary constant: "S5AP".
PROGRESS_LOCK = 0x53_35_41_50
LOCK_PROGRESS_FOR_INTERIMS = f"SELECT pg_advisory_xact_lock({PROGRESS_LOCK})"
LOCK_PROGRESS_FOR_EVENTS = f"SELECT pg_advisory_xact_lock_shared({PROGRESS_LOCK})"
# A batch of events alone takes its shared lock in the round trip that makes its stage.
CREATE_STAGE_FOR_EVENTS = f"{CREATE_STAGE}; {LOCK_PROGRESS_FOR_EVENTS}"

# One maintenance pass at a time across every collector (session-level, held by one pooled
# connection for the pass; asyncpg's reset on release lets it go in any case): "S5AM".
MAINTENANCE_LOCK = 0x53_35_41_4D
TRY_MAINTENANCE_LOCK = f"SELECT pg_try_advisory_lock({MAINTENANCE_LOCK})"
UNLOCK_MAINTENANCE = f"SELECT pg_advisory_unlock({MAINTENANCE_LOCK})"

# Serializes roll-forwards (an arbitrary constant: "S5AR"); a busy one is skipped, not waited
# for, by the roll-forward that follows a commit.
ROLL_FORWARD_LOCK = 0x53_35_41_52
TRY_ROLL_FORWARD_LOCK = f"SELECT pg_try_advisory_xact_lock({ROLL_FORWARD_LOCK})"
WAIT_ROLL_FORWARD_LOCK = f"SELECT pg_advisory_xact_lock({ROLL_FORWARD_LOCK})"

# Day-partitioned tiers only: a weekly partition outlives its first days (it goes with its
# last one), so it says nothing about which days are still kept.
_DEFERRED_TABLES = ", ".join(f"'{rollup.tier_table(tier)}'" for rollup in ROLLUPS
                             if rollup.deferred for tier in TIERS)

# The first day every rollup still has (the daily domain tier's oldest partition), for
# readers of the weekly tier: a week whose Monday is gone is read from its remaining days.
# (Names through regclass, not a join with pg_class: the planner would scan all of it.)
OLDEST_DAY = (
    "(SELECT min(to_date(substring(i.inhrelid::regclass::text from '_p([0-9]{8})$'), "
    "'YYYYMMDD'))::timestamp AT TIME ZONE 'UTC' FROM pg_inherits i "
    "WHERE i.inhparent = 'rollup_domains_day'::regclass AND NOT i.inhdetachpending)"
)

# Takes up to $1 queued rows and adds them to the minute tier of every rollup (and to its
# coarse tiers, for minutes before the roll-up's watermark), all in the caller's
# transaction: a row is either still queued or in the tiers, never both. A row whose
# connection started and ended in one minute is one fact there, else two. Facts
# dated before the oldest day that every tier still has (retention dropped the day while
# they were queued) are dropped with their day.
ROLL_FORWARD = f"""
WITH taken AS (
    DELETE FROM rollup_queue
    WHERE ctid = ANY (ARRAY(SELECT ctid FROM rollup_queue LIMIT $1))
    RETURNING *
),
kept AS (
    SELECT max(first_day)::timestamp AT TIME ZONE 'UTC' AS since
    FROM (
        SELECT min(to_date(substring(c.relname from '_p([0-9]{{8}})$'), 'YYYYMMDD'))
                   AS first_day
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = ANY (ARRAY[{_DEFERRED_TABLES}]::regclass[])
          AND NOT i.inhdetachpending AND c.relname ~ '_p[0-9]{{8}}$'
        GROUP BY i.inhparent
    ) AS per_table
),
facts AS (
    SELECT started_bucket AS bucket, node_id, source_ip, user_name, domain,
           registered_domain, status, connections::bigint AS connections,
           CASE WHEN same THEN bytes_in ELSE 0 END AS bytes_in,
           CASE WHEN same THEN bytes_out ELSE 0 END AS bytes_out, connect_ms
    FROM (SELECT *, ended_bucket = started_bucket AS same FROM taken) AS t
    WHERE (connections > 0 OR same) AND started_bucket >= (SELECT since FROM kept)
    UNION ALL
    SELECT ended_bucket, node_id, source_ip, user_name, domain, registered_domain, status,
           0, bytes_in, bytes_out, NULL
    FROM taken WHERE ended_bucket <> started_bucket AND (bytes_in > 0 OR bytes_out > 0)
                     AND ended_bucket >= (SELECT since FROM kept)
),
{with_tiers(TOTALS, "facts", coarse_before_watermark=True)},
{with_tiers(DOMAINS, "facts", coarse_before_watermark=True)},
{with_domain_ranks("rollup_domains_late")},
{with_tiers(CLIENTS, "facts", coarse_before_watermark=True)}
SELECT count(*) FROM taken
"""


def _minute_rows(rollup: Rollup) -> str:
    return (f"{rollup.table}_rows AS (\n"
            f"    SELECT {', '.join(rollup.row_columns)} FROM {rollup.table}\n"
            f"    WHERE bucket >= (SELECT at FROM since) AND bucket < $1\n)")


# Adds the minutes in [watermark, $1) of the deferred families' minute tiers to their coarse
# tiers and moves the watermark to $1 (never back), in the caller's transaction, under the
# roll-forward lock: a minute is counted in a coarse tier by exactly one of the roll-forward
# (before the watermark) and this (after it). Returns the watermark now. Each key's coarse
# rows are written once per roll-up, where the roll-forward would write them once per chunk.
ROLL_UP = f"""
WITH since AS (
    SELECT rolled_until AS at FROM {WATERMARK_TABLE}
),
moved AS (
    UPDATE {WATERMARK_TABLE} SET rolled_until = $1 WHERE rolled_until < $1
),
{_minute_rows(TOTALS)},
{_coarse_upserts(TOTALS, "rollup_totals_rows")},
{_minute_rows(DOMAINS)},
{_coarse_upserts(DOMAINS, "rollup_domains_rows")},
{with_domain_ranks("rollup_domains_rows")},
{_minute_rows(CLIENTS)},
{_coarse_upserts(CLIENTS, "rollup_clients_rows")}
SELECT greatest((SELECT at FROM since), $1::timestamptz)
"""

# Run first in a ranking's transaction. Ranks one hash aggregate over at most a few hundred
# thousand narrow rows without parallel workers: their start-up and sorted merge cost more
# than they save (10 M events, 24 h: 46-50 ms serial, 80-110 ms with 2 workers, 2 busy
# cores). Answers whether the ranking may sum its integers (connections, bytes, measured
# connections) as doubles: it may when the connections and bytes stored add up to less
# than 2^51 (every event and interim report is in the daily totals tier, the minute tier
# from the roll-up's watermark on, or the queue; $1, a watermark once seen, spares planning
# the minute partitions before it). A ranking reads each stored minute
# through at most 4 signed pieces (a week, less a day, plus an hour, less a minute), so
# every partial sum it makes is then an integer of
# magnitude under 2^53, which a double holds exactly; else the sums stay numeric.
RANKING_SETUP = f"""
SELECT set_config('max_parallel_workers_per_gather', '0', true) IS NOT NULL
   AND coalesce((SELECT sum(connections) + sum(bytes_in) + sum(bytes_out)
                 FROM rollup_totals_day), 0)
     + coalesce((SELECT sum(connections) + sum(bytes_in) + sum(bytes_out)
                 FROM rollup_totals WHERE bucket >= {ROLLED_UNTIL} AND bucket >= $1), 0)
     + coalesce((SELECT sum(connections) + sum(bytes_in) + sum(bytes_out)
                 FROM rollup_queue), 0) < 2 ^ 51
"""

QUEUE_LENGTH = "SELECT count(*) FROM rollup_queue"
# Outside a transaction. Without truncation: that would take an exclusive lock on the queue
# (which every batch appends to) only to give back pages the next batches fill again.
VACUUM_QUEUE = "VACUUM (SKIP_LOCKED, TRUNCATE false) rollup_queue"

UPSERT_NODE = """
INSERT INTO proxy_nodes AS n
    (node_id, version, started_at, last_seen, policy_version, active_connections)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (node_id) DO UPDATE SET
    version = excluded.version,
    started_at = excluded.started_at,
    last_seen = excluded.last_seen,
    policy_version = excluded.policy_version,
    active_connections = excluded.active_connections
WHERE n.last_seen <= excluded.last_seen
"""

# {where}: conditions on `n`; {page}: LIMIT and OFFSET.
SELECT_NODES = """
SELECT n.node_id, n.version, n.started_at, n.last_seen, n.policy_version,
       n.active_connections, count(*) OVER () AS total
FROM proxy_nodes n WHERE {where} ORDER BY n.node_id {page}
"""

COUNT_NODES = "SELECT count(*) FROM proxy_nodes n WHERE {where}"

CREATE_PARTITIONS = "SELECT s5a_create_day_partitions($1::date, $2::date)"

# Daily partitions of our partitioned tables, by the day in their name; `pending` is a
# partition whose DETACH ... CONCURRENTLY was interrupted and must be finalized.
LIST_PARTITIONS = """
SELECT parent.relname AS parent, child.relname AS child,
       to_date(substring(child.relname from '_p([0-9]{8})$'), 'YYYYMMDD') AS day,
       i.inhdetachpending AS pending
FROM pg_inherits i
JOIN pg_class parent ON parent.oid = i.inhparent
JOIN pg_class child ON child.oid = i.inhrelid
WHERE parent.relname = ANY($1::text[])
  AND parent.relnamespace = to_regnamespace(current_schema())
  AND child.relname ~ '_p[0-9]{8}$'
ORDER BY day, parent.relname
"""

# Tables left detached by a pass that died between DETACH and DROP.
LIST_ORPHANS = """
SELECT c.relname AS child,
       to_date(substring(c.relname from '_p([0-9]{8})$'), 'YYYYMMDD') AS day
FROM pg_class c
WHERE c.relkind = 'r' AND NOT c.relispartition
  AND c.relnamespace = to_regnamespace(current_schema())
  AND c.relname ~ ('^(' || array_to_string($1::text[], '|') || ')_p[0-9]{8}$')
"""

PURGE_PROGRESS = "DELETE FROM connection_progress WHERE updated_at < $1"
PURGE_NODES = "DELETE FROM proxy_nodes WHERE last_seen < $1"
