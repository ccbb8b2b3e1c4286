"""PostgreSQL storage: the repository, its models, migrations and the embedded server.

`Repository` is the only code that speaks SQL. `migrate` runs the alembic migrations,
`EmbeddedPostgres` runs a PostgreSQL of our own when no database URL is configured.
"""

from __future__ import annotations

from socks5_analytics.storage.errors import (
    DatabaseUnavailableError,
    EmbeddedServerError,
    InvalidBatchError,
    InvalidQueryError,
    MigrationError,
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
    TrafficPoint,
    TrafficSeries,
)
from socks5_analytics.storage.repository import Repository

__all__ = [
    "BatchResult",
    "ClientStat",
    "DatabaseUnavailableError",
    "DomainLatency",
    "DomainStat",
    "EmbeddedServerError",
    "HistogramBucket",
    "InterimReport",
    "InvalidBatchError",
    "InvalidQueryError",
    "LatencyStats",
    "LogPage",
    "MaintenanceResult",
    "MigrationError",
    "NodeInfo",
    "NodeReport",
    "Page",
    "RejectedRow",
    "Repository",
    "SchemaMissingError",
    "StatsFilter",
    "StatusCount",
    "StorageError",
    "StoredEvent",
    "TrafficPoint",
    "TrafficSeries",
    "TransientError",
]
