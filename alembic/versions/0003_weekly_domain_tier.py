"""A weekly tier of the domain rollups.

Why: about 17,000 domains are active on a busy day, nearly all of them every day, so a
30-day top-K over the daily domain tier adds up ~700,000 rows; over ISO weeks (Monday
00:00 UTC), with days at the edges, it adds up a third of that. Only the domains get one: the
totals and the clients already meet their targets from the daily tier, and every tier is
more work for the roll-forward.

The table is keyed like `rollup_domains_day` and partitioned by week (each partition named
by its Monday, `_pYYYYMMDD`); the partition function now creates the week of every day it
prepares. Upgrading fills it from the daily tier; downgrading drops it (the daily tier
holds everything it did).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Frozen copies (a migration never imports the application).
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_LATENCY_COLUMNS = [f"lat_le_{bound}" for bound in LATENCY_BUCKETS_MS] + ["lat_le_inf"]
DAILY_0002 = (
    "traffic_logs", "rollup_totals", "rollup_domains", "rollup_clients",
    "rollup_totals_hour", "rollup_totals_day", "rollup_domains_hour", "rollup_domains_day",
    "rollup_clients_hour", "rollup_clients_day",
)
WEEKLY = ("rollup_domains_week",)

_HISTOGRAM_COLUMNS = ",\n    ".join(f"{column} bigint NOT NULL DEFAULT 0"
                                    for column in _LATENCY_COLUMNS)
_MEASURE_LIST = ", ".join(("connections", "bytes_in", "bytes_out", "connect_count",
                           "connect_ms_sum", "connect_ms_max", *_LATENCY_COLUMNS))


def _partition_function(daily: tuple[str, ...], weekly: tuple[str, ...]) -> str:
    """s5a_create_day_partitions: each day's partition of the daily tables, and the
    partition of the day's ISO week of the weekly ones."""
    daily_names = ", ".join(f"'{name}'" for name in daily)
    weekly_names = ", ".join(f"'{name}'" for name in weekly) or "NULL"
    return f"""
CREATE OR REPLACE FUNCTION s5a_create_day_partitions(first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $body$
DECLARE
    parent text;
    day date;
    lower_day date;
    span integer;
    part text;
BEGIN
    FOREACH parent IN ARRAY ARRAY[{daily_names}, {weekly_names}]::text[] LOOP
        CONTINUE WHEN parent IS NULL;
        span := CASE WHEN parent = ANY (ARRAY[{weekly_names}]::text[]) THEN 7 ELSE 1 END;
        day := first_day;
        WHILE day <= last_day LOOP
            lower_day := CASE WHEN span = 7 THEN day - (extract(isodow FROM day)::integer - 1)
                              ELSE day END;
            part := parent || '_p' || to_char(lower_day, 'YYYYMMDD');
            IF to_regclass(part) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                        part, parent,
                        lower_day::timestamp AT TIME ZONE 'UTC',
                        (lower_day + span)::timestamp AT TIME ZONE 'UTC');
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


_CREATE = f"""
CREATE TABLE rollup_domains_week (
    bucket  timestamptz NOT NULL,
    domain text NOT NULL,
    registered_domain text,
    status text NOT NULL,
    connections    bigint NOT NULL DEFAULT 0 CHECK (connections >= 0),
    bytes_in       bigint NOT NULL DEFAULT 0 CHECK (bytes_in >= 0),
    bytes_out      bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0),
    connect_count  bigint NOT NULL DEFAULT 0 CHECK (connect_count >= 0),
    connect_ms_sum double precision NOT NULL DEFAULT 0,
    connect_ms_max double precision,
    {_HISTOGRAM_COLUMNS},
    CONSTRAINT rollup_domains_week_pkey PRIMARY KEY (bucket, domain, status)
) PARTITION BY RANGE (bucket)
"""

# Weeks for every day the daily tier has.
_PARTITIONS_FOR_EXISTING_DAYS = """
SELECT s5a_create_day_partitions(min(day), max(day))
FROM (
    SELECT to_date(substring(c.relname from '_p([0-9]{8})$'), 'YYYYMMDD') AS day
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'rollup_domains_day'::regclass
) AS days
HAVING count(*) > 0
"""

_SUMS = ", ".join(f"sum({column})" for column in
                  ("connections", "bytes_in", "bytes_out", "connect_count", "connect_ms_sum"))
_BACKFILL = (
    f"INSERT INTO rollup_domains_week (bucket, domain, status, registered_domain, "
    f"{_MEASURE_LIST})\n"
    f"SELECT date_trunc('week', bucket, 'UTC'), domain, status, max(registered_domain), "
    f"{_SUMS}, max(connect_ms_max), "
    f"{', '.join(f'sum({column})' for column in _LATENCY_COLUMNS)}\n"
    f"FROM rollup_domains_day GROUP BY 1, domain, status"
)

UPGRADE = [
    _CREATE,
    "COMMENT ON TABLE rollup_domains_week IS "
    "'Per-ISO-week sums, keyed like rollup_domains (its per-minute tier).'",
    _partition_function(DAILY_0002, WEEKLY),
    _PARTITIONS_FOR_EXISTING_DAYS,
    _BACKFILL,
]

DOWNGRADE = [
    _partition_function(DAILY_0002, ()),
    "DROP TABLE rollup_domains_week",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
