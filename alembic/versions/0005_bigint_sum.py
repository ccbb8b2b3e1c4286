"""An aggregate that adds bigints as bigints, for the rollup upserts.

Why: `sum(bigint)` returns numeric. The roll-forward and the insert add up counts, bytes and
histogram buckets (18 bigint columns) for every rollup row they upsert, and converting each
sum to numeric and back to bigint was a fifth of the roll-forward's time. `s5a_isum(bigint)`
adds with `int8pl`, the bigint `+` operator: the same result, a bigint, and an overflow is
an error, as the bigint column would make it anyway. Nothing else changes; no data moves.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = [
    "CREATE AGGREGATE s5a_isum(bigint) "
    "(SFUNC = int8pl, STYPE = bigint, COMBINEFUNC = int8pl, PARALLEL = SAFE)",
    "COMMENT ON AGGREGATE s5a_isum(bigint) IS "
    "'sum(bigint) as a bigint (int8pl): no numeric conversion; an overflow is an error.'",
]

DOWNGRADE = [
    "DROP AGGREGATE s5a_isum(bigint)",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
