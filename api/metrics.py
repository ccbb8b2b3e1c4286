"""The API's Prometheus metrics, in a registry of the app's own (no process globals).

Labels are bounded: the route's name (not its path with values), the method and the status
class; never a client address, user or domain.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["ApiMetrics"]


class ApiMetrics:
    """Request counts and durations per route."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "s5a_api_requests_total", "HTTP requests answered, by route and status class",
            ["route", "method", "status"], registry=self.registry,
        )
        self.duration = Histogram(
            "s5a_api_request_duration_seconds", "Time to answer a request, by route",
            ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )

    def observe(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route, method if method in _METHODS else "other",
                             f"{status // 100}xx").inc()
        self.duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
