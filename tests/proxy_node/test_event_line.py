"""The JSON-lines sink's hand-built line says exactly what the json module would say, and
the sink fills in the registered domain the collector would store."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy_node import sink as sink_module
from proxy_node.events import ConnectionEvent, ConnectionRecord
from proxy_node.sink import JsonLinesSink

_text = st.text(max_size=40)
_optional_text = st.none() | _text
_optional_ms = st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False)
_moment = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.just(UTC))


@given(
    node_id=_text, user=_text, dest_host=_optional_text, domain=_optional_text,
    dest_ip=st.none() | st.ip_addresses().map(str), dest_port=st.none() | st.integers(0, 65535),
    reply_code=st.none() | st.integers(0, 8), connect_ms=_optional_ms, ttfb_ms=_optional_ms,
    duration_ms=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    bytes_out=st.integers(0, 2**63 - 1), bytes_in=st.integers(0, 2**63 - 1),
    trace_id=st.none() | st.text("0123456789abcdef", min_size=32, max_size=32),
    started=_moment, event_id=st.uuids(), registered=_optional_text,
)
def test_line_equals_the_json_modules_encoding(
    node_id: str, user: str, dest_host: str | None, domain: str | None, dest_ip: str | None,
    dest_port: int | None, reply_code: int | None, connect_ms: float | None,
    ttfb_ms: float | None, duration_ms: float, bytes_out: int, bytes_in: int,
    trace_id: str | None, started: datetime, event_id: uuid.UUID, registered: str | None,
) -> None:
    event = ConnectionEvent(
        event_id, node_id, started, started + timedelta(milliseconds=duration_ms // 1),
        "2001:db8::1", 40000, user, "connect", "tcp", dest_host, domain, dest_ip, dest_port,
        None, "ok", reply_code, "client", connect_ms, ttfb_ms, duration_ms, bytes_out,
        bytes_in, trace_id, "00f067aa0ba902b7",
    )
    line = event.to_json_line()
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert line.isascii()
    assert json.loads(line) == event.to_json_dict()
    assert line == json.dumps(event.to_json_dict()) + "\n"
    with_registered = event.to_json_line(registered)
    expected = {**event.to_json_dict(), "registered_domain": registered}
    assert with_registered == json.dumps(expected) + "\n"


def test_a_finished_record_round_trips() -> None:
    record = ConnectionRecord("10.0.0.7", 51000, 100.0)
    record.status, record.reply_code, record.dest_port = "refused", 5, 443
    record.request_mono, record.connected_mono = 100.001, 100.0035
    event = record.finish(node_id="node-a", now_mono=100.25)
    decoded = json.loads(event.to_json_line())
    assert decoded["status"] == "refused" and decoded["reply_code"] == 5
    assert decoded["connect_ms"] == 2.5 and decoded["duration_ms"] == 250.0
    assert decoded["registered_domain"] is None and "span_id" not in decoded
    assert decoded == event.to_json_dict()


def _event(domain: str | None, dest_host: str | None) -> ConnectionEvent:
    record = ConnectionRecord("10.0.0.7", 51000, 100.0)
    record.status, record.reply_code, record.dest_port = "ok", 0, 443
    record.dest_host, record.domain = dest_host, domain
    return record.finish(node_id="node-a", now_mono=100.25)


def test_the_file_sink_writes_the_registered_domain(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(path, capacity=100, flush_interval=0.05)
    sink.emit(_event("WWW.BBC.co.uk", "WWW.BBC.co.uk"))
    sink.emit(_event(None, "192.0.2.9"))
    sink.emit(_event("localhost", "localhost"))  # a public suffix of its own: none
    asyncio.run(sink.close())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["domain"], e["registered_domain"]) for e in lines] == [
        ("WWW.BBC.co.uk", "bbc.co.uk"), (None, None), ("localhost", None)]


def test_the_file_sink_loads_the_suffix_list_only_for_a_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Public Suffix List costs some 1.3 MB: a node whose clients send only addresses
    never loads it; the first name loads it once."""
    loads = []
    real = sink_module.default_suffix_list

    def counted() -> Any:
        loads.append(1)
        return real()

    monkeypatch.setattr(sink_module, "default_suffix_list", counted)
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(path, capacity=100, flush_interval=0.01)

    async def write() -> None:
        await sink.start()
        for _ in range(3):
            sink.emit(_event(None, "192.0.2.9"))
        await asyncio.sleep(0.2)  # the writer thread flushes every 10 ms
        assert path.read_text().count("\n") == 3 and not loads
        sink.emit(_event("www.bbc.co.uk", "www.bbc.co.uk"))
        sink.emit(_event("news.bbc.co.uk", "news.bbc.co.uk"))
        await sink.close()

    asyncio.run(write())
    assert len(loads) == 1
    assert path.read_text().count('"registered_domain": "bbc.co.uk"') == 2
