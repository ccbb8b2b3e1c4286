"""Which rollup tier answers which part of a stats window (pure; no database).

Each rollup family has a per-minute table and hourly and daily ones keyed alike (the
domains also a weekly one, and ranking tiers per quarter day, day and week). A window of
whole minutes is answered by the weekly rows of the whole weeks inside it, the daily rows
of the whole days left at either end, the hourly rows of the whole hours left then, and
the minute rows of the rest: the fewest rows that add up to exactly the minute-tier answer.
Weeks are ISO weeks: they start on Monday, 00:00 UTC. Sums may also subtract
(`split_window_for_sums`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Literal

__all__ = [
    "RANK_SUM_COSTS",
    "SUM_COSTS",
    "Piece",
    "Tier",
    "buckets",
    "split_window",
    "split_window_for_sums",
]

Tier = Literal["minute", "hour", "quarter", "day", "week"]
# Every family has these (the domains the week too); "quarter" (6 hours, from 00:00 UTC)
# exists only as a domain ranking tier, for sums.
_ORDER: tuple[Tier, ...] = ("minute", "hour", "day", "week")
_ALL: tuple[Tier, ...] = ("minute", "hour", "quarter", "day", "week")
_LENGTH: dict[Tier, timedelta] = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1),
                                  "quarter": timedelta(hours=6), "day": timedelta(days=1),
                                  "week": timedelta(weeks=1)}


@dataclass(frozen=True, slots=True)
class Piece:
    """Read `tier` for buckets in [start, end), added (`sign` 1) or subtracted (-1)."""

    tier: Tier
    start: datetime
    end: datetime
    sign: int = 1


def buckets(piece: Piece) -> list[datetime]:
    """The starts of the buckets of `piece` (aligned to its tier, as split_window makes it)."""
    step = _LENGTH[piece.tier]
    count = -(-(piece.end - piece.start) // step)
    return [piece.start + step * n for n in range(count)]


def _floor(moment: datetime, tier: Tier) -> datetime:
    moment = moment.replace(second=0, microsecond=0)
    if tier != "minute":
        moment = moment.replace(minute=0)
    if tier == "quarter":
        moment = moment.replace(hour=moment.hour - moment.hour % 6)
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


# What reading one bucket of each tier costs, in rows, to choose the pieces of a ranking:
# about what each holds per bucket at 10 M events a month (20,000 Zipf domains): ~150
# domain-and-status keys a minute, ~3,600 an hour, ~23,600 a day, ~47,000 a week (nearly
# every domain is active every day, so a week holds twice a day, not seven times). In the
# domain ranking tiers, without the status: ~9,600 domains a quarter day, ~16,800 a day,
# ~20,000 a week. At 1 M events the proportions are alike. Only the choice of pieces
# depends on these; every choice is exact.
SUM_COSTS: Mapping[Tier, float] = MappingProxyType(
    {"minute": 150.0, "hour": 3_600.0, "day": 23_600.0, "week": 47_000.0})
RANK_SUM_COSTS: Mapping[Tier, float] = MappingProxyType(
    {"minute": 150.0, "hour": 3_600.0, "quarter": 9_600.0, "day": 16_800.0,
     "week": 20_000.0})


_Cover = tuple[float, tuple[Piece, ...]]


def _negated(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    return tuple(Piece(p.tier, p.start, p.end, -p.sign) for p in pieces)


class _Planner:
    """The cheapest signed pieces for a window, by `costs` (memoized: the same parts of a
    window come up under several alternatives)."""

    def __init__(self, now: datetime, costs: Mapping[Tier, float]) -> None:
        self.now, self.costs = now, costs
        self.memo: dict[tuple[datetime, datetime, tuple[Tier, ...]], _Cover] = {}

    def cost(self, tier: Tier, start: datetime, end: datetime) -> float:
        """Rows read for the buckets of `tier` in [start, end): buckets that begin after
        `now` cost nothing (nothing is stored there yet; reading them is still exact)."""
        live_end = min(end, max(self.now, start))
        if live_end <= start:
            return 0.0
        return self.costs[tier] * -(-(live_end - start) // _LENGTH[tier])

    def cover(self, since: datetime, until: datetime, tiers: tuple[Tier, ...]) -> _Cover:
        """Signed pieces of `tiers` (finest first) that count every minute of [since,
        until) once and every other minute zero times, reading the fewest rows."""
        if since >= until:
            return 0.0, ()
        key = (since, until, tiers)
        if key not in self.memo:
            self.memo[key] = self._cover(since, until, tiers)
        return self.memo[key]

    def _cover(self, since: datetime, until: datetime, tiers: tuple[Tier, ...]) -> _Cover:
        top, finer = tiers[-1], tiers[:-1]
        if not finer:
            return self.cost(top, since, until), (Piece(top, since, until),)
        without = self.cover(since, until, finer)  # no bucket of `top` at all
        inner_since, inner_until = _ceil(since, top), _floor(until, top)
        if inner_since > inner_until:  # inside one bucket of `top`
            options = [without, self.whole_less(since, until, _floor(since, top), tiers)]
        else:  # whole buckets of `top` in the middle (maybe none), parts at either end
            head = (self.part(since, inner_since, _floor(since, top), tiers)
                    if since < inner_since else (0.0, ()))
            tail = (self.part(inner_until, until, inner_until, tiers)
                    if inner_until < until else (0.0, ()))
            middle: _Cover = ((self.cost(top, inner_since, inner_until),
                               (Piece(top, inner_since, inner_until),))
                              if inner_since < inner_until else (0.0, ()))
            options = [(head[0] + middle[0] + tail[0], head[1] + middle[1] + tail[1]),
                       without]
        # The first of equals: the plain split when the tricks gain nothing.
        return min(options, key=lambda option: option[0])

    def part(self, since: datetime, until: datetime, bucket: datetime,
             tiers: tuple[Tier, ...]) -> _Cover:
        """[since, until), a part of the bucket of `tiers[-1]` that starts at `bucket`: from
        the finer tiers, or as the whole bucket less the rest of it, whichever is cheaper."""
        return min((self.cover(since, until, tiers[:-1]),
                    self.whole_less(since, until, bucket, tiers)),
                   key=lambda option: option[0])

    def whole_less(self, since: datetime, until: datetime, bucket: datetime,
                   tiers: tuple[Tier, ...]) -> _Cover:
        top, finer = tiers[-1], tiers[:-1]
        end = bucket + _LENGTH[top]
        before, after = self.cover(bucket, since, finer), self.cover(until, end, finer)
        return (self.cost(top, bucket, end) + before[0] + after[0],
                (Piece(top, bucket, end), *_negated(before[1]), *_negated(after[1])))


def _merged(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    """The pieces in time order (added before subtracted at one start), adjacent ones of one
    tier and sign as one: fewer branches to plan."""
    merged: list[Piece] = []
    for piece in sorted(pieces, key=lambda p: (_ALL.index(p.tier), -p.sign, p.start)):
        last = merged[-1] if merged else None
        if last is not None and (last.tier, last.sign, last.end) == (
                piece.tier, piece.sign, piece.start):
            merged[-1] = Piece(piece.tier, last.start, piece.end, piece.sign)
        else:
            merged.append(piece)
    return tuple(sorted(merged, key=lambda p: (p.start, -p.sign, _ALL.index(p.tier))))


def split_window_for_sums(since: datetime, until: datetime, *, now: datetime,
                          coarsest: Tier = "week",
                          costs: Mapping[Tier, float] = SUM_COSTS) -> tuple[Piece, ...]:
    """As `split_window`, but a partial bucket of any tier (an hour, a day, an ISO week) at
    either end of the window may be read as the whole bucket less the rest of it, when that
    reads fewer rows by `costs` (a window ending now: this week's one row per key instead
    of a daily row per key and day, today's hours and the hour's minutes). Added (`sign`
    1) and subtracted (-1) pieces count every minute of the window once, every other
    minute zero times. The tiers are those `costs` prices, up to `coarsest`: with a
    "quarter" price, quarter days (6 hours from 00:00 UTC) too.

    Only for sums: a subtracted piece cannot undo a maximum. Same errors as `split_window`.
    """
    pieces = split_window(since, until, coarsest=coarsest)
    if not pieces:
        return pieces
    since, until = pieces[0].start, pieces[-1].end
    # The tiers `costs` prices, up to `coarsest` ("quarter" only where it exists).
    tiers = tuple(tier for tier in _ALL[: _ALL.index(coarsest) + 1]
                  if tier in costs or tier == "minute")
    return _merged(_Planner(now.astimezone(UTC), costs).cover(since, until, tiers)[1])
