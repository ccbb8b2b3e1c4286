"""The proxy node's Prometheus metrics.

Per-connection figures are recorded once, when the session ends (never per relayed chunk).
State that changes all the time (active connections, buffer and spool sizes, the exporter's
counts) is sampled once a second. Labels are bounded sets (status, command, reason,
direction, result); client addresses, users and destinations belong in the database.
With worker processes, prometheus_client's multiprocess mode adds the workers up.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy_node.events import ConnectionRecord

__all__ = ["HANDSHAKE_FAILURES", "ProxyMetrics"]

HANDSHAKE_FAILURES = frozenset(
    {"no_acceptable_method", "auth_failed", "auth_throttled", "malformed", "timeout",
     "client_closed", "denied"}
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class ProxyMetrics:
    """Every metric of a proxy node, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.active = Gauge("s5a_proxy_active_connections", "Sessions open now",
                            registry=r, multiprocess_mode="livesum")
        self.connections = Counter("s5a_proxy_connections", "Sessions ended, by outcome",
                                   ["status", "command"], registry=r)
        self.bytes = Counter("s5a_proxy_bytes", "Payload bytes relayed (out: client to "
                             "destination, in: destination to client)", ["direction"],
                             registry=r)
        self.connect_seconds = Histogram("s5a_proxy_connect_duration_seconds",
                                         "From request to upstream connected",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.duration_seconds = Histogram("s5a_proxy_connection_duration_seconds",
                                          "From accept to close", buckets=_DURATION_BUCKETS,
                                          registry=r)
        self.handshake_failures = Counter("s5a_proxy_handshake_failures",
                                          "Sessions that failed before their request was "
                                          "served, by reason", ["reason"], registry=r)
        self.refused = Counter("s5a_proxy_refused_over_capacity",
                               "Connections reset at once because the node was at its cap",
                               registry=r)
        self.revoked = Counter("s5a_proxy_revoked_sessions",
                               "Live sessions closed by a policy change", registry=r)
        self.policy = Gauge("s5a_proxy_policy_info", "The policy in force (value 1)",
                            ["version"], registry=r, multiprocess_mode="liveall")
        self.buffer_events = Gauge("s5a_proxy_event_buffer_events",
                                   "Events waiting in memory for the exporter", registry=r,
                                   multiprocess_mode="livesum")
        self.spool_bytes = Gauge("s5a_proxy_spool_bytes", "Bytes in the disk spool",
                                 registry=r, multiprocess_mode="livesum")
        self.dropped = Counter("s5a_proxy_events_dropped",
                               "Events lost because memory and spool were full", registry=r)
        self.batches = Counter("s5a_proxy_export_batches",
                               "Batches by what happened to them (sent, acked, rejected, "
                               "resent, spooled)", ["result"], registry=r)
        self.rejected = Counter("s5a_proxy_events_rejected",
                                "Events refused as invalid, by the collector or before "
                                "sending", registry=r)
        self.collector_up = Gauge("s5a_proxy_collector_connected",
                                  "1 while a stream to a collector is open", registry=r,
                                  multiprocess_mode="livemax")
        self._by_outcome: dict[tuple[str, str], Any] = {}
        self._bytes_out = self.bytes.labels("out")
        self._bytes_in = self.bytes.labels("in")
        self._policy_version: str | None = None
        self._seen: dict[str, int] = {}

    def connection_ended(self, record: ConnectionRecord, duration_s: float) -> None:
        """Record one finished session (a handful of lock-free-ish increments)."""
        key = (record.status, record.command)
        counter = self._by_outcome.get(key)
        if counter is None:
            counter = self._by_outcome[key] = self.connections.labels(*key)
        counter.inc()
        if record.bytes_out:
            self._bytes_out.inc(record.bytes_out)
        if record.bytes_in:
            self._bytes_in.inc(record.bytes_in)
        if record.connected_mono is not None and record.request_mono is not None:
            self.connect_seconds.observe(record.connected_mono - record.request_mono)
        self.duration_seconds.observe(duration_s)

    def handshake_failed(self, reason: str) -> None:
        """Count a session that failed before its request was served."""
        self.handshake_failures.labels(reason if reason in HANDSHAKE_FAILURES else "other").inc()

    def set_policy(self, version: str) -> None:
        """The policy now in force (the previous version's series goes away)."""
        if self._policy_version is not None and self._policy_version != version:
            try:
                self.policy.remove(self._policy_version)
            except KeyError:
                pass
        self._policy_version = version
        self.policy.labels(version).set(1)

    def sample(self, *, active: int, exporter: Any) -> None:
        """Once a second: gauges, and the exporter's running totals as counter increments."""
        self.active.set(active)
        if exporter is None:
            return
        self.buffer_events.set(getattr(exporter, "buffered", 0))
        self.spool_bytes.set(getattr(exporter, "spool_bytes", 0))
        self.collector_up.set(1 if getattr(exporter, "connected", False) else 0)
        totals = {
            "dropped": getattr(exporter, "dropped", 0),
            "rejected": getattr(exporter, "rejected", 0),
            **{f"batches_{k}": v for k, v in getattr(exporter, "batch_counts", {}).items()},
        }
        for name, total in totals.items():
            delta = total - self._seen.get(name, 0)
            if delta <= 0:
                continue
            self._seen[name] = total
            if name == "dropped":
                self.dropped.inc(delta)
            elif name == "rejected":
                self.rejected.inc(delta)
            else:
                self.batches.labels(name.removeprefix("batches_")).inc(delta)
