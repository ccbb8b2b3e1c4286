"""The query-string parsers, table by table (pure functions: no server, no database)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from api.errors import BadParameterError
from api.params import (
    ROUTE_PARAMETERS,
    SCHEMAS,
    TIME_PATTERN,
    choose_interval,
    count_points,
    parse_cursor,
    parse_domain,
    parse_filter,
    parse_int,
    parse_ip,
    parse_page,
    parse_time,
    parse_window,
    single_values,
)

NOW = datetime(2026, 3, 10, 12, 30, 15, tzinfo=UTC)
T = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-03-10T12:00:00Z", T),
    ("2026-03-10T12:00:00+00:00", T),
    ("2026-03-10T13:00:00+01:00", T),
    ("2026-03-10T13:00:00 01:00", T),  # an unencoded "+" arrives as a space
    ("2026-03-10T07:00:00-05:00", T),
    ("2026-03-10T12:00:00", T),  # no offset: UTC
    ("2026-03-10 12:00", T),
    ("2026-03-10", T - timedelta(hours=12)),
    ("2026-03-10T12:00:00.250Z", T + timedelta(milliseconds=250)),
    ("1773144000", T),
    ("1773144000.5", T + timedelta(milliseconds=500)),
    ("0", datetime(1970, 1, 1, tzinfo=UTC)),
    # ISO 8601 / RFC 3339 as common tools print it:
    ("2026-03-10T13:00:00+0100", T),  # date +%FT%T%z
    ("2026-03-10T13:00:00 0100", T),  # the same, its "+" unencoded
    ("2026-03-10T13:00:00+01", T),
    ("2026-03-10T07:00:00-0500", T),
    ("2026-03-10T12:00:00.123456789Z", T + timedelta(microseconds=123456)),  # Go, kubectl
    ("2026-03-10T12:00:00,5Z", T + timedelta(milliseconds=500)),  # ISO's decimal comma
    ("2026-03-10t12:00:00z", T),  # RFC 3339 allows lower case
    ("1773144000.123456789", T + timedelta(microseconds=123456)),  # date +%s.%N
    ("1773144000.000001", T + timedelta(microseconds=1)),  # exact, not through a float
])
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time("from", text) == expected
    assert parse_time("from", text).tzinfo is UTC


@pytest.mark.parametrize("text", [
    "", "now", "yesterday", "2026-13-01", "2026-03-10T25:00", "12:00", "-1", "1e9",
    "99999999999999999999", "1969-12-31T23:59:59Z", "9999-12-31", "0x10", "١٧٧٣١٤٤٠٠٠",
    "2026-03-10T12:00:00+25:00", "nan", "inf", "2026-03-10T12:00:00+1", "2026-03-10T12:00:00+010",
    "2026-03-10T12:00:00.1234567890Z", "2026-03-10T12:00:00.Z", "1773144000.1234567890",
])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(BadParameterError) as caught:
        parse_time("to", text)
    assert caught.value.parameter == "to"
    assert caught.value.message.startswith("to: ")
    # what matches the documented syntax is refused only for the calendar or the range
    assert (caught.value.code == "invalid_time") == bool(re.fullmatch(TIME_PATTERN, text))


@pytest.mark.parametrize(("since", "until", "expected"), [
    (None, None, (NOW - timedelta(hours=24), NOW)),
    ("2026-03-10T00:00:00Z", None, (T - timedelta(hours=12), NOW)),
    (None, "2026-03-10T12:00:00Z", (T - timedelta(hours=24), T)),
    ("2026-03-10T12:00:00Z", "2026-03-10T12:00:00Z", (T, T)),  # empty, not an error
    (None, "1970-01-01T06:00:00Z", (datetime(1970, 1, 1, tzinfo=UTC),
                                    datetime(1970, 1, 1, 6, tzinfo=UTC))),
])
def test_parse_window(since: str | None, until: str | None,
                      expected: tuple[datetime, datetime]) -> None:
    assert parse_window(since, until, now=NOW) == expected


def test_window_from_after_to() -> None:
    with pytest.raises(BadParameterError) as caught:
        parse_window("2026-03-10T12:00:01Z", "2026-03-10T12:00:00Z", now=NOW)
    assert (caught.value.parameter, caught.value.code) == ("from", "invalid_range")
    with pytest.raises(BadParameterError):
        parse_window("2026-03-11T00:00:00Z", None, now=NOW)  # after the default `to`, now


@pytest.mark.parametrize(("text", "ok"), [
    ("1", True), ("10", True), ("1000", True), ("0", False), ("1001", False), ("-1", False),
    ("", False), ("1.5", False), ("ten", False), (" 5", True), ("+5", False),
    ("99999999999999999999999", False), ("²", False),
])
def test_parse_int(text: str, ok: bool) -> None:
    if ok:
        assert parse_int("limit", text, minimum=1, maximum=1000) == int(text)
    else:
        with pytest.raises(BadParameterError, match=r"^limit: "):
            parse_int("limit", text, minimum=1, maximum=1000)


@pytest.mark.parametrize(("values", "expected"), [
    ({}, (10, 0)),
    ({"limit": "1000", "offset": "0"}, (1000, 0)),
    ({"offset": "1000000000"}, (10, 1_000_000_000)),
])
def test_parse_page(values: dict[str, str], expected: tuple[int, int]) -> None:
    assert parse_page(values) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", IPv4Address("192.0.2.1")),
    ("2001:db8::1", IPv6Address("2001:db8::1")),
    ("2001:DB8:0::1", IPv6Address("2001:db8::1")),
    ("::ffff:192.0.2.1", IPv4Address("192.0.2.1")),  # the address the proxy records
])
def test_parse_ip(text: str, expected: Any) -> None:
    assert parse_ip("source_ip", text) == expected


@pytest.mark.parametrize("text", ["", "192.0.2", "192.0.2.256", "example.com", "::g",
                                  "192.0.2.0/24", "01.2.3.4", "fe80::1%eth0"])
def test_parse_ip_refuses(text: str) -> None:
    with pytest.raises(BadParameterError, match=r"^source_ip: "):
        parse_ip("source_ip", text)


@pytest.mark.parametrize(("text", "expected"), [
    ("www.Example.COM", "www.example.com"),
    ("example.com.", "example.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("_dmarc.example.com", "_dmarc.example.com"),
    ("localhost", "localhost"),
])
def test_parse_domain(text: str, expected: str) -> None:
    assert parse_domain("domain", text) == expected


@pytest.mark.parametrize("text", ["", ".", "a..b", "-a.example", "a b.example",
                                  "a/b", "x" * 64 + ".example", "a." * 127 + "aa", "☃",
                                  "bücher.example", "a-.example", "a\x00b"])
def test_parse_domain_refuses(text: str) -> None:
    with pytest.raises(BadParameterError, match=r"^domain: "):
        parse_domain("domain", text)


@pytest.mark.parametrize(("values", "field", "expected"), [
    ({"user": ""}, "user", ""),
    ({"user": "alice"}, "user", "alice"),
    ({"node": "node-a"}, "node", "node-a"),
    ({"status": "rate_limited"}, "status", "rate_limited"),
    ({}, "status", None),
])
def test_parse_filter(values: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(parse_filter(values, now=NOW), field) == expected


@pytest.mark.parametrize(("values", "parameter"), [
    ({"status": "OK"}, "status"),
    ({"status": "bogus"}, "status"),
    ({"node": ""}, "node"),
    ({"node": "n" * 129}, "node"),
    ({"user": "u" * 256}, "user"),
    ({"user": "a\x00"}, "user"),
    ({"source_ip": "x"}, "source_ip"),
])
def test_parse_filter_refuses(values: dict[str, str], parameter: str) -> None:
    with pytest.raises(BadParameterError) as caught:
        parse_filter(values, now=NOW)
    assert caught.value.parameter == parameter


@pytest.mark.parametrize("text", ["", "not*a*cursor", "MTp6eg==", "a b", "A" * 201])
def test_parse_cursor_refuses_with_invalid_cursor(text: str) -> None:
    with pytest.raises(BadParameterError) as caught:
        parse_cursor("cursor", text)
    assert (caught.value.parameter, caught.value.code) == ("cursor", "invalid_cursor")


def test_parse_cursor() -> None:
    assert parse_cursor("cursor", "MTp6eg") == "MTp6eg"


def test_single_values() -> None:
    assert single_values({"limit": ["5"]}, ("limit",)) == {"limit": "5"}
    with pytest.raises(BadParameterError) as caught:
        single_values({"limit": ["5", "6"]}, ("limit",))
    assert caught.value.parameter == "limit"
    with pytest.raises(BadParameterError) as caught:
        single_values({"limt": ["5"]}, ("limit",))
    assert (caught.value.parameter, caught.value.code) == ("limt", "unknown_parameter")


@pytest.mark.parametrize(("since", "until", "step", "points"), [
    (T, T, timedelta(minutes=1), 0),
    (T, T + timedelta(minutes=1), timedelta(minutes=1), 1),
    (T, T + timedelta(seconds=1), timedelta(minutes=1), 1),
    (T + timedelta(seconds=59), T + timedelta(minutes=1, seconds=1), timedelta(minutes=1), 2),
    (T, T + timedelta(hours=24), timedelta(minutes=5), 288),
    (T + timedelta(minutes=7), T + timedelta(hours=2), timedelta(hours=1), 2),
    (T, T + timedelta(days=30), timedelta(hours=1), 720),
    (T + timedelta(minutes=30), T + timedelta(days=1), timedelta(days=1), 2),
])
def test_count_points(since: datetime, until: datetime, step: timedelta, points: int) -> None:
    assert count_points(since, until, step) == points


@pytest.mark.parametrize(("text", "span", "expected"), [
    (None, timedelta(hours=1), "1m"),
    (None, timedelta(hours=24), "5m"),
    (None, timedelta(days=7), "1h"),
    (None, timedelta(days=30), "1h"),
    (None, timedelta(days=90), "1d"),
    ("1m", timedelta(days=6), "1m"),
    ("1d", timedelta(hours=1), "1d"),
])
def test_choose_interval(text: str | None, span: timedelta, expected: str) -> None:
    assert choose_interval(text, T, T + span, max_points=10_000) == expected


@pytest.mark.parametrize(("text", "span", "parameter"), [
    ("1m", timedelta(days=8), "interval"),
    ("5m", timedelta(days=40), "interval"),
    ("2m", timedelta(hours=1), "interval"),
    (None, timedelta(days=10_001), "from"),
])
def test_choose_interval_refuses(text: str | None, span: timedelta, parameter: str) -> None:
    with pytest.raises(BadParameterError) as caught:
        choose_interval(text, T, T + span, max_points=10_000)
    assert caught.value.parameter == parameter
    if caught.value.code == "too_many_points":
        assert "the maximum is 10000" in caught.value.message


def test_every_route_parameter_has_a_schema() -> None:
    for names in ROUTE_PARAMETERS.values():
        assert set(names) <= set(SCHEMAS)
