"""Every route over real HTTP against a real database holding known traffic.

Expected numbers come from `Traffic`'s plain-Python oracle over the very events stored, so
each count, byte total, average and order is checked exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from typing import Any

import httpx
import pytest
from api_harness import RunningApi, Traffic, api_settings, event, iso

from socks5_analytics.storage import NodeReport

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
BASE = NOW.replace(minute=0) - timedelta(hours=2)
FROM, TO = BASE, BASE + timedelta(minutes=15)
WINDOW = {"from": iso(FROM), "to": iso(TO)}


def _traffic() -> Traffic:
    t = Traffic()
    at = lambda minute, second=0: BASE + timedelta(minutes=minute, seconds=second)  # noqa: E731
    for minute, ms in ((0, 10.0), (1, 20.0), (2, 30.0)):
        t.events.append(event(at(minute, 5), bytes_in=1_000, bytes_out=100, connect_ms=ms))
    t.events.append(event(at(3), domain="api.example.com", dest_host="api.example.com",
                          bytes_in=5_000, bytes_out=500, connect_ms=40.0))
    for minute, ms in ((4, 100.0), (5, 300.0)):
        t.events.append(event(at(minute, 30), node_id="node-b", user_name="bob",
                              source_ip=ip_address("192.0.2.20"), domain="www.bbc.co.uk",
                              dest_host="www.bbc.co.uk", registered_domain="bbc.co.uk",
                              bytes_in=200_000, bytes_out=2_000, connect_ms=ms))
    t.events.append(event(at(6), user_name="", source_ip=ip_address("2001:db8::1"),
                          domain=None, registered_domain=None, dest_host="198.51.100.9",
                          dest_ip=ip_address("198.51.100.9"), bytes_in=70, bytes_out=7,
                          connect_ms=5.0))
    t.events.append(event(at(7), node_id="node-b", user_name="bob",
                          source_ip=ip_address("192.0.2.20"), domain="blocked.example.org",
                          dest_host="blocked.example.org", registered_domain="example.org",
                          dest_ip=None, status="denied_destination", reply_code=2,
                          close_reason="error", connect_ms=None, ttfb_ms=None,
                          duration_ms=1.0, bytes_in=0, bytes_out=0))
    t.events.append(event(at(8), user_name="", source_ip=ip_address("192.0.2.30"),
                          domain=None, registered_domain=None, dest_host=None, dest_ip=None,
                          dest_port=None, status="auth_failed", reply_code=None,
                          close_reason="error", connect_ms=None, ttfb_ms=None,
                          duration_ms=2.0, bytes_in=0, bytes_out=0))
    # Outside the window: must count nowhere.
    t.events.append(event(BASE - timedelta(minutes=30), bytes_in=9_999_999))
    t.nodes = [
        NodeReport(node_id="node-a", version="0.1.0", started_at=BASE, last_seen=NOW,
                   policy_version="p-aaaa", active_connections=3),
        NodeReport(node_id="node-b", version="0.1.0", started_at=BASE, last_seen=NOW,
                   policy_version="p-bbbb", active_connections=0),
    ]
    return t


TRAFFIC = _traffic()


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[httpx.Client]:
    TRAFFIC.store(database_url, now=NOW)
    with RunningApi(api_settings(database_url)) as api, \
            httpx.Client(base_url=api.url, timeout=10) as http:
        yield http


def get(client: httpx.Client, path: str, **params: Any) -> Any:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def _page(items: list[dict[str, Any]], total: int, limit: int = 10,
          offset: int = 0) -> dict[str, Any]:
    return {"items": items, "limit": limit, "offset": offset, "total": total}


@pytest.mark.parametrize("sort", ["connections", "bytes"])
@pytest.mark.parametrize("group", ["domain", "registered_domain"])
def test_top_domains(client: httpx.Client, sort: str, group: str) -> None:
    rows = Traffic.grouped(TRAFFIC.select(FROM, TO), lambda e: getattr(e, group), sort)
    expected = [{"domain": r["key"], "connections": r["connections"],
                 "bytes_in": r["bytes_in"], "bytes_out": r["bytes_out"],
                 "bytes_total": r["bytes_total"], "avg_connect_ms": r["avg_connect_ms"]}
                for r in rows]
    assert get(client, "/stats/top-domains", sort=sort, group=group, **WINDOW) == _page(
        expected, len(expected))


def test_top_domains_leave_out_ip_literals(client: httpx.Client) -> None:
    body = get(client, "/stats/top-domains", limit=1000, **WINDOW)
    assert all(item["domain"] != "198.51.100.9" for item in body["items"])
    assert sum(item["connections"] for item in body["items"]) == len(TRAFFIC.select(FROM, TO)) - 2


@pytest.mark.parametrize("sort", ["connections", "bytes"])
def test_source_ips(client: httpx.Client, sort: str) -> None:
    rows = Traffic.grouped(TRAFFIC.select(FROM, TO), lambda e: e.source_ip, sort)
    expected = [{"source_ip": r["key"], "connections": r["connections"],
                 "bytes_in": r["bytes_in"], "bytes_out": r["bytes_out"],
                 "bytes_total": r["bytes_total"], "users": r["users"]} for r in rows]
    assert get(client, "/stats/source-ips", sort=sort, **WINDOW) == _page(expected,
                                                                         len(expected))


@pytest.mark.parametrize("sort", ["connections", "bytes"])
def test_users(client: httpx.Client, sort: str) -> None:
    rows = Traffic.grouped(TRAFFIC.select(FROM, TO), lambda e: e.user_name, sort)
    expected = [{"user": r["key"], "connections": r["connections"],
                 "bytes_in": r["bytes_in"], "bytes_out": r["bytes_out"],
                 "bytes_total": r["bytes_total"], "source_ips": r["source_ips"]}
                for r in rows]
    assert get(client, "/stats/users", sort=sort, **WINDOW) == _page(expected, len(expected))


@pytest.mark.parametrize(("param", "value", "field"), [
    ("user", "bob", "user_name"),
    ("user", "", "user_name"),
    ("source_ip", "192.0.2.20", "source_ip"),
    ("domain", "www.example.com", "domain"),
    ("node", "node-b", "node_id"),
    ("status", "ok", "status"),
])
def test_filters(client: httpx.Client, param: str, value: str, field: str) -> None:
    wanted = ip_address(value) if param == "source_ip" else value
    chosen = [e for e in TRAFFIC.select(FROM, TO) if getattr(e, field) == wanted]
    body = get(client, "/stats/statuses", **{param: value}, **WINDOW)
    assert sum(item["connections"] for item in body["items"]) == len(chosen)
    logs = get(client, "/logs", limit=1000, **{param: value}, **WINDOW)
    assert sorted(item["event_id"] for item in logs["items"]) == sorted(
        str(e.event_id) for e in chosen)
    assert logs["total"] == len(chosen)


def test_statuses(client: httpx.Client) -> None:
    rows = Traffic.grouped(TRAFFIC.select(FROM, TO), lambda e: e.status)
    expected = [{"status": r["key"], "connections": r["connections"]} for r in rows]
    assert get(client, "/stats/statuses", **WINDOW) == _page(expected, len(expected))


def test_traffic_buckets_are_zero_filled(client: httpx.Client) -> None:
    body = get(client, "/stats/traffic", interval="1m", **WINDOW)
    assert body["interval"] == "1m"
    assert [p["ts"] for p in body["points"]] == [iso(FROM + timedelta(minutes=n))
                                                 for n in range(15)]
    for n, point in enumerate(body["points"]):
        minute = FROM + timedelta(minutes=n)
        started = TRAFFIC.select(minute, minute + timedelta(minutes=1))
        # Bytes count in the minute they flowed: without interim reports, at the close.
        ended = [e for e in TRAFFIC.events
                 if minute <= e.ended_at < minute + timedelta(minutes=1)]
        assert point == {"ts": iso(minute), "connections": len(started),
                         "bytes_in": sum(e.bytes_in for e in ended),
                         "bytes_out": sum(e.bytes_out for e in ended)}


def test_traffic_interval_defaults_to_at_most_800_points(client: httpx.Client) -> None:
    assert get(client, "/stats/traffic", **WINDOW)["interval"] == "1m"
    day = {"from": iso(NOW - timedelta(days=1)), "to": iso(NOW)}
    assert get(client, "/stats/traffic", **day)["interval"] == "5m"
    month = {"from": iso(NOW - timedelta(days=30)), "to": iso(NOW)}
    body = get(client, "/stats/traffic", **month)
    assert body["interval"] == "1h"
    assert sum(p["connections"] for p in body["points"]) == len(TRAFFIC.events)


def test_traffic_hourly_buckets_are_aligned_in_utc(client: httpx.Client) -> None:
    body = get(client, "/stats/traffic", interval="1h",
               **{"from": iso(FROM + timedelta(minutes=7)), "to": iso(FROM + timedelta(hours=2))})
    assert [p["ts"] for p in body["points"]] == [iso(FROM), iso(FROM + timedelta(hours=1))]


def test_latency(client: httpx.Client) -> None:
    measured = sorted(e.connect_ms for e in TRAFFIC.select(FROM, TO) if e.connect_ms is not None)
    body = get(client, "/stats/latency", **WINDOW)
    assert body["count"] == len(measured)
    # Latency figures are given to the microsecond.
    assert body["avg_ms"] == pytest.approx(sum(measured) / len(measured), abs=5e-4)
    assert body["avg_ms"] == round(body["avg_ms"], 3)
    assert body["max_ms"] == round(max(measured), 3)
    assert [b["le_ms"] for b in body["histogram"]][-1] is None
    assert sum(b["count"] for b in body["histogram"]) == len(measured)
    # Percentiles come from histogram buckets: each is within the bucket of the true one.
    bounds = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    for name, fraction in (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        true = measured[math.ceil(fraction * len(measured)) - 1]
        upper = next(i for i, bound in enumerate(bounds) if true <= bound)
        assert bounds[upper - 1] <= body[name] <= bounds[upper], (name, true)


def test_latency_by_domain(client: httpx.Client) -> None:
    body = get(client, "/stats/latency", group_by="domain", **WINDOW)
    by_domain = {item["domain"]: item for item in body["items"]}
    assert by_domain["www.example.com"]["count"] == 3
    assert by_domain["www.example.com"]["avg_ms"] == pytest.approx(20.0)
    assert by_domain["www.bbc.co.uk"]["max_ms"] == 300.0
    assert by_domain["blocked.example.org"]["count"] == 0
    assert body["total"] == 4
    assert body["items"][0]["domain"] == "www.example.com"


def test_logs_newest_first_with_every_field(client: httpx.Client) -> None:
    body = get(client, "/logs", limit=3, **WINDOW)
    chosen = sorted(TRAFFIC.select(FROM, TO), key=lambda e: (e.started_at, e.event_id),
                    reverse=True)
    assert [item["event_id"] for item in body["items"]] == [str(e.event_id)
                                                           for e in chosen[:3]]
    assert body["total"] == len(chosen)
    assert body["next_cursor"]
    newest = chosen[0]
    assert body["items"][0] == {
        "event_id": str(newest.event_id), "node_id": "node-a",
        "started_at": iso(newest.started_at), "ended_at": iso(newest.ended_at),
        "source_ip": "192.0.2.30", "source_port": 50_000, "user": "", "command": "connect",
        "protocol": "tcp", "dest_host": None, "domain": None, "dest_ip": None,
        "dest_port": None, "registered_domain": None, "status": "auth_failed",
        "reply_code": None, "close_reason": "error", "connect_ms": None, "ttfb_ms": None,
        "duration_ms": 2.0, "bytes_out": 0, "bytes_in": 0, "trace_id": None,
    }
    after = get(client, "/logs", limit=3, cursor=body["next_cursor"], **WINDOW)
    assert [item["event_id"] for item in after["items"]] == [str(e.event_id)
                                                            for e in chosen[3:6]]


def test_nodes(client: httpx.Client) -> None:
    body = get(client, "/nodes")
    assert body == _page([
        {"node_id": "node-a", "version": "0.1.0", "started_at": iso(BASE),
         "last_seen": iso(NOW), "policy_version": "p-aaaa", "active_connections": 3},
        {"node_id": "node-b", "version": "0.1.0", "started_at": iso(BASE),
         "last_seen": iso(NOW), "policy_version": "p-bbbb", "active_connections": 0},
    ], 2)


NODES_WINDOWED: list[tuple[str, dict[str, str], list[str]]] = [
    ("both up in the window", WINDOW, ["node-a", "node-b"]),
    ("one named", {**WINDOW, "node": "node-b"}, ["node-b"]),
    ("bob's traffic went through node-b", {**WINDOW, "user": "bob"}, ["node-b"]),
    ("a source seen on node-b only", {**WINDOW, "source_ip": "192.0.2.20"}, ["node-b"]),
    ("a domain seen on node-a only", {**WINDOW, "domain": "api.example.com"}, ["node-a"]),
    ("a status seen on node-a only", {**WINDOW, "status": "auth_failed"}, ["node-a"]),
    ("a status seen on neither", {**WINDOW, "status": "refused"}, []),
    ("the events were before this window", {**WINDOW, "user": "bob",
                                             "from": iso(TO), "to": iso(NOW)}, []),
    ("before both started", {"from": iso(BASE - timedelta(hours=2)),
                             "to": iso(BASE - timedelta(hours=1))}, []),
    ("after both were last seen", {"from": iso(NOW + timedelta(minutes=1)),
                                   "to": iso(NOW + timedelta(hours=1))}, []),
]


@pytest.mark.parametrize(("params", "expected"), [row[1:] for row in NODES_WINDOWED],
                         ids=[row[0] for row in NODES_WINDOWED])
def test_nodes_by_window_and_filters(client: httpx.Client, params: dict[str, str],
                                     expected: list[str]) -> None:
    body = get(client, "/nodes", **params)
    assert [item["node_id"] for item in body["items"]] == expected
    assert body["total"] == len(expected)


def test_nodes_past_the_last_page_still_count_the_filtered_total(client: httpx.Client) -> None:
    body = get(client, "/nodes", **WINDOW, user="bob", offset=5)
    assert (body["items"], body["total"]) == ([], 1)


def test_default_window_is_the_last_24_hours(client: httpx.Client) -> None:
    body = get(client, "/stats/statuses")
    in_day = TRAFFIC.select(datetime.now(UTC) - timedelta(hours=24), datetime.now(UTC))
    assert sum(item["connections"] for item in body["items"]) == len(in_day)


@pytest.mark.parametrize("window", [
    {"from": str(int(FROM.timestamp())), "to": str(int(TO.timestamp()))},
    {"from": FROM.strftime("%Y-%m-%dT%H:%M:%S"), "to": TO.strftime("%Y-%m-%dT%H:%M:%S")},
    {"from": FROM.astimezone(UTC).isoformat().replace("+00:00", "+00:00"),
     "to": (TO + timedelta(hours=2)).replace(tzinfo=None).isoformat() + "+02:00"},
])
def test_time_formats_agree(client: httpx.Client, window: dict[str, str]) -> None:
    assert get(client, "/stats/statuses", **window) == get(client, "/stats/statuses", **WINDOW)


def test_health_and_readiness(client: httpx.Client) -> None:
    assert get(client, "/healthz") == {"status": "ok"}
    assert get(client, "/readyz")["status"] == "ready"


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    get(client, "/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 's5a_api_requests_total{method="GET",route="health.healthz",status="2xx"}' in (
        response.text)


def test_root_redirects_to_the_dashboard(client: httpx.Client) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response.headers["location"] == "/dashboard"
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
