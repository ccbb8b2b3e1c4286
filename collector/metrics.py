"""The collector's Prometheus metrics.

Queue depth, streams and database state are read at scrape time from the components that
own them; counts and latencies are recorded where the work happens. Labels are bounded: a
rejected row's reason label is only the field it names (`source_ip`, `started_at`, ...).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from socks5_analytics.storage import MaintenanceResult

__all__ = ["CollectorMetrics", "reason_field"]

_ROW_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000)
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def reason_field(reason: str) -> str:
    """The field a rejection reason names ("source_ip: 5 bytes ..." -> "source_ip")."""
    head, colon, _ = reason.partition(":")
    head = head.strip()
    if not colon or not head.replace("_", "").isalnum() or len(head) > 40:
        return "other"
    return head


class CollectorMetrics:
    """Every metric of a collector process, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.streams = Gauge("s5a_collector_streams", "Node streams open now", registry=r)
        self.queue_rows = Gauge("s5a_collector_queue_rows",
                                "Rows received and not yet committed", registry=r)
        self.database_up = Gauge("s5a_collector_database_up",
                                 "0 while writes fail and acks are held", registry=r)
        self.pool_connections = Gauge("s5a_collector_db_pool_connections",
                                      "Database pool connections by state", ["state"],
                                      registry=r)
        self.events_received = Counter("s5a_collector_events_received",
                                       "Events and interim reports received", registry=r)
        self.events_rejected = Counter("s5a_collector_events_rejected",
                                       "Items refused as invalid, by the field at fault",
                                       ["reason"], registry=r)
        self.batches = Counter("s5a_collector_batches",
                               "Node batches answered, by answer (ack, rejection, failed)",
                               ["result"], registry=r)
        self.rows_written = Counter("s5a_collector_rows_written",
                                    "Rows a write stored (inserted) or found already stored "
                                    "(duplicate)", ["kind"], registry=r)
        self.write_rows = Histogram("s5a_collector_write_rows", "Rows per database write",
                                    buckets=_ROW_BUCKETS, registry=r)
        self.commit_seconds = Histogram("s5a_collector_commit_duration_seconds",
                                        "Time of one database write, retries included",
                                        buckets=_COMMIT_BUCKETS, registry=r)

        self.maintenance_passes = Counter(
            "s5a_collector_maintenance_passes",
            "Partition maintenance passes, by result (ok; failed; skipped: another "
            "collector was running one)", ["result"], registry=r)
        self.partitions = Counter("s5a_collector_partitions",
                                  "Partitions the maintenance created and dropped (retention)",
                                  ["action"], registry=r)
        self.maintenance_ok_time = Gauge(
            "s5a_collector_maintenance_last_ok_timestamp_seconds",
            "When this collector last completed a maintenance pass (unix time; 0: never)",
            registry=r)

    def maintenance(self, result: MaintenanceResult | None) -> None:
        """Count one maintenance pass (None: it failed)."""
        if result is None:
            self.maintenance_passes.labels("failed").inc()
        elif result.skipped:
            self.maintenance_passes.labels("skipped").inc()
        else:
            self.maintenance_passes.labels("ok").inc()
            self.partitions.labels("created").inc(len(result.created))
            self.partitions.labels("dropped").inc(len(result.dropped))
            self.maintenance_ok_time.set_to_current_time()

    def watch(self, *, streams: Callable[[], int], queue_rows: Callable[[], int],
              database_up: Callable[[], bool],
              pool: Callable[[], tuple[int, int]] | None = None) -> None:
        """Read these at each scrape (pool: () -> (in use, idle))."""
        self.streams.set_function(streams)
        self.queue_rows.set_function(queue_rows)
        self.database_up.set_function(lambda: 1.0 if database_up() else 0.0)
        if pool is not None:
            self.pool_connections.labels("in_use").set_function(lambda: pool()[0])
            self.pool_connections.labels("idle").set_function(lambda: pool()[1])

    def rejected(self, reasons: list[str]) -> None:
        """Count refused items by the field each reason names."""
        for reason in reasons:
            self.events_rejected.labels(reason_field(reason)).inc()
