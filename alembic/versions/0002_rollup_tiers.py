"""Hourly and daily rollup tiers, and a queue that keeps the wide rollups off the insert.

Why: a 30-day top-K over per-minute rollups of high-cardinality keys (domains, clients)
reads nearly one rollup row per event; whole days and hours now come from `*_day` and
`*_hour` tables keyed like the minute ones, and only the edges of a window from the
minutes. The domain and client rollups (thousands of rows per batch) are no longer
upserted by the insert itself: it appends one narrow row per new event (or interim growth)
to `rollup_queue`, and a roll-forward moves the queue into the minute, hour and day tables
in one transaction (readers add what is still queued, so answers stay exact). The totals
rollups (by node and status, a few rows per batch) stay in the insert's transaction.

The new tiers are filled from the existing minute rollups, so a deployed 0001 database
keeps its history. Partitioned by UTC day like everything else, so retention drops a day
of every tier together.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Frozen copies (a migration never imports the application).
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_LATENCY_COLUMNS = [f"lat_le_{bound}" for bound in LATENCY_BUCKETS_MS] + ["lat_le_inf"]
OLD_PARTITIONED = ("traffic_logs", "rollup_totals", "rollup_domains", "rollup_clients")
TIERS = ("hour", "day")
FAMILIES = {
    # table: (key columns after bucket, their DDL)
    "rollup_totals": (("node_id", "status"), "node_id text NOT NULL,\n    status text NOT NULL"),
    "rollup_domains": (("domain", "status"),
                       "domain text NOT NULL,\n    registered_domain text,\n"
                       "    status text NOT NULL"),
    "rollup_clients": (("source_ip", "user_name", "status"),
                       "source_ip inet NOT NULL,\n    user_name text NOT NULL,\n"
                       "    status text NOT NULL"),
}
NEW_TABLES = tuple(f"{family}_{tier}" for family in FAMILIES for tier in TIERS)
PARTITIONED = OLD_PARTITIONED + NEW_TABLES

_HISTOGRAM_COLUMNS = ",\n    ".join(f"{column} bigint NOT NULL DEFAULT 0"
                                    for column in _LATENCY_COLUMNS)
_MEASURES = f"""
    connections    bigint NOT NULL DEFAULT 0 CHECK (connections >= 0),
    bytes_in       bigint NOT NULL DEFAULT 0 CHECK (bytes_in >= 0),
    bytes_out      bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0),
    connect_count  bigint NOT NULL DEFAULT 0 CHECK (connect_count >= 0),
    connect_ms_sum double precision NOT NULL DEFAULT 0,
    connect_ms_max double precision,
    {_HISTOGRAM_COLUMNS}"""
_SUMS = ", ".join(f"sum({column})" for column in
                  ("connections", "bytes_in", "bytes_out", "connect_count", "connect_ms_sum"))
_MEASURE_LIST = ", ".join(("connections", "bytes_in", "bytes_out", "connect_count",
                           "connect_ms_sum", "connect_ms_max", *_LATENCY_COLUMNS))


def _partition_function(tables: tuple[str, ...]) -> str:
    names = ", ".join(f"'{name}'" for name in tables)
    return f"""
CREATE OR REPLACE FUNCTION s5a_create_day_partitions(first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $body$
DECLARE
    parent text;
    day date;
    part text;
BEGIN
    FOREACH parent IN ARRAY ARRAY[{names}] LOOP
        day := first_day;
        WHILE day <= last_day LOOP
            part := parent || '_p' || to_char(day, 'YYYYMMDD');
            IF to_regclass(part) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                        part, parent,
                        day::timestamp AT TIME ZONE 'UTC',
                        (day + 1)::timestamp AT TIME ZONE 'UTC');
                    RETURN NEXT part;
                EXCEPTION WHEN duplicate_table THEN
                    NULL;  -- another process created it first
                END;
            END IF;
            day := day + 1;
        END LOOP;
    END LOOP;
END
$body$
"""


def _create_tier(family: str, tier: str) -> str:
    keys, key_ddl = FAMILIES[family]
    table = f"{family}_{tier}"
    return f"""
CREATE TABLE {table} (
    bucket  timestamptz NOT NULL,
    {key_ddl},{_MEASURES},
    CONSTRAINT {table}_pkey PRIMARY KEY (bucket, {", ".join(keys)})
) PARTITION BY RANGE (bucket)
"""


def _backfill(family: str, tier: str) -> str:
    keys, _ = FAMILIES[family]
    key_list = ", ".join(keys)
    extra = ", registered_domain" if family == "rollup_domains" else ""
    extra_agg = ", max(registered_domain)" if family == "rollup_domains" else ""
    histogram = ", ".join(f"sum({column})" for column in _LATENCY_COLUMNS)
    return (
        f"INSERT INTO {family}_{tier} (bucket, {key_list}{extra}, {_MEASURE_LIST})\n"
        f"SELECT date_trunc('{tier}', bucket), {key_list}{extra_agg}, {_SUMS}, "
        f"max(connect_ms_max), {histogram}\n"
        f"FROM {family} GROUP BY date_trunc('{tier}', bucket), {key_list}"
    )


# Partitions of the new tiers for every day the minute rollups already have.
_PARTITIONS_FOR_EXISTING_DAYS = """
SELECT s5a_create_day_partitions(min(day), max(day))
FROM (
    SELECT to_date(substring(c.relname from '_p([0-9]{8})$'), 'YYYYMMDD') AS day
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'rollup_totals'::regclass
) AS days
HAVING count(*) > 0
"""

UPGRADE = [
    *(_create_tier(family, tier) for family in FAMILIES for tier in TIERS),
    *(f"COMMENT ON TABLE {family}_{tier} IS "
      f"'Per-{tier} sums, keyed like {family} (its per-minute tier).'"
      for family in FAMILIES for tier in TIERS),
    """
CREATE TABLE rollup_queue (
    started_bucket    timestamptz NOT NULL,
    ended_bucket      timestamptz NOT NULL,
    source_ip         inet        NOT NULL,
    user_name         text        NOT NULL,
    domain            text,
    registered_domain text,
    status            text        NOT NULL,
    connections       integer     NOT NULL CHECK (connections IN (0, 1)),
    connect_ms        double precision,
    bytes_in          bigint      NOT NULL CHECK (bytes_in >= 0),
    bytes_out         bigint      NOT NULL CHECK (bytes_out >= 0)
)
""",
    "COMMENT ON TABLE rollup_queue IS "
    "'Domain and client rollup deltas not yet rolled forward: a new event counts its "
    "connection in started_bucket and its bytes in ended_bucket; an interim report has "
    "connections 0 and both buckets at its minute.'",
    _partition_function(PARTITIONED),
    _PARTITIONS_FOR_EXISTING_DAYS,
    *(_backfill(family, tier) for family in FAMILIES for tier in TIERS),
]



def _drain_queue(family: str) -> str:
    """Put what is still queued into the minute rollups, where 0001's code expects it."""
    keys, _ = FAMILIES[family]
    key_list = ", ".join(keys)
    extra = ", registered_domain" if family == "rollup_domains" else ""
    extra_agg = ", max(registered_domain)" if family == "rollup_domains" else ""
    where = "domain IS NOT NULL" if family == "rollup_domains" else "TRUE"
    lower: int | None = None
    histogram = []
    for bound in LATENCY_BUCKETS_MS:
        low = f"connect_ms > {lower} AND " if lower is not None else ""
        histogram.append(f"count(*) FILTER (WHERE {low}connect_ms <= {bound})")
        lower = bound
    histogram.append(f"count(*) FILTER (WHERE connect_ms > {lower})")
    updates = ", ".join(
        ["connect_ms_max = greatest(r.connect_ms_max, excluded.connect_ms_max)"]
        + [f"{m} = r.{m} + excluded.{m}" for m in _MEASURE_LIST.split(", ")
           if m != "connect_ms_max"]
        + (["registered_domain = coalesce(excluded.registered_domain, r.registered_domain)"]
           if extra else []))
    return f"""
WITH facts AS (
    SELECT started_bucket AS bucket, source_ip, user_name, domain, registered_domain, status,
           connections, 0::bigint AS bytes_in, 0::bigint AS bytes_out, connect_ms
    FROM rollup_queue WHERE connections > 0
    UNION ALL
    SELECT ended_bucket, source_ip, user_name, domain, registered_domain, status, 0,
           bytes_in, bytes_out, NULL
    FROM rollup_queue WHERE bytes_in > 0 OR bytes_out > 0
)
INSERT INTO {family} AS r (bucket, {key_list}{extra}, {_MEASURE_LIST})
SELECT bucket, {key_list}{extra_agg}, sum(connections), sum(bytes_in), sum(bytes_out),
       count(connect_ms), coalesce(sum(connect_ms), 0), max(connect_ms), {", ".join(histogram)}
FROM facts WHERE {where} GROUP BY bucket, {key_list}
ON CONFLICT (bucket, {key_list}) DO UPDATE SET {updates}
"""


DOWNGRADE = [
    _drain_queue("rollup_domains"),
    _drain_queue("rollup_clients"),
    _partition_function(OLD_PARTITIONED),
    "DROP TABLE rollup_queue",
    *(f"DROP TABLE {table}" for table in reversed(NEW_TABLES)),
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
