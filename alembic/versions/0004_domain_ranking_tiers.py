"""Ranking tiers of the domain rollups: per quarter day, UTC day and ISO week, no status.

Why: a page of top domains (or of latency by domain) is ranked by one sum over every
domain of the window. The domain rollups are keyed by domain and status, and the statuses
multiply the keys: at 10 M events a month a week holds ~47,000 domain-and-status keys for
~20,000 domains, a day ~23,600 for ~16,800. These tables hold only the sums a ranking and
a page of top domains read (connections, bytes, measured connections and their connect
time) per domain, so an unfiltered 30-day ranking adds up less than half the rows. The
quarter-day tier (6 hours from 00:00 UTC: ~9,600 domains where six hourly rows hold
~21,500 keys) serves the partial days of a 24-hour window.
Queries filtered by status still read the domain rollups.

Partitioned like their siblings (the weekly one by ISO week, each partition named by its
Monday); the partition function now creates theirs too. Upgrading fills them from the
hourly, daily and weekly domain tiers; downgrading drops them (those tiers hold everything they
did) and puts the partition function of 0003 back.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Frozen copies (a migration never imports the application).
DAILY_0003 = (
    "traffic_logs", "rollup_totals", "rollup_domains", "rollup_clients",
    "rollup_totals_hour", "rollup_totals_day", "rollup_domains_hour", "rollup_domains_day",
    "rollup_clients_hour", "rollup_clients_day",
)
WEEKLY_0003 = ("rollup_domains_week",)
# ranking table: (the domain tier it sums, its bucket from that tier's, partitioned by week)
RANKS = {
    "rollup_domain_ranks_quarter": (
        "rollup_domains_hour", "date_bin('6 hours', bucket, TIMESTAMPTZ '2000-01-01 00:00+00')",
        False),
    "rollup_domain_ranks_day": ("rollup_domains_day", "bucket", False),
    "rollup_domain_ranks_week": ("rollup_domains_week", "bucket", True),
}
DAILY = DAILY_0003 + tuple(name for name, (_, _, weekly) in RANKS.items() if not weekly)
WEEKLY = WEEKLY_0003 + tuple(name for name, (_, _, weekly) in RANKS.items() if weekly)


def _partition_function(daily: tuple[str, ...], weekly: tuple[str, ...]) -> str:
    """s5a_create_day_partitions: each day's partition of the daily tables, and the
    partition of the day's ISO week of the weekly ones (as in 0003)."""
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


def _create(name: str) -> str:
    return f"""
CREATE TABLE {name} (
    bucket  timestamptz NOT NULL,
    domain text NOT NULL,
    registered_domain text,
    connections    bigint NOT NULL DEFAULT 0 CHECK (connections >= 0),
    bytes_in       bigint NOT NULL DEFAULT 0 CHECK (bytes_in >= 0),
    bytes_out      bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0),
    connect_count  bigint NOT NULL DEFAULT 0 CHECK (connect_count >= 0),
    connect_ms_sum double precision NOT NULL DEFAULT 0,
    CONSTRAINT {name}_pkey PRIMARY KEY (bucket, domain)
) PARTITION BY RANGE (bucket)
"""


def _backfill(name: str, source: str, bucket: str) -> str:
    return (f"INSERT INTO {name} (bucket, domain, registered_domain, connections, bytes_in, "
            f"bytes_out, connect_count, connect_ms_sum)\n"
            f"SELECT {bucket}, domain, max(registered_domain), sum(connections), "
            f"sum(bytes_in), sum(bytes_out), sum(connect_count), sum(connect_ms_sum)\n"
            f"FROM {source} GROUP BY 1, domain")


# The partitions of every day the daily domain tier has (and their weeks).
_PARTITIONS_FOR_EXISTING_DAYS = """
SELECT s5a_create_day_partitions(min(day), max(day))
FROM (
    SELECT to_date(substring(c.relname from '_p([0-9]{8})$'), 'YYYYMMDD') AS day
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'rollup_domains_day'::regclass
) AS days
HAVING count(*) > 0
"""

_PERIOD = {"rollup_domain_ranks_quarter": "Per-6-hour (from 00:00 UTC)",
           "rollup_domain_ranks_day": "Per-UTC-day", "rollup_domain_ranks_week": "Per-ISO-week"}

UPGRADE = [
    *(statement for name, (source, _, _) in RANKS.items() for statement in (
        _create(name),
        f"COMMENT ON TABLE {name} IS '{_PERIOD[name]} sums of {source} over the statuses: "
        f"what a ranking of domains reads.'",
    )),
    _partition_function(DAILY, WEEKLY),
    _PARTITIONS_FOR_EXISTING_DAYS,
    *(_backfill(name, source, bucket) for name, (source, bucket, _) in RANKS.items()),
]

DOWNGRADE = [
    _partition_function(DAILY_0003, WEEKLY_0003),
    *(f"DROP TABLE {name}" for name in reversed(RANKS)),
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
