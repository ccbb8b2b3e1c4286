"""The normalizer, by tables: what each wire field becomes, and each malformed field's reason."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from ingest_client import make_event, make_interim, stamp

from collector.normalize import (
    DomainRules,
    canonical_domain,
    canonical_ip,
    default_suffix_list,
    domain_answer,
    host_answer,
    normalize_batch,
    normalize_event,
    normalize_interim,
)
from socks5_analytics.domains import could_be_ip
from socks5_analytics.storage import InterimReport, StoredEvent
from socks5_analytics.storage.validation import check_event, check_interim
from socks5_analytics.stubs.traffic.v1 import event_pb2 as pb

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
RULES = DomainRules(default_suffix_list())
ID = uuid.UUID("01936a5e-0000-7000-8000-000000000001")


def wire(**fields: Any) -> pb.ConnectionEvent:
    base: dict[str, Any] = {
        "event_id": ID.bytes,
        "started_at": stamp(NOW - timedelta(seconds=5)),
        "ended_at": stamp(NOW - timedelta(seconds=1)),
    }
    base.update(fields)
    return make_event(**base)


def interim(**fields: Any) -> pb.InterimReport:
    """An interim report stamped relative to NOW (not the wall clock, so tests never age)."""
    base: dict[str, Any] = {
        "started_at": stamp(NOW - timedelta(minutes=1)),
        "reported_at": stamp(NOW),
    }
    base.update(fields)
    return make_interim(**base)


def event(**fields: Any) -> StoredEvent:
    row = normalize_event(wire(**fields), node_id="stream-node", now=NOW, rules=RULES)
    assert isinstance(row, StoredEvent), row
    assert check_event(row) is None  # whatever we make, the repository takes
    return row


def reason(**fields: Any) -> str:
    row = normalize_event(wire(**fields), node_id="stream-node", now=NOW, rules=RULES)
    assert isinstance(row, str), row
    return row


def test_a_valid_event_keeps_every_field() -> None:
    row = event(trace_id=bytes(range(1, 17)))
    assert row == StoredEvent(
        event_id=ID, node_id="node-a",
        started_at=NOW - timedelta(seconds=5), ended_at=NOW - timedelta(seconds=1),
        source_ip=IPv4Address("10.0.0.7"), source_port=40000, user_name="alice",
        command="connect", protocol="tcp", dest_host="www.example.co.uk",
        domain="www.example.co.uk", dest_ip=IPv4Address("93.184.216.34"), dest_port=443,
        registered_domain="example.co.uk", status="ok", reply_code=0,
        close_reason="client", connect_ms=12.5, ttfb_ms=30.0, duration_ms=1000.0,
        bytes_out=100, bytes_in=2000, trace_id="0102030405060708090a0b0c0d0e0f10",
    )
    assert row.started_at.tzinfo is UTC


@pytest.mark.parametrize(("sent", "domain", "registered"), [
    ("www.bbc.co.uk", "www.bbc.co.uk", "bbc.co.uk"),
    ("WWW.BBC.CO.UK.", "www.bbc.co.uk", "bbc.co.uk"),       # case, root dot
    ("Bücher.Example.de", "xn--bcher-kva.example.de", "example.de"),  # IDNA (UTS 46)
    ("xn--bcher-kva.example.de", "xn--bcher-kva.example.de", "example.de"),
    ("co.uk", "co.uk", None),                                # a public suffix itself
    ("localhost", "localhost", None),
    ("a.b.github.io", "a.b.github.io", "github.io"),         # ICANN section by default
    ("host.internal-corp", "host.internal-corp", "host.internal-corp"),  # unknown TLD: *
    ("_sip._tcp.example.com", "_sip._tcp.example.com", "example.com"),  # DNS allows _
    ("192.0.2.1", None, None),                               # an IP literal sent as a name
])
def test_domains(sent: str, domain: str | None, registered: str | None) -> None:
    row = event(domain=sent, dest_host=sent)
    assert (row.domain, row.registered_domain) == (domain, registered)


def test_private_section_on_request() -> None:
    rules = DomainRules(default_suffix_list(private_domains=True))
    row = normalize_event(wire(domain="a.b.github.io"), node_id="n", now=NOW, rules=rules)
    assert isinstance(row, StoredEvent) and row.registered_domain == "b.github.io"


@pytest.mark.parametrize(("sent", "kept"), [
    ("2001:DB8::0:1", "2001:db8::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("192.0.2.1", "192.0.2.1"),
    ("Example.COM", "example.com"),
])
def test_dest_host_canonical(sent: str, kept: str) -> None:
    assert event(dest_host=sent).dest_host == kept


@pytest.mark.parametrize(("raw", "address"), [
    (bytes([192, 0, 2, 1]), IPv4Address("192.0.2.1")),
    (IPv6Address("2001:db8::1").packed, IPv6Address("2001:db8::1")),
    (IPv6Address("::ffff:192.0.2.1").packed, IPv4Address("192.0.2.1")),  # dual-stack view
])
def test_canonical_ip(raw: bytes, address: IPv4Address | IPv6Address) -> None:
    assert canonical_ip(raw) == address


def test_optional_fields_absent() -> None:
    message = wire()
    for name in ("dest_host", "domain", "dest_port", "reply_code", "connect_ms", "ttfb_ms",
                 "dest_ip", "trace_id"):
        message.ClearField(name)
    row = normalize_event(message, node_id="stream-node", now=NOW, rules=RULES)
    assert isinstance(row, StoredEvent)
    assert (row.dest_host, row.domain, row.registered_domain, row.dest_ip, row.dest_port,
            row.reply_code, row.connect_ms, row.ttfb_ms, row.trace_id) == (None,) * 9


def test_clamps() -> None:
    row = event(node_id="", trace_id=bytes(16),
                started_at=Timestamp(seconds=int((NOW - timedelta(seconds=5)).timestamp()),
                                     nanos=123_456_789))
    assert row.node_id == "stream-node"  # the stream's node when the event names none
    assert row.trace_id is None  # all zeros: OpenTelemetry's invalid trace id
    assert row.started_at.microsecond == 123_456  # truncated to PostgreSQL's precision


BAD_EVENTS: list[tuple[dict[str, Any], str]] = [
    ({"event_id": b"short"}, "event_id: 5 bytes, expected 16"),
    ({"node_id": "n" * 129}, "node_id: 129 characters"),
    ({"started_at": None}, "started_at: missing"),
    ({"ended_at": Timestamp(seconds=1, nanos=0)}, "ended_at: 1970-01-01T00:00:01+00:00 is "
     "before 2000"),
    ({"ended_at": Timestamp(seconds=0, nanos=-5)}, "ended_at: not a valid timestamp"),
    ({"ended_at": stamp(NOW + timedelta(hours=1))}, "ended_at: 2026-11-27T13:00:00+00:00 is "
     "ahead of the collector's clock by more than 300 s"),
    ({"ended_at": stamp(NOW - timedelta(seconds=10))}, "ended_at: 2026-11-27T11:59:50+00:00 "
     "is before started_at"),
    ({"source_ip": bytes(5)}, "source_ip: 5 bytes, expected 4 or 16"),
    ({"source_ip": b""}, "source_ip: 0 bytes, expected 4 or 16"),
    ({"source_port": 70000}, "source_port: 70000 is over 65535"),
    ({"user": "u" * 256}, "user: 256 characters, at most 255"),
    ({"user": "a\x00b"}, "user: contains a NUL character"),
    ({"command": pb.COMMAND_UNSPECIFIED}, "command: unspecified"),
    ({"command": 42}, "command: 42 is not a known value"),
    ({"protocol": pb.PROTOCOL_UNSPECIFIED}, "protocol: unspecified"),
    ({"status": 99}, "status: 99 is not a known value"),
    ({"close_reason": pb.CLOSE_REASON_UNSPECIFIED}, "close_reason: unspecified"),
    ({"domain": "a..b"}, "domain: has an empty label"),
    ({"domain": "x" * 64 + ".com"}, "domain: a label of 64 characters, at most 63"),
    ({"domain": "a b.com"}, "domain: contains spaces or control characters"),
    ({"domain": "\u2603\u0301.com"}, "domain: not a valid internationalized name"),
    ({"dest_host": "a." * 127 + "a"}, "dest_host: 255 characters, at most 253"),
    ({"dest_host": "a..b"}, "dest_host: has an empty label"),
    ({"dest_ip": bytes(3)}, "dest_ip: 3 bytes, expected 4 or 16"),
    ({"dest_port": 65536}, "dest_port: 65536 is over 65535"),
    ({"reply_code": 256}, "reply_code: 256 is over 255"),
    ({"connect_ms": -1.0}, "connect_ms: -1.0 is not a finite number >= 0"),
    ({"ttfb_ms": math.nan}, "ttfb_ms: nan is not a finite number >= 0"),
    ({"duration_ms": math.inf}, "duration_ms: inf is not a finite number >= 0"),
    ({"bytes_in": 1 << 63}, "bytes_in: 9223372036854775808 is over 2^63-1"),
    ({"bytes_out": (1 << 64) - 1}, "bytes_out: 18446744073709551615 is over 2^63-1"),
    ({"trace_id": bytes(8)}, "trace_id: 8 bytes, expected 16"),
]


@pytest.mark.parametrize(("fields", "expected"), BAD_EVENTS,
                         ids=[next(iter(f)) + "-" + str(i) for i, (f, _) in enumerate(BAD_EVENTS)])
def test_malformed_events_name_the_field(fields: dict[str, Any], expected: str) -> None:
    message = wire(**{k: v for k, v in fields.items() if v is not None})
    for name, value in fields.items():
        if value is None:
            message.ClearField(name)
    row = normalize_event(message, node_id="stream-node", now=NOW, rules=RULES)
    assert isinstance(row, str)
    assert expected in row


def test_every_bad_field_is_reported() -> None:
    text = reason(source_ip=b"", source_port=70000, status=0)
    assert text.split("; ") == ["source_ip: 0 bytes, expected 4 or 16",
                                "source_port: 70000 is over 65535", "status: unspecified"]


def test_interims() -> None:
    message = interim(event_id=ID.bytes, started_at=stamp(NOW - timedelta(minutes=2)),
                           reported_at=stamp(NOW), domain="CDN.Example.com",
                           source_ip=IPv6Address("2001:db8::5").packed)
    report = normalize_interim(message, node_id="stream-node", now=NOW, rules=RULES)
    assert report == InterimReport(
        event_id=ID, node_id="stream-node", started_at=NOW - timedelta(minutes=2),
        reported_at=NOW, source_ip=IPv6Address("2001:db8::5"), user_name="alice",
        domain="cdn.example.com", registered_domain="example.com", bytes_out=10,
        bytes_in=5000,
    )
    assert check_interim(report) is None
    bad = normalize_interim(interim(reported_at=stamp(NOW - timedelta(hours=1)),
                                         started_at=stamp(NOW), bytes_in=1 << 63),
                            node_id="n", now=NOW, rules=RULES)
    assert bad == ("reported_at: 2026-11-27T11:00:00+00:00 is before started_at; "
                   "bytes_in: 9223372036854775808 is over 2^63-1")


def test_batch_keeps_positions() -> None:
    events = [wire(event_id=uuid.uuid4().bytes), wire(event_id=b"bad"),
              wire(event_id=uuid.uuid4().bytes, status=0)]
    interims = [interim(source_ip=b"x"), interim(started_at=stamp(NOW),
                                                           reported_at=stamp(NOW))]
    result = normalize_batch(events, interims, node_id="n", now=NOW, rules=RULES)
    assert result.event_positions == (0,)
    assert result.interim_positions == (1,)
    assert [(i.index, i.interim, i.event_id, i.reason.split(":")[0]) for i in result.invalid] == [
        (1, False, b"", "event_id"),
        (2, False, events[2].event_id, "status"),
        (0, True, interims[0].event_id, "source_ip"),
    ]


@pytest.mark.parametrize("text", ["", ".", "a" * 250 + ".com"])
def test_canonical_domain_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        canonical_domain(text)


NAMES = ["www.bbc.co.uk", "WWW.BBC.CO.UK.", "Bücher.Example.de", "co.uk", "a.b.github.io",
         "192.0.2.1", "192.0.2.1.", "2001:DB8::1", "::ffff:192.0.2.1", "fe80::1%eth0", "a..b",
         "a b.com", "\u2603\u0301.com", "1.2.3", "127.1", "\u0661\u0662.1.1.1", "_sip._tcp.x.com",
         "x" * 64 + ".com", "a:b"]


def test_cached_answers_equal_uncached_ones_and_the_caches_stay_bounded() -> None:
    rules = DomainRules(default_suffix_list(), cache_size=4)
    for _ in range(2):  # more names than room: answered anew after their eviction
        for name in NAMES:
            for _ in range(2):  # answered from the cache
                assert rules.domain(name) == domain_answer(rules.suffixes, name)
                assert rules.host(name) == host_answer(rules.domain, name)
    for raw in (bytes([192, 0, 2, 1]), IPv6Address("::ffff:192.0.2.1").packed, bytes(16)) * 3:
        assert rules.ip(raw) == canonical_ip(raw)
    for cache in (rules.domain, rules.host, rules.ip):
        info = cache.cache_info()
        assert info.maxsize == 4 and info.currsize <= 4 and info.hits > 0


def test_a_bad_address_is_refused_every_time_not_cached() -> None:
    rules = DomainRules(default_suffix_list())
    for _ in range(2):
        with pytest.raises(ValueError, match="5 bytes"):
            rules.ip(bytes(5))


@pytest.mark.parametrize("text", [*NAMES, "1.2.3.4", "::", "0.0.0.0", "::1", "1.2.3.4%x",
                                          "12345", "\uff11.2.3.4", "", "."])
def test_the_ip_prefilter_never_refuses_an_address(text: str) -> None:
    try:
        ip_address(text)
    except ValueError:
        return
    assert could_be_ip(text)


def test_event_ids_are_uuids() -> None:
    row = event()
    assert isinstance(row.event_id, uuid.UUID)
    assert row.event_id == ID and hash(row.event_id) == hash(ID) and str(row.event_id) == str(ID)
