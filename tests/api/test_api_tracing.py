"""Every API request is a server span (HTTP semantic conventions) when tracing is on."""

from __future__ import annotations

import httpx
from api_harness import RunningApi, api_settings
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def test_a_span_per_request(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with RunningApi(api_settings(database_url), tracer=provider.get_tracer("test")) as api:
        assert httpx.get(f"{api.url}/healthz").status_code == 200
        assert httpx.get(f"{api.url}/stats/statuses").status_code == 200
        assert httpx.get(f"{api.url}/stats/statuses?limit=0").status_code == 400
    finished = exporter.get_finished_spans()
    spans = {(s.name, s.attributes["http.response.status_code"]) for s in finished}
    assert ("GET /healthz", 200) in spans
    assert ("GET /stats/statuses", 200) in spans
    assert ("GET /stats/statuses", 400) in spans
    statuses = next(s for s in exporter.get_finished_spans() if s.name == "GET /stats/statuses")
    assert statuses.attributes["http.route"] == "/stats/statuses"
    assert statuses.attributes["url.path"] == "/stats/statuses"
