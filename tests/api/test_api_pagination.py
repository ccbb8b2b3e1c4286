"""Paging walks a large result with no overlap and no gap, ties and all, for every list
route, by offset and (for /logs) by cursor, also while new events arrive."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from typing import Any

import httpx
import pytest
from api_harness import RunningApi, Traffic, api_settings, event, iso

from socks5_analytics.storage import NodeReport

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
START = NOW - timedelta(hours=3)
WINDOW = {"from": iso(START), "to": iso(NOW)}
EVENTS = 2_400


def _traffic() -> Traffic:
    t = Traffic()
    for n in range(EVENTS):
        # many ties: 300 domains, 8 connections each; bytes tie in blocks too
        domain = f"d{n % 300:03d}.example.com"
        t.events.append(event(
            START + timedelta(seconds=4 * n),  # several events share a second's bucket
            domain=domain, dest_host=domain, registered_domain=f"r{n % 40:02d}.example.com",
            source_ip=ip_address(f"10.{n % 3}.{(n // 3) % 50}.1"),
            user_name=f"user{n % 97:02d}", node_id=f"node-{n % 4}",
            bytes_in=1_000 * (n % 5), bytes_out=10, connect_ms=float(n % 13),
        ))
    # same started_at for a run of events: the cursor must order them by event id
    for _ in range(30):
        t.events.append(event(START + timedelta(minutes=90), domain="same.example.com",
                              dest_host="same.example.com", registered_domain="example.com"))
    t.nodes = [NodeReport(node_id=f"node-{n:02d}", version="0.1.0", started_at=START,
                          last_seen=NOW, policy_version="p", active_connections=n)
               for n in range(23)]
    return t


TRAFFIC = _traffic()


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[httpx.Client]:
    TRAFFIC.store(database_url, now=NOW)
    with RunningApi(api_settings(database_url)) as api, \
            httpx.Client(base_url=api.url, timeout=30) as http:
        yield http


def walk(client: httpx.Client, path: str, key: str, limit: int,
         **params: Any) -> tuple[list[Any], int]:
    keys: list[Any] = []
    offset = 0
    total = -1
    while True:
        body = client.get(path, params={**params, "limit": limit, "offset": offset}).json()
        assert body["limit"] == limit and body["offset"] == offset
        total = body["total"]
        keys += [item[key] for item in body["items"]]
        if len(body["items"]) < limit:
            return keys, total
        offset += limit


@pytest.mark.parametrize(("path", "key", "params"), [
    ("/stats/top-domains", "domain", {}),
    ("/stats/top-domains", "domain", {"sort": "bytes"}),
    ("/stats/top-domains", "domain", {"group": "registered_domain"}),
    ("/stats/source-ips", "source_ip", {}),
    ("/stats/source-ips", "source_ip", {"sort": "bytes"}),
    ("/stats/users", "user", {}),
    ("/stats/users", "user", {"sort": "bytes", "node": "node-1"}),  # from traffic_logs
    ("/stats/latency", "domain", {"group_by": "domain"}),
    ("/stats/statuses", "status", {}),
])
def test_offset_pages_have_no_overlap_and_no_gap(client: httpx.Client, path: str, key: str,
                                                 params: dict[str, str]) -> None:
    whole = client.get(path, params={**WINDOW, **params, "limit": 1000}).json()
    expected = [item[key] for item in whole["items"]]
    assert len(expected) == whole["total"] > 0
    keys, total = walk(client, path, key, 7, **WINDOW, **params)
    assert total == whole["total"]
    assert keys == expected
    assert len(set(keys)) == len(keys)


def test_nodes_pages(client: httpx.Client) -> None:
    keys, total = walk(client, "/nodes", "node_id", 5)
    assert keys == [f"node-{n:02d}" for n in range(23)] and total == 23


def test_logs_by_offset_and_by_cursor_agree(client: httpx.Client) -> None:
    in_window = sorted(TRAFFIC.select(START, NOW), key=lambda e: (e.started_at, e.event_id),
                       reverse=True)
    expected = [str(e.event_id) for e in in_window]
    by_offset, total = walk(client, "/logs", "event_id", 250, **WINDOW)
    assert total == len(expected)
    assert by_offset == expected
    by_cursor: list[str] = []
    cursor = None
    while True:
        params = {**WINDOW, "limit": 250, **({"cursor": cursor} if cursor else {})}
        body = client.get("/logs", params=params).json()
        by_cursor += [item["event_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert by_cursor == expected


def test_cursor_is_stable_while_events_arrive(client: httpx.Client, database_url: str) -> None:
    first = client.get("/logs", params={**WINDOW, "limit": 100}).json()
    newer = Traffic(events=[event(NOW - timedelta(seconds=1)) for _ in range(5)])
    newer.store(database_url, now=NOW)
    try:
        second = client.get("/logs", params={**WINDOW, "limit": 100,
                                             "cursor": first["next_cursor"]}).json()
        whole = client.get("/logs", params={**WINDOW, "limit": 1000}).json()
        ids = [i["event_id"] for i in whole["items"]]
        assert [i["event_id"] for i in second["items"]] == ids[105:205]
        assert first["items"][-1]["event_id"] == ids[104]
    finally:
        TRAFFIC.events.extend(newer.events)


def test_past_the_end(client: httpx.Client) -> None:
    body = client.get("/stats/top-domains", params={**WINDOW, "offset": 100_000}).json()
    whole = client.get("/stats/top-domains", params={**WINDOW, "limit": 1000}).json()
    assert body["items"] == [] and body["total"] == whole["total"] >= 301
