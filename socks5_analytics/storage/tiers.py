"""Which rollup tier answers which part of a stats window (pure; no database).

Each rollup family has a per-minute table and hourly and daily ones keyed alike (the domains
also a weekly one). A window of whole minutes is answered by the weekly rows of the whole
weeks inside it, the daily rows of the whole days left at either end, the hourly rows of the
whole hours left then, and the minute rows of the rest: the fewest rows that add up to
exactly the minute-tier answer. Weeks are ISO weeks: they start on Monday, 00:00 UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

__all__ = ["DAY_IN_HOURS", "Piece", "Tier", "split_window", "split_window_for_sums"]

Tier = Literal["minute", "hour", "day", "week"]
_ORDER: tuple[Tier, ...] = ("minute", "hour", "day", "week")
_LENGTH: dict[Tier, timedelta] = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1),
                                  "day": timedelta(days=1), "week": timedelta(weeks=1)}


@dataclass(frozen=True, slots=True)
class Piece:
    """Read `tier` for buckets in [start, end), added (`sign` 1) or subtracted (-1)."""

    tier: Tier
    start: datetime
    end: datetime
    sign: int = 1


def _floor(moment: datetime, tier: Tier) -> datetime:
    moment = moment.replace(second=0, microsecond=0)
    if tier != "minute":
        moment = moment.replace(minute=0)
    if tier in ("day", "week"):
        moment = moment.replace(hour=0)
    if tier == "week":
        moment -= timedelta(days=moment.weekday())
    return moment


def _ceil(moment: datetime, tier: Tier) -> datetime:
    floored = _floor(moment, tier)
    return floored if floored == moment else floored + _LENGTH[tier]


def split_window(since: datetime, until: datetime, *, coarsest: Tier = "day") -> tuple[Piece, ...]:
    """Cover [since, until), both whole UTC minutes, with tier pieces in time order.

    `coarsest` caps the tier (a 5-minute traffic series cannot use hourly rows). Raises
    ValueError for naive or unaligned times and for since > until: callers widen the window
    to minutes first, and a silent wrong split would be a wrong answer.
    """
    if since.utcoffset() is None or until.utcoffset() is None:
        raise ValueError("since and until must be timezone-aware")
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    if since.second or since.microsecond or until.second or until.microsecond:
        raise ValueError(f"window must be whole minutes, got [{since}, {until})")
    if since > until:
        raise ValueError(f"since {since} is after until {until}")
    if coarsest not in _ORDER:
        raise ValueError(f"unknown tier {coarsest!r}")
    return tuple(_split(since, until, _ORDER[: _ORDER.index(coarsest) + 1]))


def _split(since: datetime, until: datetime, tiers: tuple[Tier, ...]) -> list[Piece]:
    if since >= until:
        return []
    finest, coarser = tiers[0], tiers[1:]
    if not coarser:
        return [Piece(finest, since, until)]
    inner_since, inner_until = _ceil(since, coarser[0]), _floor(until, coarser[0])
    if inner_since >= inner_until:
        return [Piece(finest, since, until)]
    head = [Piece(finest, since, inner_since)] if since < inner_since else []
    tail = [Piece(finest, inner_until, until)] if inner_until < until else []
    return head + _split(inner_since, inner_until, coarser) + tail


# What reading one day's rows costs, in hours' rows: a day holds ~6.6 hours' worth of domain
# rows at 10 M events a month, ~10 at 1 M (the keys of a day overlap more than an hour's).
DAY_IN_HOURS = 8.0


def _hours(start: datetime, end: datetime) -> float:
    return max((end - start).total_seconds(), 0.0) / 3600


def _partial_day(day: datetime, since: datetime, until: datetime, now: datetime,
                 day_in_hours: float) -> list[Piece]:
    """The pieces of [since, until), a part of the UTC `day`: its own minutes and hours, or
    the whole day less the rest of it when that reads fewer rows. The rest after `now`
    costs nothing: nothing is stored there yet (reading it is still exact)."""
    end_of_day = day + timedelta(days=1)
    inside = _hours(since, until)
    outside = [(day, since), (until, end_of_day)]
    outside_cost = day_in_hours + sum(_hours(a, min(b, max(now, a))) for a, b in outside)
    if outside_cost >= inside:
        return list(split_window(since, until, coarsest="hour"))
    less = [Piece(p.tier, p.start, p.end, -1)
            for a, b in outside for p in split_window(a, b, coarsest="hour")]
    return [Piece("day", day, end_of_day), *less]


def split_window_for_sums(since: datetime, until: datetime, *, now: datetime,
                          coarsest: Tier = "week",
                          day_in_hours: float = DAY_IN_HOURS) -> tuple[Piece, ...]:
    """As `split_window`, but a partial day at either end may be read as the whole day
    minus the hours and minutes of it outside the window, when that reads fewer rows
    (a window ending now: today's one daily row per key instead of an hourly row per hour).

    Only for sums: a subtracted piece cannot undo a maximum. Same errors as `split_window`.
    """
    pieces = split_window(since, until, coarsest=coarsest)
    if coarsest in ("minute", "hour") or not pieces:
        return pieces
    since, until = pieces[0].start, pieces[-1].end
    now = now.astimezone(UTC)
    first_day, last_day = _floor(since, "day"), _floor(until, "day")
    if first_day == last_day:  # inside one day
        return tuple(_partial_day(first_day, since, until, now, day_in_hours))
    middle_since, middle_until = _ceil(since, "day"), last_day
    head = (_partial_day(first_day, since, middle_since, now, day_in_hours)
            if since < middle_since else [])
    tail = (_partial_day(last_day, last_day, until, now, day_in_hours)
            if last_day < until else [])
    return (*head, *split_window(middle_since, middle_until, coarsest=coarsest), *tail)
