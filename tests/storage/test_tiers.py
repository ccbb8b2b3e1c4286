"""`split_window`: which tier answers which part of a stats window (pure, table-driven)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from socks5_analytics.storage.tiers import Piece, split_window


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
]


@pytest.mark.parametrize(("since", "until", "coarsest", "expected"), CASES)
def test_split_window(since: str, until: str, coarsest: str,
                      expected: list[tuple[str, str, str]]) -> None:
    pieces = split_window(t(since), t(until), coarsest=coarsest)  # type: ignore[arg-type]
    assert pieces == tuple(Piece(tier, t(a), t(b)) for tier, a, b in expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(("since", "until"), [(t(a), t(b)) for a, b, _, _ in CASES])
def test_pieces_tile_the_window(since: datetime, until: datetime) -> None:
    pieces = split_window(since, until)
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
    (t("2026-03-10T00:00"), t("2026-03-11T00:00"), "week", "unknown tier"),
])
def test_bad_windows_are_refused(since: datetime, until: datetime, coarsest: str,
                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_window(since, until, coarsest=coarsest)  # type: ignore[arg-type]
