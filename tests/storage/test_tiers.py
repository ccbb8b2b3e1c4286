"""`split_window`: which tier answers which part of a stats window (pure, table-driven)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from socks5_analytics.storage.tiers import Piece, split_window, split_window_for_sums


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


CASES = [
    # (since, until, coarsest, [(tier, start, end), ...])
    ("2026-03-10T10:00", "2026-03-10T10:00", "day", []),
    ("2026-03-10T10:05", "2026-03-10T10:40", "day",
     [("minute", "2026-03-10T10:05", "2026-03-10T10:40")]),
    ("2026-03-10T10:30", "2026-03-10T11:15", "day",  # crosses an hour, holds none
     [("minute", "2026-03-10T10:30", "2026-03-10T11:15")]),
    ("2026-03-10T10:00", "2026-03-10T11:00", "day",
     [("hour", "2026-03-10T10:00", "2026-03-10T11:00")]),
    ("2026-03-10T09:59", "2026-03-10T12:01", "day",
     [("minute", "2026-03-10T09:59", "2026-03-10T10:00"),
      ("hour", "2026-03-10T10:00", "2026-03-10T12:00"),
      ("minute", "2026-03-10T12:00", "2026-03-10T12:01")]),
    ("2026-03-10T00:00", "2026-03-11T00:00", "day",
     [("day", "2026-03-10T00:00", "2026-03-11T00:00")]),
    ("2026-03-09T22:30", "2026-03-12T01:15", "day",
     [("minute", "2026-03-09T22:30", "2026-03-09T23:00"),
      ("hour", "2026-03-09T23:00", "2026-03-10T00:00"),
      ("day", "2026-03-10T00:00", "2026-03-12T00:00"),
      ("hour", "2026-03-12T00:00", "2026-03-12T01:00"),
      ("minute", "2026-03-12T01:00", "2026-03-12T01:15")]),
    ("2026-03-09T22:30", "2026-03-12T01:15", "hour",
     [("minute", "2026-03-09T22:30", "2026-03-09T23:00"),
      ("hour", "2026-03-09T23:00", "2026-03-12T01:00"),
      ("minute", "2026-03-12T01:00", "2026-03-12T01:15")]),
    ("2026-03-09T22:30", "2026-03-12T01:15", "minute",
     [("minute", "2026-03-09T22:30", "2026-03-12T01:15")]),
    ("2026-03-10T01:00", "2026-03-11T00:30", "day",  # whole hours, but no whole day
     [("hour", "2026-03-10T01:00", "2026-03-11T00:00"),
      ("minute", "2026-03-11T00:00", "2026-03-11T00:30")]),
    ("2026-02-28T23:59", "2026-03-01T00:01", "day",  # month edge, no whole hour
     [("minute", "2026-02-28T23:59", "2026-03-01T00:01")]),
    # Weeks are ISO weeks: 2026-03-09 and 2026-03-16 are Mondays.
    ("2026-03-09T00:00", "2026-03-16T00:00", "week",
     [("week", "2026-03-09T00:00", "2026-03-16T00:00")]),
    ("2026-03-09T00:00", "2026-03-16T00:00", "day",  # capped: the same week as days
     [("day", "2026-03-09T00:00", "2026-03-16T00:00")]),
    ("2026-03-10T00:00", "2026-03-16T00:00", "week",  # six days, no whole week
     [("day", "2026-03-10T00:00", "2026-03-16T00:00")]),
    ("2026-03-08T22:30", "2026-03-24T01:15", "week",  # a Sunday to a Tuesday
     [("minute", "2026-03-08T22:30", "2026-03-08T23:00"),
      ("hour", "2026-03-08T23:00", "2026-03-09T00:00"),
      ("week", "2026-03-09T00:00", "2026-03-23T00:00"),
      ("day", "2026-03-23T00:00", "2026-03-24T00:00"),
      ("hour", "2026-03-24T00:00", "2026-03-24T01:00"),
      ("minute", "2026-03-24T01:00", "2026-03-24T01:15")]),
    ("2026-10-29T02:10", "2026-11-27T14:10", "week",  # the 30-day benchmark window
     [("minute", "2026-10-29T02:10", "2026-10-29T03:00"),
      ("hour", "2026-10-29T03:00", "2026-10-30T00:00"),
      ("day", "2026-10-30T00:00", "2026-11-02T00:00"),
      ("week", "2026-11-02T00:00", "2026-11-23T00:00"),
      ("day", "2026-11-23T00:00", "2026-11-27T00:00"),
      ("hour", "2026-11-27T00:00", "2026-11-27T14:00"),
      ("minute", "2026-11-27T14:00", "2026-11-27T14:10")]),
    ("2026-12-28T00:00", "2027-01-11T00:00", "week",  # across a year: ISO weeks 53 and 1
     [("week", "2026-12-28T00:00", "2027-01-11T00:00")]),
    ("2026-03-15T23:59", "2026-03-16T00:01", "week",  # Sunday to Monday, nothing whole
     [("minute", "2026-03-15T23:59", "2026-03-16T00:01")]),
]


@pytest.mark.parametrize(("since", "until", "coarsest", "expected"), CASES)
def test_split_window(since: str, until: str, coarsest: str,
                      expected: list[tuple[str, str, str]]) -> None:
    pieces = split_window(t(since), t(until), coarsest=coarsest)  # type: ignore[arg-type]
    assert pieces == tuple(Piece(tier, t(a), t(b)) for tier, a, b in expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(("since", "until"), [(t(a), t(b)) for a, b, _, _ in CASES])
@pytest.mark.parametrize("coarsest", ["day", "week"])
def test_pieces_tile_the_window(since: datetime, until: datetime, coarsest: str) -> None:
    pieces = split_window(since, until, coarsest=coarsest)  # type: ignore[arg-type]
    edges = [since] + [p.end for p in pieces]
    assert [p.start for p in pieces] == edges[:-1]  # contiguous, in order
    assert edges[-1] == until


def test_other_offsets_mean_the_same_instant() -> None:
    plus_one = timezone(timedelta(hours=1))
    local = split_window(datetime(2026, 3, 10, 1, 0, tzinfo=plus_one),
                         datetime(2026, 3, 11, 1, 0, tzinfo=plus_one))
    assert local == (Piece("day", t("2026-03-10T00:00"), t("2026-03-11T00:00")),)


@pytest.mark.parametrize(("since", "until", "coarsest", "message"), [
    (datetime(2026, 3, 10), t("2026-03-11T00:00"), "day", "timezone-aware"),
    (t("2026-03-10T00:00:30"), t("2026-03-11T00:00"), "day", "whole minutes"),
    (t("2026-03-10T00:00"), t("2026-03-10T00:00:00.5"), "day", "whole minutes"),
    (t("2026-03-11T00:00"), t("2026-03-10T00:00"), "day", "after"),
    (t("2026-03-10T00:00"), t("2026-03-11T00:00"), "month", "unknown tier"),
])
def test_bad_windows_are_refused(since: datetime, until: datetime, coarsest: str,
                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_window(since, until, coarsest=coarsest)  # type: ignore[arg-type]


# Costs of one bucket of each tier, in rows, for the cases below (about the proportions of
# the domain ranking tiers at 10 M events a month).
COSTS = {"minute": 1, "hour": 24, "day": 110, "week": 130}

SUMS_CASES = [
    # (since, until, now, [(tier, start, end, sign), ...])
    ("2026-11-26T14:14", "2026-11-27T14:14", "2026-11-27T14:20",  # 24 h up to now
     [("hour", "2026-11-26T14:00", "2026-11-27T00:00", 1),  # an hour less 14 minutes
      ("minute", "2026-11-26T14:00", "2026-11-26T14:14", -1),
      ("day", "2026-11-27T00:00", "2026-11-28T00:00", 1),  # today: nothing after now yet
      ("minute", "2026-11-27T14:14", "2026-11-27T15:00", -1),
      ("hour", "2026-11-27T15:00", "2026-11-28T00:00", -1)]),
    ("2026-11-26T14:14", "2026-11-27T14:14", "2026-12-01T00:00",  # the same, long past
     [("hour", "2026-11-26T14:00", "2026-11-27T14:00", 1),
      ("minute", "2026-11-26T14:00", "2026-11-26T14:14", -1),
      ("minute", "2026-11-27T14:00", "2026-11-27T14:14", 1)]),
    ("2026-10-29T02:13", "2026-11-27T14:14", "2026-11-27T14:20",  # 30 days up to now
     [("day", "2026-10-29T00:00", "2026-11-02T00:00", 1),  # a 22-hour head day, 3 days
      ("hour", "2026-10-29T00:00", "2026-10-29T02:00", -1),
      ("minute", "2026-10-29T02:00", "2026-10-29T02:13", -1),
      ("week", "2026-11-02T00:00", "2026-11-30T00:00", 1),  # this week: the rest is future
      ("minute", "2026-11-27T14:14", "2026-11-27T15:00", -1),
      ("hour", "2026-11-27T15:00", "2026-11-28T00:00", -1),
      ("day", "2026-11-28T00:00", "2026-11-30T00:00", -1)]),
    ("2026-03-10T01:00", "2026-03-10T23:30", "2026-12-01T00:00",  # inside one day
     [("day", "2026-03-10T00:00", "2026-03-11T00:00", 1),
      ("hour", "2026-03-10T00:00", "2026-03-10T01:00", -1),
      ("minute", "2026-03-10T23:30", "2026-03-11T00:00", -1)]),
    ("2026-03-10T10:05", "2026-03-10T10:58", "2026-12-01T00:00",  # inside one hour
     [("hour", "2026-03-10T10:00", "2026-03-10T11:00", 1),
      ("minute", "2026-03-10T10:00", "2026-03-10T10:05", -1),
      ("minute", "2026-03-10T10:58", "2026-03-10T11:00", -1)]),
    ("2026-03-10T10:00", "2026-03-10T12:00", "2026-03-10T12:00",  # short: no gain
     [("hour", "2026-03-10T10:00", "2026-03-10T12:00", 1)]),
    ("2026-03-09T00:00", "2026-03-16T00:00", "2026-12-01T00:00",  # whole: as split_window
     [("week", "2026-03-09T00:00", "2026-03-16T00:00", 1)]),
]


QUARTER_COSTS = {**COSTS, "quarter": 55}


def test_quarter_days_where_they_are_priced() -> None:
    """24 h up to now with the quarter days of the domain ranking tiers: yesterday's last
    quarter whole (not 6 hours), the hours before it (cheaper than the quarter before less
    its first 2 hours), today less what is after now."""
    pieces = split_window_for_sums(t("2026-11-26T14:14"), t("2026-11-27T14:14"),
                                   now=t("2026-11-27T14:20"), costs=QUARTER_COSTS)  # type: ignore[arg-type]
    assert pieces == tuple(Piece(tier, t(a), t(b), sign) for tier, a, b, sign in [  # type: ignore[arg-type]
        ("hour", "2026-11-26T14:00", "2026-11-26T18:00", 1),
        ("minute", "2026-11-26T14:00", "2026-11-26T14:14", -1),
        ("quarter", "2026-11-26T18:00", "2026-11-27T00:00", 1),
        ("day", "2026-11-27T00:00", "2026-11-28T00:00", 1),
        ("minute", "2026-11-27T14:14", "2026-11-27T15:00", -1),
        ("hour", "2026-11-27T15:00", "2026-11-27T18:00", -1),
        ("quarter", "2026-11-27T18:00", "2026-11-28T00:00", -1)])
    # Without a quarter price there are no quarters.
    assert all(p.tier != "quarter" for p in split_window_for_sums(
        t("2026-11-26T14:14"), t("2026-11-27T14:14"), now=t("2026-11-27T14:20"),
        costs=COSTS))  # type: ignore[arg-type]


@pytest.mark.parametrize(("since", "until", "now", "expected"), SUMS_CASES)
def test_split_window_for_sums(since: str, until: str, now: str,
                               expected: list[tuple[str, str, str, int]]) -> None:
    pieces = split_window_for_sums(t(since), t(until), now=t(now), costs=COSTS)  # type: ignore[arg-type]
    assert pieces == tuple(Piece(tier, t(a), t(b), sign)  # type: ignore[arg-type]
                           for tier, a, b, sign in expected)


def _minute_counts(pieces: tuple[Piece, ...]) -> dict[datetime, int]:
    count: dict[datetime, int] = {}
    for piece in pieces:
        minute = piece.start
        while minute < piece.end:
            count[minute] = count.get(minute, 0) + piece.sign
            minute += timedelta(minutes=1)
    return count


def _window_minutes(since: datetime, until: datetime) -> set[datetime]:
    return {since + timedelta(minutes=n) for n in range(int((until - since).total_seconds() // 60))}


@pytest.mark.parametrize(("since", "until", "now"), [(t(a), t(b), t(c))
                                                     for a, b, c, _ in SUMS_CASES])
def test_signed_pieces_add_up_to_the_window(since: datetime, until: datetime,
                                            now: datetime) -> None:
    """Every minute of the window counted once, every other minute zero times."""
    count = _minute_counts(split_window_for_sums(since, until, now=now, costs=COSTS))  # type: ignore[arg-type]
    assert {m for m, n in count.items() if n} == _window_minutes(since, until)
    assert set(count.values()) <= {0, 1}


_LENGTHS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1),
            "quarter": timedelta(hours=6), "day": timedelta(days=1), "week": timedelta(weeks=1)}
_MONDAY = t("2000-01-03T00:00")  # every bucket of every tier starts a whole number after it


def _rows(pieces: tuple[Piece, ...], now: datetime, costs: dict[str, float]) -> float:
    """Rows the pieces read by `costs`; buckets that begin after now are empty."""
    total = 0.0
    for piece in pieces:
        bucket = piece.start
        while bucket < piece.end:
            total += costs[piece.tier] if bucket < now else 0.0
            bucket += _LENGTHS[piece.tier]
    return total


@pytest.mark.parametrize("seed", range(40))
def test_random_windows_are_exact_and_never_cost_more(seed: int) -> None:
    """Random windows (a minute to five weeks), nows and costs: the signed pieces count
    each minute of the window once and no other, are aligned to their tiers, and never
    read more rows than the plain split."""
    rng = random.Random(seed)
    base = t("2026-03-02T00:00")  # a Monday
    since = base + timedelta(minutes=rng.randrange(0, 5 * 7 * 1440))
    until = since + timedelta(minutes=rng.choice([
        rng.randrange(1, 120), rng.randrange(60, 3 * 1440), rng.randrange(1440, 36 * 1440)]))
    now = since + (until - since) * rng.uniform(-0.2, 1.3)
    now = now.replace(second=0, microsecond=0)
    hour = rng.uniform(2, 60)
    day = hour * rng.uniform(1.5, 20)
    costs = {"minute": 1.0, "hour": hour, "day": day, "week": day * rng.uniform(1.0, 6.0)}
    if seed % 2:  # with the quarter days of the domain ranking tiers
        costs["quarter"] = hour * rng.uniform(1.5, 6)
    pieces = split_window_for_sums(since, until, now=now, costs=costs)  # type: ignore[arg-type]
    count = _minute_counts(pieces)
    assert {m for m, n in count.items() if n} == _window_minutes(since, until)
    assert set(count.values()) <= {0, 1}
    for piece in pieces:
        assert piece.start < piece.end and piece.sign in (1, -1)
        assert piece.tier in costs
        assert (piece.start - _MONDAY) % _LENGTHS[piece.tier] == timedelta(0)
        assert (piece.end - _MONDAY) % _LENGTHS[piece.tier] == timedelta(0)
    plain = split_window(since, until, coarsest="week")
    assert _rows(pieces, now, costs) <= _rows(plain, now, costs)
