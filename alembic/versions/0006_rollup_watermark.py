"""A watermark for the coarse rollup tiers; the totals through the queue too.

Why: every event the roll-forward took became about 2.5 upserted tier rows, one per key
and tier for each chunk of the queue: the same hour, day and week row of a busy domain
was rewritten by every chunk. Now the roll-forward writes the minute tiers only, and the
coarse tiers (hour, day, week; the domain ranking tiers) are filled from the minute tier a
few minutes behind, once per key for each span rolled up. `rollup_watermark` says where
that is: the coarse tiers hold exactly the minutes before `rolled_until`, the minute tiers
every minute, and readers take the minutes from `rolled_until` on from the minute tier.
A fact for a minute already rolled up (a long connection, a replayed spool) still goes to
every tier at once.

The totals (by node and status) were added to their three tiers by each batch's own
transaction, which made the batch wait for them; they now go through the queue like the
domains and clients, which needs the node there: `rollup_queue.node_id`. Rows queued
before have none (NULL), and stay out of the totals, which already hold them.

Upgrading starts the watermark just after the last minute stored (minus infinity when
nothing is), so what the tiers already hold stays exactly right. Downgrading first rolls
every minute from the watermark on into the coarse tiers, and adds what the queue holds
for the totals to their tiers, so that every tier holds everything again, as the code of
0005 expects; then it drops the column and the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from itertools import pairwise

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Frozen copies (a migration never imports the application).
LATENCY_COLUMNS = (*(f"lat_le_{bound}" for bound in (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)), "lat_le_inf")
MEASURES = ("connections", "bytes_in", "bytes_out", "connect_count", "connect_ms_sum",
            "connect_ms_max", *LATENCY_COLUMNS)
RANK_MEASURES = ("connections", "bytes_in", "bytes_out", "connect_count", "connect_ms_sum")
# minute table: (its key after the bucket, its coarse tiers)
FAMILIES = {
    "rollup_totals": (("node_id", "status"), ("hour", "day")),
    "rollup_domains": (("domain", "status"), ("hour", "day", "week")),
    "rollup_clients": (("source_ip", "user_name", "status"), ("hour", "day")),
}
RANKS = {
    "rollup_domain_ranks_quarter":
        "date_bin('6 hours', bucket, TIMESTAMPTZ '2000-01-01 00:00+00')",
    "rollup_domain_ranks_day": "date_trunc('day', bucket)",
    "rollup_domain_ranks_week": "date_trunc('week', bucket)",
}
_SINCE = "bucket >= (SELECT rolled_until FROM rollup_watermark)"


def _roll_up(table: str, keys: tuple[str, ...], tier: str) -> str:
    """Add the minutes from the watermark on to one coarse tier."""
    domain = table == "rollup_domains"
    extra = ["registered_domain"] if domain else []
    columns = ", ".join(["bucket", *keys, *extra, *MEASURES])
    sums = [f"max({m})" if m == "connect_ms_max" else f"sum({m})" for m in MEASURES]
    selected = ", ".join([f"date_trunc('{tier}', bucket)", *keys,
                          *(f"max({c})" for c in extra), *sums])
    updates = [f"{c} = coalesce(excluded.{c}, r.{c})" for c in extra] + [
        f"{m} = greatest(r.{m}, excluded.{m})" if m == "connect_ms_max"
        else f"{m} = r.{m} + excluded.{m}" for m in MEASURES]
    return (f"INSERT INTO {table}_{tier} AS r ({columns})\n"
            f"SELECT {selected} FROM {table} WHERE {_SINCE}\n"
            f"GROUP BY 1, {', '.join(keys)}\n"
            f"ON CONFLICT (bucket, {', '.join(keys)}) DO UPDATE SET {', '.join(updates)}")


def _roll_up_ranks(table: str, bucket: str) -> str:
    measures = ", ".join(RANK_MEASURES)
    sums = ", ".join(f"sum({m})" for m in RANK_MEASURES)
    updates = ", ".join(f"{m} = r.{m} + excluded.{m}" for m in RANK_MEASURES)
    return (f"INSERT INTO {table} AS r (bucket, domain, registered_domain, {measures})\n"
            f"SELECT {bucket}, domain, max(registered_domain), {sums}\n"
            f"FROM rollup_domains WHERE {_SINCE} GROUP BY 1, domain\n"
            f"ON CONFLICT (bucket, domain) DO UPDATE SET registered_domain = "
            f"coalesce(excluded.registered_domain, r.registered_domain), {updates}")


UPGRADE = [
    """
CREATE TABLE rollup_watermark (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    rolled_until timestamptz NOT NULL
)
""",
    "COMMENT ON TABLE rollup_watermark IS 'The coarse tiers of rollup_domains and "
    "rollup_clients (hour, day, week, domain ranks) hold exactly the minutes before "
    "rolled_until; the minute tiers hold every minute.'",
    """
INSERT INTO rollup_watermark (rolled_until)
SELECT coalesce(greatest((SELECT max(bucket) FROM rollup_totals),
                         (SELECT max(bucket) FROM rollup_domains),
                         (SELECT max(bucket) FROM rollup_clients)) + interval '1 minute',
                '-infinity')
""",
    "ALTER TABLE rollup_queue ADD COLUMN node_id text",
    "COMMENT ON COLUMN rollup_queue.node_id IS 'The node of the event, for the totals; NULL "
    "in rows queued before 0006, which the totals already hold.'",
]

def _bucket_filters(column: str) -> list[str]:
    """FILTER conditions that put `column` into each histogram bucket (non-cumulative)."""
    bounds = [int(c.removeprefix("lat_le_")) for c in LATENCY_COLUMNS[:-1]]
    conditions = [f"{column} <= {bounds[0]}"]
    conditions += [f"{column} > {low} AND {column} <= {high}"
                   for low, high in pairwise(bounds)]
    return [*conditions, f"{column} > {bounds[-1]}"]


# The totals facts of what is queued, as the roll-forward of 0006 makes them: a connection in
# the minute it started, its bytes in the minute it ended (one fact when both are one);
# facts older than the oldest day kept are dropped with their day, as there.
_QUEUED_TOTALS = """
kept AS (
    SELECT min(to_date(substring(c.relname from '_p([0-9]{8})$'), 'YYYYMMDD'))::timestamp
               AT TIME ZONE 'UTC' AS since
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'rollup_totals_day'::regclass AND c.relname ~ '_p[0-9]{8}$'
),
facts AS (
    SELECT started_bucket AS bucket, node_id, status, connections::bigint AS connections,
           CASE WHEN same THEN bytes_in ELSE 0 END AS bytes_in,
           CASE WHEN same THEN bytes_out ELSE 0 END AS bytes_out, connect_ms
    FROM (SELECT *, ended_bucket = started_bucket AS same FROM rollup_queue
          WHERE node_id IS NOT NULL) AS t
    WHERE (connections > 0 OR same) AND started_bucket >= (SELECT since FROM kept)
    UNION ALL
    SELECT ended_bucket, node_id, status, 0, bytes_in, bytes_out, NULL FROM rollup_queue
    WHERE node_id IS NOT NULL AND ended_bucket <> started_bucket
      AND (bytes_in > 0 OR bytes_out > 0) AND ended_bucket >= (SELECT since FROM kept)
)"""


def _queued_totals(tier: str) -> str:
    """Add the queue's totals facts to one tier of the totals."""
    table = "rollup_totals" if tier == "minute" else f"rollup_totals_{tier}"
    histogram = ", ".join(f"count(*) FILTER (WHERE {condition})"
                          for condition in _bucket_filters("connect_ms"))
    updates = ", ".join(
        f"{m} = greatest(r.{m}, excluded.{m})" if m == "connect_ms_max"
        else f"{m} = r.{m} + excluded.{m}" for m in MEASURES)
    return (f"WITH {_QUEUED_TOTALS}\n"
            f"INSERT INTO {table} AS r (bucket, node_id, status, {', '.join(MEASURES)})\n"
            f"SELECT date_trunc('{tier}', bucket), node_id, status, sum(connections), "
            f"sum(bytes_in), sum(bytes_out), count(connect_ms), coalesce(sum(connect_ms), 0), "
            f"max(connect_ms), {histogram}\n"
            f"FROM facts GROUP BY 1, node_id, status\n"
            f"ON CONFLICT (bucket, node_id, status) DO UPDATE SET {updates}")


DOWNGRADE = [
    *(_roll_up(table, keys, tier)
      for table, (keys, tiers) in FAMILIES.items() for tier in tiers),
    *(_roll_up_ranks(table, bucket) for table, bucket in RANKS.items()),
    *(_queued_totals(tier) for tier in ("minute", "hour", "day")),
    "ALTER TABLE rollup_queue DROP COLUMN node_id",
    "DROP TABLE rollup_watermark",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
