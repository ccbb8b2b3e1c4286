"""One OpenTelemetry span per proxied connection, named and attributed per the semantic
conventions where they exist (client.*, server.*, network.peer.*, user.name), plus SOCKS
specifics under `socks5.*`. Only called when tracing is on.
"""

from __future__ import annotations

from typing import Any

from proxy_node.events import ConnectionRecord

__all__ = ["end_span", "start_span"]


def start_span(tracer: Any, record: ConnectionRecord) -> Any:
    """Start the connection's span at accept; its ids go into the connection's event."""
    from opentelemetry.trace import SpanKind

    span = tracer.start_span(
        "socks5.connection",
        kind=SpanKind.SERVER,
        start_time=record.started_wall_us * 1000,
        attributes={"client.address": record.source_ip, "client.port": record.source_port,
                    "network.transport": "tcp", "network.protocol.name": "socks",
                    "network.protocol.version": "5"},
    )
    context = span.get_span_context()
    if context.trace_flags.sampled:
        record.trace_id = f"{context.trace_id:032x}"
        record.span_id = f"{context.span_id:016x}"
    return span


def end_span(span: Any, record: ConnectionRecord) -> None:
    """Fill in what the session became and end the span."""
    from opentelemetry.trace import Status, StatusCode

    attributes: dict[str, Any] = {
        "socks5.command": record.command,
        "socks5.status": record.status,
        "socks5.close_reason": record.close_reason,
        "socks5.bytes_out": record.bytes_out,
        "socks5.bytes_in": record.bytes_in,
    }
    if record.reply_code is not None:
        attributes["socks5.reply_code"] = record.reply_code
    if record.user:
        attributes["user.name"] = record.user
    if record.dest_host is not None:
        attributes["server.address"] = record.dest_host
    if record.dest_port is not None:
        attributes["server.port"] = record.dest_port
    if record.dest_ip is not None:
        attributes["network.peer.address"] = record.dest_ip
    span.set_attributes(attributes)
    if record.status != "ok":
        span.set_status(Status(StatusCode.ERROR, record.status))
    span.end()
