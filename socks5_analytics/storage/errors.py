"""The storage layer's exceptions; asyncpg's and the OS's are translated into these."""

from __future__ import annotations

__all__ = [
    "DatabaseUnavailableError",
    "EmbeddedServerError",
    "InvalidBatchError",
    "InvalidQueryError",
    "MigrationError",
    "SchemaMissingError",
    "StorageError",
    "TransientError",
]


class StorageError(Exception):
    """Base class of every error the storage layer raises."""


class TransientError(StorageError):
    """The call failed for a passing reason (a deadlock, a timeout); retrying may succeed."""


class DatabaseUnavailableError(TransientError):
    """The database cannot be reached or dropped the connection."""


class SchemaMissingError(StorageError):
    """The database has no (or an older) schema: run `socks5-analytics migrate`."""


class InvalidBatchError(StorageError):
    """The database refused a batch (a constraint no row check caught); nothing was written."""

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class InvalidQueryError(StorageError):
    """A stats or logs query was asked something it cannot answer (bad cursor, too many points)."""


class MigrationError(StorageError):
    """A schema migration failed or was asked for an unknown revision."""


class EmbeddedServerError(StorageError):
    """The embedded PostgreSQL server could not be found, initialised, started or stopped."""
