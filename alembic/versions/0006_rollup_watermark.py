"""A watermark for the coarse tiers of the domain and client rollups.

Why: every event the roll-forward took became about 2.5 upserted tier rows, one per key
and tier for each chunk of the queue: the same hour, day and week row of a busy domain
was rewritten by every chunk. Now the roll-forward writes the minute tiers only, and the
coarse tiers (hour, day, week; the domain ranking tiers) are filled from the minute tier a
few minutes behind, once per key for each span rolled up. `rollup_watermark` says where
that is: the coarse tiers hold exactly the minutes before `rolled_until`, the minute tiers
every minute, and readers take the minutes from `rolled_until` on from the minute tier.
A fact for a minute already rolled up (a long connection, a replayed spool) still goes to
every tier at once.

Upgrading starts the watermark just after the last minute stored (minus infinity when
nothing is), so what the tiers already hold stays exactly right. Downgrading first rolls
every minute from the watermark on into the coarse tiers, so that they hold everything
again, as the code of 0005 expects; then it drops the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

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
SELECT coalesce(greatest((SELECT max(bucket) FROM rollup_domains),
                         (SELECT max(bucket) FROM rollup_clients)) + interval '1 minute',
                '-infinity')
""",
]

DOWNGRADE = [
    *(_roll_up(table, keys, tier)
      for table, (keys, tiers) in FAMILIES.items() for tier in tiers),
    *(_roll_up_ranks(table, bucket) for table, bucket in RANKS.items()),
    "DROP TABLE rollup_watermark",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
