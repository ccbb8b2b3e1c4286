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

__all__ = ["Piece", "Tier", "split_window"]

Tier = Literal["minute", "hour", "day", "week"]
_ORDER: tuple[Tier, ...] = ("minute", "hour", "day", "week")
_LENGTH: dict[Tier, timedelta] = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1),
                                  "day": timedelta(days=1), "week": timedelta(weeks=1)}


@dataclass(frozen=True, slots=True)
class Piece:
    """Read `tier` for buckets in [start, end)."""

    tier: Tier
    start: datetime
    end: datetime


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
