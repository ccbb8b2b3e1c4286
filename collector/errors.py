"""The collector's exceptions."""

from __future__ import annotations

__all__ = ["CollectorError", "PublisherClosedError", "UnstorableBatchError"]


class CollectorError(Exception):
    """Base class of the collector's errors."""


class PublisherClosedError(CollectorError):
    """The publisher is stopping: it takes no more batches, and drops what it could not write."""


class UnstorableBatchError(CollectorError):
    """The database refused a batch for a reason no row check names; the node keeps it."""
