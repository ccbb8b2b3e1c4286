"""Token buckets, per-key connection limits and auth throttling, on an explicit clock."""

from __future__ import annotations

import pytest

from proxy_node.limits import AuthThrottle, BandwidthLimiter, ConnectionLimiter, TokenBucket

T0 = 1000.0  # a monotonic clock reading; the values only matter relative to each other


# -- TokenBucket -----------------------------------------------------------------------------

def test_a_new_bucket_is_full() -> None:
    bucket = TokenBucket(rate=5, burst=5)
    assert [bucket.take(T0) for _ in range(6)] == [True] * 5 + [False]


def test_tokens_refill_at_the_rate() -> None:
    # (times and rates are binary fractions, so the arithmetic is exact)
    bucket = TokenBucket(rate=8, burst=8)
    for _ in range(8):
        assert bucket.take(T0)
    assert not bucket.take(T0)
    assert not bucket.take(T0 + 0.0625)  # half a token
    assert bucket.take(T0 + 0.125)  # one token
    assert not bucket.take(T0 + 0.125)
    assert [bucket.take(T0 + 0.5) for _ in range(4)] == [True, True, True, False]


def test_refill_stops_at_the_burst() -> None:
    bucket = TokenBucket(rate=2, burst=3)
    assert bucket.take(T0)
    # an hour idle still leaves only `burst` tokens
    assert [bucket.take(T0 + 3600) for _ in range(4)] == [True, True, True, False]


def test_a_refused_take_costs_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take(T0)
    for i in range(1, 10):
        assert not bucket.take(T0 + i * 0.09)  # 0.09, 0.18, ... 0.81: never a whole token
    assert bucket.take(T0 + 1.0)


def test_take_an_amount() -> None:
    bucket = TokenBucket(rate=100, burst=100)
    assert bucket.take(T0, 60)
    assert not bucket.take(T0, 60)
    assert bucket.take(T0, 40)


def test_full_at() -> None:
    bucket = TokenBucket(rate=4, burst=4)
    assert bucket.full_at(T0)  # never used
    assert bucket.take(T0)
    assert not bucket.full_at(T0 + 0.1)
    assert bucket.full_at(T0 + 0.25)


def test_available_consume_and_wait_time() -> None:
    bucket = TokenBucket(rate=1024, burst=1024)
    assert bucket.available(T0) == 1024
    bucket.consume(1000)
    assert bucket.available(T0) == 24
    assert bucket.wait_time(536) == 0.5
    assert bucket.available(T0 + 0.5) == 536
    bucket.consume(536)
    assert bucket.wait_time(1024) == 1.0
    assert bucket.available(T0 + 10) == 1024  # refill stops at the burst


# -- BandwidthLimiter ------------------------------------------------------------------------

def test_bandwidth_buckets_are_per_user_and_per_direction() -> None:
    limiter = BandwidthLimiter()
    up, down = limiter.buckets("alice", 1000)
    assert up is not down
    assert (up.burst, down.burst) == (1000, 1000)
    assert limiter.buckets("alice", 1000) == (up, down)  # shared by her connections
    assert limiter.buckets("bob", 1000)[0] is not up
    up.consume(up.available(T0))
    new_up, _ = limiter.buckets("alice", 2000)  # a new rate starts afresh
    assert new_up is not up and new_up.available(T0) == 2000


# -- ConnectionLimiter -----------------------------------------------------------------------

def test_no_limits_admit_everything() -> None:
    limiter = ConnectionLimiter()
    assert all(limiter.admit("k", max_active=0, rate=0, now=T0) for _ in range(1000))
    assert limiter.active("k") == 1000


def test_the_cap_counts_live_connections() -> None:
    limiter = ConnectionLimiter()
    assert [limiter.admit("k", max_active=2, rate=0, now=T0) for _ in range(3)] == [
        True, True, False]
    assert limiter.active("k") == 2  # the refused one is not counted
    limiter.release("k")
    assert limiter.active("k") == 1
    assert limiter.admit("k", max_active=2, rate=0, now=T0)
    assert not limiter.admit("k", max_active=2, rate=0, now=T0)


def test_keys_are_independent() -> None:
    limiter = ConnectionLimiter()
    assert limiter.admit("a", max_active=1, rate=1, now=T0)
    assert not limiter.admit("a", max_active=1, rate=1, now=T0)
    assert limiter.admit("b", max_active=1, rate=1, now=T0)
    assert (limiter.active("a"), limiter.active("b"), limiter.active("c")) == (1, 1, 0)


def test_release_of_an_unknown_key_does_not_go_negative() -> None:
    limiter = ConnectionLimiter()
    limiter.release("ghost")
    assert limiter.active("ghost") == 0
    assert limiter.admit("ghost", max_active=1, rate=0, now=T0)
    assert not limiter.admit("ghost", max_active=1, rate=0, now=T0)


@pytest.mark.parametrize(("rate", "burst"), [(0.2, 1), (0.5, 1), (1, 1), (1.5, 2), (3, 3),
                                             (10, 10), (2.01, 3)])
def test_the_burst_is_one_seconds_worth_rounded_up_and_at_least_one(
    rate: float, burst: int
) -> None:
    limiter = ConnectionLimiter()
    admitted = [limiter.admit("k", max_active=0, rate=rate, now=T0) for _ in range(burst + 5)]
    assert admitted == [True] * burst + [False] * 5


def test_the_rate_refills_over_time() -> None:
    limiter = ConnectionLimiter()
    assert [limiter.admit("k", max_active=0, rate=2, now=T0) for _ in range(3)] == [
        True, True, False]
    assert not limiter.admit("k", max_active=0, rate=2, now=T0 + 0.4)
    assert limiter.admit("k", max_active=0, rate=2, now=T0 + 0.5)
    assert not limiter.admit("k", max_active=0, rate=2, now=T0 + 0.5)
    # releasing connections gives no tokens back: the rate limits new connections
    for _ in range(3):
        limiter.release("k")
    assert not limiter.admit("k", max_active=0, rate=2, now=T0 + 0.5)


def test_a_connection_over_the_cap_spends_no_token() -> None:
    limiter = ConnectionLimiter()
    assert limiter.admit("k", max_active=1, rate=2, now=T0)
    for _ in range(5):
        assert not limiter.admit("k", max_active=1, rate=2, now=T0)  # capped
    limiter.release("k")
    assert limiter.admit("k", max_active=1, rate=2, now=T0)  # the second token is still there


def test_a_new_rate_starts_a_new_full_bucket() -> None:
    limiter = ConnectionLimiter()
    assert limiter.admit("k", max_active=0, rate=1, now=T0)
    assert not limiter.admit("k", max_active=0, rate=1, now=T0)
    # the policy changed the rate: the new bucket starts full
    assert [limiter.admit("k", max_active=0, rate=3, now=T0) for _ in range(4)] == [
        True, True, True, False]


def test_idle_buckets_and_counters_are_forgotten() -> None:
    limiter = ConnectionLimiter()
    for i in range(100):
        assert limiter.admit(f"10.0.0.{i}", max_active=0, rate=1, now=T0)
        limiter.release(f"10.0.0.{i}")
    assert all(limiter.active(f"10.0.0.{i}") == 0 for i in range(100))
    # a minute later the next admission sweeps the buckets that have refilled
    assert limiter.admit("other", max_active=0, rate=1, now=T0 + 61)
    assert len(limiter._buckets) == 1
    assert limiter._active == {"other": 1}
    # a forgotten key starts with a full bucket again
    assert limiter.admit("10.0.0.1", max_active=0, rate=1, now=T0 + 61)


# -- AuthThrottle --------------------------------------------------------------------------

def test_blocked_after_the_limit_within_a_minute() -> None:
    throttle = AuthThrottle(per_minute=3)
    for i in range(3):
        assert not throttle.blocked("1.2.3.4", T0 + i)
        throttle.failed("1.2.3.4", T0 + i)
    assert throttle.blocked("1.2.3.4", T0 + 3)
    assert throttle.blocked("1.2.3.4", T0 + 59.9)
    assert not throttle.blocked("5.6.7.8", T0 + 3)  # per source


def test_the_window_slides() -> None:
    throttle = AuthThrottle(per_minute=3)
    for at in (0, 10, 20):
        throttle.failed("s", T0 + at)
    assert throttle.blocked("s", T0 + 59)
    assert not throttle.blocked("s", T0 + 60)  # the first failure is a minute old
    throttle.failed("s", T0 + 60)
    assert throttle.blocked("s", T0 + 60)
    assert not throttle.blocked("s", T0 + 70)  # the 10 s one aged out
    assert not throttle.blocked("s", T0 + 200)
    assert "s" not in throttle._failures  # forgotten once empty


def test_a_hammering_source_stays_blocked_without_growing_memory() -> None:
    throttle = AuthThrottle(per_minute=5)
    for i in range(10_000):
        throttle.failed("s", T0 + i * 0.001)
    assert len(throttle._failures["s"]) == 5
    assert throttle.blocked("s", T0 + 10)


def test_zero_means_no_throttling() -> None:
    throttle = AuthThrottle(per_minute=0)
    for _ in range(100):
        throttle.failed("s", T0)
    assert not throttle.blocked("s", T0)
    assert throttle._failures == {}
