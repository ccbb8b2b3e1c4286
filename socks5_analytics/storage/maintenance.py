"""The periodic partition maintenance that a long-running writer (the collector) runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from socks5_analytics.storage.errors import StorageError
from socks5_analytics.storage.models import MaintenanceResult
from socks5_analytics.storage.repository import Repository

__all__ = ["run_maintenance_forever"]

_log = structlog.get_logger(__name__)


async def run_maintenance_forever(
    repository: Repository, *, interval: float, stop: asyncio.Event,
    on_pass: Callable[[MaintenanceResult | None], None] | None = None,
) -> None:
    """Create partitions ahead and drop expired ones every `interval` s until `stop` is set;
    `on_pass` hears of every pass (None: it failed), for the metrics.

    A failed pass is logged and tried again at the next interval: the partitions ahead
    leave days of slack, and a batch creates a missing partition itself.
    """
    while not stop.is_set():
        try:
            result = await repository.run_maintenance()
        except StorageError as exc:
            _log.warning("partition maintenance failed", error=str(exc))
            if on_pass is not None:
                on_pass(None)
        else:
            if on_pass is not None:
                on_pass(result)
            if result.skipped:
                _log.debug("partition maintenance skipped: another process runs a pass")
            elif result.created or result.dropped:
                _log.info(
                    "partition maintenance",
                    created=list(result.created),
                    dropped=list(result.dropped),
                    progress_purged=result.progress_purged,
                    nodes_purged=result.nodes_purged,
                )
        try:  # asyncio.timeout: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            pass
