"""One connection's trace across every hop: proxy → collector → database write.

A real proxy process and a real collector process export OTLP/gRPC to an in-process
receiver built from opentelemetry-proto's service definition. The connection's span, the
node's export span, the collector's batch span and the database write must form one trace
(each a child of the first it carries, and linked to all), with the expected attributes, and
the stored row must carry the trace id.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import yaml
from loopback import Component, echo_server, socks_echo
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, by service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


async def test_one_trace_from_connection_to_database(
    database_url: str, tmp_path: Path, echo_port: int
) -> None:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = {
        "log": {"format": "json"},
        "database": {"url": database_url},
        "telemetry": {"otlp_endpoint": f"http://127.0.0.1:{otlp_port}", "sample_ratio": 1.0},
        "proxy": {"metrics_listen": None, "events": {"flush_interval": 0.05,
                                                     "spool_dir": str(tmp_path / "spool")}},
        "collector": {"metrics_listen": None, "batch_max_delay": 0.01},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "policy.yaml").write_text("destinations: {block_private: false}\n")
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100", "PYTHONPATH": str(ROOT)}
    common = ["--config", str(tmp_path / "config.yaml")]
    collector = Component(["collector", *common, "--listen", "127.0.0.1:0"], env, tmp_path)
    proxy = None
    try:
        collector_address = await asyncio.to_thread(collector.address, "collector listening")
        proxy = Component(["proxy", *common, "--listen", "127.0.0.1:0", "--policy",
                       str(tmp_path / "policy.yaml"), "--collector", collector_address],
                      env, tmp_path)
        proxy_address = await asyncio.to_thread(proxy.address, "proxy listening")
        assert await asyncio.to_thread(socks_echo, proxy_address, echo_port, b"ping") == b"ping"

        connection = await _wait_span(receiver, "socks5.connection")
        write = await _wait_span(receiver, "INSERT traffic_logs")
        export = await _wait_span(receiver, "socks5.export")
        batch = await _wait_span(receiver, "collector.batch")
    finally:
        if proxy is not None:
            proxy.stop()
        collector.stop()
        await server.stop(None)

    attributes = {a.key: a.value for a in connection.attributes}
    assert attributes["client.address"].string_value == "127.0.0.1"
    assert attributes["server.port"].int_value == echo_port
    assert attributes["socks5.status"].string_value == "ok"
    assert attributes["socks5.bytes_out"].int_value == 4
    assert attributes["socks5.bytes_in"].int_value == 4
    # One trace: the export is a child of the (first) connection and links to it; the batch
    # continues the export's trace; the write is a child of the (first) batch and links to it.
    assert export.trace_id == connection.trace_id
    assert export.parent_span_id == connection.span_id
    assert any(link.span_id == connection.span_id for link in export.links)
    assert batch.trace_id == export.trace_id and batch.parent_span_id == export.span_id
    assert any(link.span_id == connection.span_id for link in batch.links)
    assert write.trace_id == batch.trace_id and write.parent_span_id == batch.span_id
    assert any(link.span_id == batch.span_id for link in write.links)
    row = await _stored_trace_id(database_url)
    assert row == connection.trace_id.hex()


async def _wait_span(receiver: Receiver, name: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, span in receiver.spans:
            if span.name == name:
                return span
        await asyncio.sleep(0.05)
    raise AssertionError(f"no span {name!r}; got {[s.name for _, s in receiver.spans]}")


async def _stored_trace_id(url: str) -> str | None:
    connection = await asyncpg.connect(url)
    try:
        value = await connection.fetchval(
            "SELECT trace_id FROM traffic_logs WHERE status = 'ok' ORDER BY started_at DESC "
            "LIMIT 1")
    finally:
        await connection.close()
    return None if value is None else str(value).replace("-", "")
