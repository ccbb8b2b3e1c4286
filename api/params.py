"""Query-string parsing: pure functions from the raw arguments to the repository's inputs.

Every function here takes text and returns a value or raises `BadParameterError` naming the
parameter; none touches a request or the network, so each is tested by a table. The
parameter *names* each route accepts are fixed here too (`ROUTE_PARAMETERS`), and so are
their OpenAPI schemas (`SCHEMAS`), so the document and the parser cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from api.errors import BadParameterError
from socks5_analytics.storage.models import IPAddress, StatsFilter, TrafficInterval
from socks5_analytics.storage.schema import STATUSES

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_WINDOW",
    "INTERVALS",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "ROUTE_PARAMETERS",
    "SCHEMAS",
    "ListQuery",
    "bad_cursor",
    "choose_interval",
    "count_points",
    "parse_choice",
    "parse_cursor",
    "parse_domain",
    "parse_filter",
    "parse_int",
    "parse_ip",
    "parse_list_query",
    "parse_node",
    "parse_status",
    "parse_time",
    "parse_user",
    "parse_window",
    "single_values",
]

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000_000
DEFAULT_WINDOW = timedelta(hours=24)
# Times outside this range are refused: they are no traffic this system can have seen, and
# arithmetic on them (a default window, minute rounding) would overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
INTERVALS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
# With no `interval`, the finest one that gives at most this many points.
AUTO_POINTS = 800
# Bucket boundaries are whole UTC minutes, hours and days counted from this origin.
_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
# The syntax of every accepted value, written once: the parser matches these and the OpenAPI
# document carries them, so what the document calls valid is what the parser takes. Whether
# a well-formed date exists (February 30) is the one thing left to the parser ("invalid_time").
# Unix seconds as `date +%s.%N` prints them; ISO 8601 in its extended form as RFC 3339,
# `date +%FT%T%z` (`+0100`), Go and kubectl (nanoseconds) print it. Digits past the
# microsecond are dropped; lower case `t` and `z` are RFC 3339's.
UNIX_PATTERN = r"[0-9]{1,11}(\.[0-9]{1,9})?"
ISO_PATTERN = (r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
               r"([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]{1,9})?)?"
               r"([Zz]|[+ -][0-9]{2}(:?[0-9]{2})?)?)?")
TIME_PATTERN = f"^({UNIX_PATTERN}|{ISO_PATTERN})$"
_LABEL_PATTERN = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
DOMAIN_PATTERN = rf"^{_LABEL_PATTERN}(\.{_LABEL_PATTERN})*\.?$"
TEXT_PATTERN = r"^[^\u0000]*$"  # PostgreSQL text cannot hold NUL
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,200}$"
_UNIX = re.compile(UNIX_PATTERN)
_TIME = re.compile(TIME_PATTERN)
# An offset at the end, after a time: its sign is group 1 (a space is an unencoded "+").
_OFFSET = re.compile(r"(?<=[0-9])([+ -])([0-9]{2})(:?([0-9]{2}))?$")
_DOMAIN = re.compile(DOMAIN_PATTERN)
_CURSOR = re.compile(CURSOR_PATTERN)

FILTERS = ("user", "source_ip", "domain", "node", "status")
WINDOW = ("from", "to")
PAGE = ("limit", "offset")

ROUTE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "top_domains": (*WINDOW, *PAGE, *FILTERS, "sort", "group"),
    "source_ips": (*WINDOW, *PAGE, *FILTERS, "sort"),
    "users": (*WINDOW, *PAGE, *FILTERS, "sort"),
    "traffic": (*WINDOW, *FILTERS, "interval"),
    "latency": (*WINDOW, *PAGE, *FILTERS, "group_by"),
    "statuses": (*WINDOW, *PAGE, *FILTERS),
    "logs": (*WINDOW, *PAGE, *FILTERS, "cursor"),
    "nodes": (*WINDOW, *PAGE, *FILTERS),
    "none": (),
}

_TIME_SCHEMA = {
    "type": "string",
    "pattern": TIME_PATTERN,
    "description": "ISO 8601 (`2026-03-10T12:00:00Z`, an offset such as `+01:00` or "
    "`+0100`, or none for UTC) or unix seconds (`1773144000`, fractions allowed), from 1970 "
    "to 9998",
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "from": {**_TIME_SCHEMA, "description": "Start of the window, inclusive. "
             + _TIME_SCHEMA["description"] + ". Default: `to` minus 24 hours."},
    "to": {**_TIME_SCHEMA, "description": "End of the window, exclusive. "
           + _TIME_SCHEMA["description"] + ". Default: now."},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT,
              "description": "Items per page."},
    "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0,
               "description": "Items to skip."},
    "user": {"type": "string", "maxLength": 255, "pattern": TEXT_PATTERN,
             "description": "Only this RFC 1929 user; empty: only unauthenticated connections."},
    "source_ip": {"anyOf": [{"type": "string", "format": "ipv4"},
                            {"type": "string", "format": "ipv6"}],
                  "description": "Only this client address (IPv4 or IPv6)."},
    "domain": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DOMAIN_PATTERN,
               "description": "Only connections to this exact domain, any case (an "
               "internationalized one in its IDNA `xn--` form)."},
    "node": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": TEXT_PATTERN,
             "description": "Only events seen by this proxy node."},
    "status": {"type": "string", "enum": sorted(STATUSES),
               "description": "Only connections that ended with this status."},
    "sort": {"type": "string", "enum": ["connections", "bytes"], "default": "connections",
             "description": "Order by connections or by bytes in + out, most first."},
    "group": {"type": "string", "enum": ["domain", "registered_domain"], "default": "domain",
              "description": "Group by the full domain or its registrable part."},
    "interval": {"type": "string", "enum": list(INTERVALS),
                 "description": "Bucket width. Default: the finest giving at most "
                 f"{AUTO_POINTS} points."},
    "group_by": {"type": "string", "enum": ["domain"],
                 "description": "Per destination domain: a list of latency summaries."},
    "cursor": {"type": "string", "pattern": CURSOR_PATTERN,
               "description": "The `next_cursor` of the previous page: continue after it."},
}


@dataclass(frozen=True, slots=True)
class ListQuery:
    """What a stats or logs route asks the repository: window, filters, page."""

    flt: StatsFilter
    limit: int
    offset: int


def single_values(
    args: Mapping[str, Sequence[str]], allowed: Sequence[str]
) -> dict[str, str]:
    """One value per parameter; an unknown or repeated parameter is an error."""
    values: dict[str, str] = {}
    for name, given in args.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise BadParameterError(name, f"unknown parameter (this route takes: {known})",
                                    code="unknown_parameter")
        if len(given) != 1:
            raise BadParameterError(name, "given more than once")
        values[name] = given[0]
    return values


def parse_time(name: str, text: str) -> datetime:
    """ISO 8601 (no offset: UTC) or unix seconds, as an aware UTC datetime."""
    if not _TIME.fullmatch(text):
        raise BadParameterError(
            name, f"expected ISO 8601 or unix seconds, got {text[:64]!r}"
        )
    try:
        if _UNIX.fullmatch(text):
            seconds, _, fraction = text.partition(".")
            moment = EARLIEST + timedelta(seconds=int(seconds),
                                          microseconds=int(fraction[:6].ljust(6, "0")))
        else:
            moment = datetime.fromisoformat(_normalize_iso(text))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            moment = moment.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise BadParameterError(name, f"no such time: {text[:64]!r}",
                                code="invalid_time") from None
    if not EARLIEST <= moment < LATEST:
        raise BadParameterError(name, "must be from 1970-01-01 to 9998-12-31 (UTC)",
                                code="invalid_time")
    return moment


def _normalize_iso(text: str) -> str:
    """What `datetime.fromisoformat` takes: upper case, a decimal point, at most six
    fraction digits, the offset as `+HH:MM` (an unencoded `+0100` arrives as ` 0100`)."""
    text = text.upper().replace(",", ".")
    date, _, clock = text[:10], text[10:11], text[11:]
    if not clock:
        return date
    offset = ""
    found = _OFFSET.search(clock)
    if clock.endswith("Z"):
        clock, offset = clock[:-1], "+00:00"
    elif found is not None:
        sign = "+" if found.group(1) == " " else found.group(1)
        offset = f"{sign}{found.group(2)}:{found.group(4) or '00'}"
        clock = clock[:found.start()]
    whole, point, fraction = clock.partition(".")
    if point:
        clock = f"{whole}.{fraction[:6].ljust(6, '0')}"
    return f"{date}T{clock}{offset}"


def parse_window(
    since_text: str | None, until_text: str | None, *, now: datetime
) -> tuple[datetime, datetime]:
    """`from` and `to` with their defaults (the 24 hours before `to`, `to` = now)."""
    until = parse_time("to", until_text) if until_text is not None else now
    if since_text is not None:
        since = parse_time("from", since_text)
    else:
        since = max(until - DEFAULT_WINDOW, EARLIEST)
    if since > until:
        raise BadParameterError("from", f"is after to ({since.isoformat()} > "
                                f"{until.isoformat()})", code="invalid_range")
    return since, until


def parse_int(name: str, text: str, *, minimum: int, maximum: int) -> int:
    """A decimal integer within [minimum, maximum]."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()) or len(stripped) > 12:
        raise BadParameterError(name, f"expected an integer from {minimum} to {maximum}, "
                                f"got {text[:32]!r}")
    value = int(stripped)
    if not minimum <= value <= maximum:
        raise BadParameterError(name, f"must be from {minimum} to {maximum}, got {value}")
    return value


def parse_choice(name: str, text: str, choices: Sequence[str]) -> str:
    """One of `choices`, exactly."""
    if text not in choices:
        raise BadParameterError(name, f"must be one of {', '.join(choices)}; got {text[:32]!r}")
    return text


def parse_ip(name: str, text: str) -> IPAddress:
    """An IPv4 or IPv6 address (an IPv4-mapped IPv6 address means the IPv4 one)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise BadParameterError(name, f"not an IP address: {text[:64]!r}") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise BadParameterError(name, "a zone index (%...) is not an address")
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def parse_domain(name: str, text: str) -> str:
    """A domain as the proxy records it: lower-case (IDNA), no trailing dot."""
    if len(text) > 253 or not _DOMAIN.fullmatch(text):
        raise BadParameterError(name, f"not a domain name (IDNA form): {text[:64]!r}")
    return text.rstrip(".").lower()


def parse_user(name: str, text: str) -> str:
    """A user name as given; empty means the connections without authentication."""
    if len(text) > 255 or "\x00" in text:
        raise BadParameterError(name, "must be at most 255 characters, without NUL")
    return text


def parse_node(name: str, text: str) -> str:
    """A proxy node id."""
    if not 1 <= len(text) <= 128 or "\x00" in text:
        raise BadParameterError(name, "must be 1 to 128 characters, without NUL")
    return text


def parse_status(name: str, text: str) -> str:
    """One of the event statuses of DESIGN.md."""
    return parse_choice(name, text, sorted(STATUSES))


def parse_cursor(name: str, text: str) -> str:
    """An opaque cursor: its shape is checked here, its meaning by the repository. Either
    refusal is the one error of a cursor that is not one of ours, `invalid_cursor`
    (`bad_cursor`)."""
    if not _CURSOR.fullmatch(text):
        raise bad_cursor(name)
    return text


def bad_cursor(name: str) -> BadParameterError:
    """The error of every cursor the API did not hand out: empty, not base64url, too long,
    or (found by the repository) not decoding to a position."""
    return BadParameterError(name, "malformed cursor (use the `next_cursor` of a page)",
                             code="invalid_cursor")


def parse_filter(values: Mapping[str, str], *, now: datetime) -> StatsFilter:
    """The window and the filters."""
    since, until = parse_window(values.get("from"), values.get("to"), now=now)
    source_ip = values.get("source_ip")
    domain = values.get("domain")
    user = values.get("user")
    node = values.get("node")
    status = values.get("status")
    return StatsFilter(
        since=since,
        until=until,
        user=None if user is None else parse_user("user", user),
        source_ip=None if source_ip is None else parse_ip("source_ip", source_ip),
        domain=None if domain is None else parse_domain("domain", domain),
        node=None if node is None else parse_node("node", node),
        status=None if status is None else parse_status("status", status),
    )


def parse_page(values: Mapping[str, str]) -> tuple[int, int]:
    """`limit` (default 10, at most 1000) and `offset` (default 0)."""
    limit = values.get("limit")
    offset = values.get("offset")
    return (
        DEFAULT_LIMIT if limit is None else parse_int("limit", limit, minimum=1,
                                                      maximum=MAX_LIMIT),
        0 if offset is None else parse_int("offset", offset, minimum=0, maximum=MAX_OFFSET),
    )


def parse_list_query(values: Mapping[str, str], *, now: datetime) -> ListQuery:
    """Window, filters and page of a list route."""
    limit, offset = parse_page(values)
    return ListQuery(flt=parse_filter(values, now=now), limit=limit, offset=offset)


def count_points(since: datetime, until: datetime, step: timedelta) -> int:
    """How many buckets of `step` the repository returns for [since, until)."""
    start = since.replace(second=0, microsecond=0)
    end = until.replace(second=0, microsecond=0)
    if end < until:
        end += timedelta(minutes=1)
    first = _ORIGIN + (start - _ORIGIN) // step * step
    if end <= first:
        return 0
    return -(-(end - first) // step)


def choose_interval(
    text: str | None, since: datetime, until: datetime, *, max_points: int
) -> TrafficInterval:
    """The requested interval, refused when it would give more than `max_points`; or the
    finest interval that gives at most `AUTO_POINTS` points."""
    if text is not None:
        name = parse_choice("interval", text, list(INTERVALS))
        points = count_points(since, until, INTERVALS[name])
        if points > max_points:
            raise BadParameterError(
                "interval",
                f"{name} buckets from {since.isoformat()} to {until.isoformat()} are "
                f"{points} points; the maximum is {max_points}: choose a coarser interval "
                "or a shorter range",
                code="too_many_points",
            )
        return name  # type: ignore[return-value]
    for name, step in INTERVALS.items():
        if count_points(since, until, step) <= min(AUTO_POINTS, max_points):
            return name  # type: ignore[return-value]
    points = count_points(since, until, INTERVALS["1d"])
    if points > max_points:
        raise BadParameterError(
            "from", f"the range is {points} days; the maximum is {max_points} days",
            code="too_many_points",
        )
    return "1d"

