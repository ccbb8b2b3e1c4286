"""Connection limits: concurrency and rate per source and per user, auth-failure throttling.

Token buckets (rate per second, a burst of one second's worth, at least 1) refill from a
clock the caller passes in, so every decision can be tested without waiting. Counters are
released by the session when it ends. Idle buckets are forgotten so memory stays bounded by
the number of active sources and users.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["AuthThrottle", "BandwidthLimiter", "ConnectionLimiter", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second, holding at most `burst`."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float | None = None  # None: never used, so it starts full

    def _refill(self, now: float) -> None:
        if self.stamp is None:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend `amount` tokens if there are that many."""
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def available(self, now: float) -> int:
        """Whole tokens available now (after refilling)."""
        self._refill(now)
        return int(self.tokens)

    def consume(self, amount: float) -> None:
        """Spend tokens already granted by `available` (may go negative: a debt)."""
        self.tokens -= amount

    def wait_time(self, amount: float = 1.0) -> float:
        """Seconds until `amount` tokens will be there, as of the last refill."""
        return max(0.0, (amount - self.tokens) / self.rate)

    def full_at(self, now: float) -> bool:
        """Whether the bucket would be full at `now` (then it can be forgotten)."""
        if self.stamp is None:
            return True
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def _bucket(rate: float) -> TokenBucket:
    return TokenBucket(rate=rate, burst=max(1.0, math.ceil(rate)))


class ConnectionLimiter:
    """Live connection counts and new-connection rates, per key (a source IP or a user)."""

    def __init__(self) -> None:
        self._active: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._last_sweep = 0.0

    def active(self, key: str) -> int:
        """Connections `key` has open."""
        return self._active.get(key, 0)

    def admit(self, key: str, *, max_active: int, rate: float, now: float) -> bool:
        """Count a new connection for `key` unless it is over its cap or its rate."""
        if max_active and self._active.get(key, 0) >= max_active:
            return False
        if rate:
            bucket = self._buckets.get(key)
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[key] = _bucket(rate)
            if not bucket.take(now):
                return False
        self._active[key] = self._active.get(key, 0) + 1
        if now - self._last_sweep > 60:
            self._sweep(now)
        return True

    def release(self, key: str) -> None:
        """A connection of `key` ended."""
        count = self._active.get(key, 0) - 1
        if count > 0:
            self._active[key] = count
        else:
            self._active.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for key in [k for k, b in self._buckets.items() if b.full_at(now)]:
            del self._buckets[key]


class BandwidthLimiter:
    """Per-user byte buckets, one per direction, shared by all of a user's connections."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}

    def buckets(self, user: str, bytes_per_second: int) -> tuple[TokenBucket, TokenBucket]:
        """(upload, download) buckets of `user` at this rate (a new rate starts afresh)."""
        pair = self._buckets.get(user)
        if pair is None or pair[0].rate != bytes_per_second:
            pair = (_bucket(bytes_per_second), _bucket(bytes_per_second))
            self._buckets[user] = pair
        return pair


class AuthThrottle:
    """Failed authentications per source over the last minute; over the limit, refuse."""

    WINDOW = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, source: str, now: float) -> bool:
        """Whether `source` has failed too often to be allowed another try now."""
        if not self.per_minute:
            return False
        failures = self._failures.get(source)
        if failures is None:
            return False
        while failures and failures[0] <= now - self.WINDOW:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return False
        return len(failures) >= self.per_minute

    def failed(self, source: str, now: float) -> None:
        """Record a failed attempt (or one in flight: see `forgive`)."""
        if self.per_minute:
            failures = self._failures.setdefault(source, deque())
            failures.append(now)
            if len(failures) > self.per_minute:
                failures.popleft()
            if len(self._failures) > 10_000:
                self._forget_stale(now)

    def forgive(self, source: str) -> None:
        """Take back one recorded attempt: it turned out to be a success."""
        failures = self._failures.get(source)
        if failures:
            failures.pop()
            if not failures:
                del self._failures[source]

    def _forget_stale(self, now: float) -> None:
        for source in [s for s, f in self._failures.items() if f[-1] <= now - self.WINDOW]:
            del self._failures[source]
