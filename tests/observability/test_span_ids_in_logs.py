"""Lines logged while a database write runs carry its span's ids (DESIGN.md: "trace ids in
every line inside a span")."""

from __future__ import annotations

from types import SimpleNamespace

from opentelemetry.sdk.trace import TracerProvider

from collector.publisher import _current
from proxy_node.session import Session
from socks5_analytics.logs import _trace_ids


def test_the_write_span_is_current_for_the_lines_logged_meanwhile() -> None:
    span = TracerProvider().get_tracer("test").start_span("INSERT traffic_logs")
    context = span.get_span_context()
    assert "trace_id" not in _trace_ids(None, "warning", {})
    with _current(span):
        line = _trace_ids(None, "warning", {"event": "database write failed"})
    assert (line["trace_id"], line["span_id"]) == (
        f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert span.is_recording()  # made current, not ended
    assert "trace_id" not in _trace_ids(None, "warning", {})
    with _current(None):  # tracing off: nothing to add
        assert "trace_id" not in _trace_ids(None, "warning", {})


def test_a_session_logs_with_its_span_ids_when_traced() -> None:
    traced = SimpleNamespace(record=SimpleNamespace(trace_id="a" * 32, span_id="b" * 16))
    untraced = SimpleNamespace(record=SimpleNamespace(trace_id=None, span_id=None))
    assert Session._span_ids(traced) == {"trace_id": "a" * 32, "span_id": "b" * 16}  # type: ignore[arg-type]
    assert Session._span_ids(untraced) == {}  # type: ignore[arg-type]
