"""Facts about the schema that the Python side needs: value sets, buckets, table names.

The migrations carry their own frozen copies of these (a migration never imports the
application); `tests/storage/test_schema.py` checks that the two agree with the database.
"""

from __future__ import annotations

__all__ = [
    "CLOSE_REASONS",
    "COMMANDS",
    "LATENCY_BUCKETS_MS",
    "LATENCY_COLUMNS",
    "PARTITIONED_TABLES",
    "PROTOCOLS",
    "STATUSES",
    "WEEKLY_TABLES",
]

STATUSES = frozenset(
    {"ok", "auth_failed", "denied_whitelist", "denied_destination", "rate_limited",
     "dns_failed", "refused", "unreachable", "timeout", "error"}
)
COMMANDS = frozenset({"connect", "bind", "udp_associate"})
PROTOCOLS = frozenset({"tcp", "udp"})
CLOSE_REASONS = frozenset(
    {"client", "destination", "idle_timeout", "shutdown", "revoked", "error"}
)

# Upper bounds (ms) of the connect-latency histogram buckets, then +Inf.
LATENCY_BUCKETS_MS: tuple[int, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
)
LATENCY_COLUMNS: tuple[str, ...] = tuple(
    [f"lat_le_{bound}" for bound in LATENCY_BUCKETS_MS] + ["lat_le_inf"]
)

# Range-partitioned by UTC day (the weekly tiers by ISO week, their partitions named by the
# Monday); maintenance creates and drops their partitions together.
PARTITIONED_TABLES: tuple[str, ...] = (
    "traffic_logs", "rollup_totals", "rollup_domains", "rollup_clients",
    "rollup_totals_hour", "rollup_totals_day", "rollup_domains_hour", "rollup_domains_day",
    "rollup_clients_hour", "rollup_clients_day", "rollup_domains_week",
    "rollup_domain_ranks_quarter", "rollup_domain_ranks_day", "rollup_domain_ranks_week",
)
WEEKLY_TABLES: frozenset[str] = frozenset({"rollup_domains_week", "rollup_domain_ranks_week"})
