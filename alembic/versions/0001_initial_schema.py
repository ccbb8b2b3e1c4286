"""The initial schema: traffic_logs, per-minute rollups, connection progress, proxy_nodes.

`traffic_logs` holds one row per connection (written at close) and the three rollup tables
hold per-minute sums; all four are range-partitioned by UTC day so that retention detaches
and drops whole partitions. Partitions themselves are not part of the schema: the
repository's maintenance creates them ahead of time through `s5a_create_day_partitions`.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = (
    "ok", "auth_failed", "denied_whitelist", "denied_destination", "rate_limited",
    "dns_failed", "refused", "unreachable", "timeout", "error",
)
COMMANDS = ("connect", "bind", "udp_associate")
PROTOCOLS = ("tcp", "udp")
CLOSE_REASONS = ("client", "destination", "idle_timeout", "shutdown", "revoked", "error")
# Upper bounds (ms) of the connect-latency histogram buckets; one column per bucket, each
# counting connect_ms in (previous bound, bound], plus lat_le_inf for the rest. Frozen here:
# changing the buckets is a new migration, not an edit of this one.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
PARTITIONED = ("traffic_logs", "rollup_totals", "rollup_domains", "rollup_clients")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    listed = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({listed})"


def _finite_ms(column: str) -> str:
    # NaN sorts above every number in PostgreSQL, so `< 'Infinity'` rejects it too.
    return f"{column} >= 0 AND {column} < 'Infinity'"


_HISTOGRAM_COLUMNS = ",\n    ".join(
    [f"lat_le_{bound} bigint NOT NULL DEFAULT 0" for bound in LATENCY_BUCKETS_MS]
    + ["lat_le_inf bigint NOT NULL DEFAULT 0"]
)

_MEASURES = f"""
    connections    bigint NOT NULL DEFAULT 0 CHECK (connections >= 0),
    bytes_in       bigint NOT NULL DEFAULT 0 CHECK (bytes_in >= 0),
    bytes_out      bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0),
    connect_count  bigint NOT NULL DEFAULT 0 CHECK (connect_count >= 0),
    connect_ms_sum double precision NOT NULL DEFAULT 0,
    connect_ms_max double precision,
    {_HISTOGRAM_COLUMNS}"""

UPGRADE = [
    f"""
CREATE TABLE traffic_logs (
    event_id          uuid             NOT NULL,
    node_id           text             NOT NULL
        CONSTRAINT traffic_logs_node_id_check CHECK (node_id <> '' AND length(node_id) <= 128),
    started_at        timestamptz      NOT NULL,
    ended_at          timestamptz      NOT NULL,
    source_ip         inet             NOT NULL,
    source_port       integer          NOT NULL
        CONSTRAINT traffic_logs_source_port_check CHECK (source_port BETWEEN 0 AND 65535),
    user_name         text             NOT NULL DEFAULT ''
        CONSTRAINT traffic_logs_user_name_check CHECK (length(user_name) <= 255),
    command           text             NOT NULL
        CONSTRAINT traffic_logs_command_check CHECK ({_one_of("command", COMMANDS)}),
    protocol          text             NOT NULL
        CONSTRAINT traffic_logs_protocol_check CHECK ({_one_of("protocol", PROTOCOLS)}),
    dest_host         text
        CONSTRAINT traffic_logs_dest_host_check CHECK (length(dest_host) BETWEEN 1 AND 255),
    domain            text
        CONSTRAINT traffic_logs_domain_check
        CHECK (length(domain) BETWEEN 1 AND 253 AND domain = lower(domain)),
    dest_ip           inet,
    dest_port         integer
        CONSTRAINT traffic_logs_dest_port_check CHECK (dest_port BETWEEN 0 AND 65535),
    registered_domain text
        CONSTRAINT traffic_logs_registered_domain_check
        CHECK (length(registered_domain) BETWEEN 1 AND 253),
    status            text             NOT NULL
        CONSTRAINT traffic_logs_status_check CHECK ({_one_of("status", STATUSES)}),
    reply_code        smallint
        CONSTRAINT traffic_logs_reply_code_check CHECK (reply_code BETWEEN 0 AND 255),
    close_reason      text             NOT NULL
        CONSTRAINT traffic_logs_close_reason_check
        CHECK ({_one_of("close_reason", CLOSE_REASONS)}),
    connect_ms        double precision
        CONSTRAINT traffic_logs_connect_ms_check CHECK ({_finite_ms("connect_ms")}),
    ttfb_ms           double precision
        CONSTRAINT traffic_logs_ttfb_ms_check CHECK ({_finite_ms("ttfb_ms")}),
    duration_ms       double precision NOT NULL
        CONSTRAINT traffic_logs_duration_ms_check CHECK ({_finite_ms("duration_ms")}),
    bytes_out         bigint           NOT NULL
        CONSTRAINT traffic_logs_bytes_out_check CHECK (bytes_out >= 0),
    bytes_in          bigint           NOT NULL
        CONSTRAINT traffic_logs_bytes_in_check CHECK (bytes_in >= 0),
    trace_id          text
        CONSTRAINT traffic_logs_trace_id_check CHECK (trace_id ~ '^[0-9a-f]{{32}}$'),
    CONSTRAINT traffic_logs_ended_after_started CHECK (ended_at >= started_at),
    CONSTRAINT traffic_logs_source_ip_is_host
        CHECK (masklen(source_ip) = CASE family(source_ip) WHEN 4 THEN 32 ELSE 128 END),
    CONSTRAINT traffic_logs_dest_ip_is_host
        CHECK (masklen(dest_ip) = CASE family(dest_ip) WHEN 4 THEN 32 ELSE 128 END),
    CONSTRAINT traffic_logs_registered_domain_needs_domain
        CHECK (registered_domain IS NULL OR domain IS NOT NULL),
    -- The idempotency key: event_id, with the partition key that every unique index on a
    -- partitioned table must include. Time first, so that the same index serves time
    -- ranges and the newest-first keyset pagination of /logs.
    CONSTRAINT traffic_logs_pkey PRIMARY KEY (started_at, event_id)
) PARTITION BY RANGE (started_at)
""",
    "COMMENT ON TABLE traffic_logs IS "
    "'One row per proxied connection or UDP association, written when it closes.'",
    "CREATE INDEX traffic_logs_domain_idx ON traffic_logs (domain, started_at) "
    "WHERE domain IS NOT NULL",
    "CREATE INDEX traffic_logs_source_ip_idx ON traffic_logs (source_ip, started_at)",
    "CREATE INDEX traffic_logs_user_name_idx ON traffic_logs (user_name, started_at)",
    f"""
CREATE TABLE rollup_totals (
    bucket  timestamptz NOT NULL,
    node_id text        NOT NULL,
    status  text        NOT NULL,{_MEASURES},
    CONSTRAINT rollup_totals_pkey PRIMARY KEY (bucket, node_id, status)
) PARTITION BY RANGE (bucket)
""",
    f"""
CREATE TABLE rollup_domains (
    bucket            timestamptz NOT NULL,
    domain            text        NOT NULL,
    -- a function of domain (the Public Suffix List), so it adds no rows to the key
    registered_domain text,
    status            text        NOT NULL,{_MEASURES},
    CONSTRAINT rollup_domains_pkey PRIMARY KEY (bucket, domain, status)
) PARTITION BY RANGE (bucket)
""",
    f"""
CREATE TABLE rollup_clients (
    bucket    timestamptz NOT NULL,
    source_ip inet        NOT NULL,
    user_name text        NOT NULL,
    status    text        NOT NULL,{_MEASURES},
    CONSTRAINT rollup_clients_pkey PRIMARY KEY (bucket, source_ip, user_name, status)
) PARTITION BY RANGE (bucket)
""",
    "COMMENT ON TABLE rollup_totals IS 'Per-minute sums by node and status.'",
    "COMMENT ON TABLE rollup_domains IS 'Per-minute sums by destination domain and status.'",
    "COMMENT ON TABLE rollup_clients IS "
    "'Per-minute sums by source address, user and status.'",
    """
CREATE TABLE connection_progress (
    event_id   uuid        NOT NULL CONSTRAINT connection_progress_pkey PRIMARY KEY,
    started_at timestamptz NOT NULL,
    bytes_in   bigint      NOT NULL CHECK (bytes_in >= 0),
    bytes_out  bigint      NOT NULL CHECK (bytes_out >= 0),
    updated_at timestamptz NOT NULL
)
""",
    "COMMENT ON TABLE connection_progress IS "
    "'Bytes of open connections already counted in the rollups by interim reports.'",
    "CREATE INDEX connection_progress_updated_at_idx ON connection_progress (updated_at)",
    """
CREATE TABLE proxy_nodes (
    node_id            text        NOT NULL CONSTRAINT proxy_nodes_pkey PRIMARY KEY
        CONSTRAINT proxy_nodes_node_id_check CHECK (node_id <> '' AND length(node_id) <= 128),
    version            text        NOT NULL DEFAULT '',
    started_at         timestamptz NOT NULL,
    last_seen          timestamptz NOT NULL,
    policy_version     text        NOT NULL DEFAULT '',
    active_connections integer     NOT NULL DEFAULT 0
        CONSTRAINT proxy_nodes_active_connections_check CHECK (active_connections >= 0)
)
""",
    "COMMENT ON TABLE proxy_nodes IS 'What each proxy node reported last.'",
    f"""
CREATE FUNCTION s5a_create_day_partitions(first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $body$
DECLARE
    parent text;
    day date;
    part text;
BEGIN
    FOREACH parent IN ARRAY ARRAY[{", ".join(f"'{name}'" for name in PARTITIONED)}] LOOP
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
""",
    "COMMENT ON FUNCTION s5a_create_day_partitions(date, date) IS "
    "'Create the missing daily partitions of every partitioned table; returns their names.'",
]

DOWNGRADE = [
    "DROP FUNCTION s5a_create_day_partitions(date, date)",
    "DROP TABLE proxy_nodes",
    "DROP TABLE connection_progress",
    "DROP TABLE rollup_clients",
    "DROP TABLE rollup_domains",
    "DROP TABLE rollup_totals",
    "DROP TABLE traffic_logs",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
