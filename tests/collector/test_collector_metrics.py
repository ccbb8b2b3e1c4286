"""The collector's /metrics, scraped over HTTP and parsed, follows what the streams carry."""

from __future__ import annotations

import urllib.request
from typing import Any

import grpc
from ingest_client import eventually, make_event, open_session
from prometheus_client.parser import text_string_to_metric_families

from collector.main import build_server
from collector.metrics import CollectorMetrics, reason_field
from socks5_analytics.config import load_settings
from socks5_analytics.storage import Repository
from socks5_analytics.telemetry import serve_metrics, stop_metrics


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_reason_field_is_bounded() -> None:
    assert reason_field("source_ip: 5 bytes, expected 4 or 16") == "source_ip"
    assert reason_field("refused by the database: boom") == "other"
    assert reason_field("no colon here") == "other"


async def test_counters_follow_the_streams(database_url: str) -> None:
    settings = load_settings(None, collector={"listen": "127.0.0.1:0", "batch_max_delay": 0.01,
                                              "metrics_listen": None})
    repository = await Repository.open(url=database_url, min_size=0, max_size=4,
                                       connect_timeout=2.0)
    metrics = CollectorMetrics()
    server = build_server(settings, repository, metrics=metrics)
    http = serve_metrics(("127.0.0.1", 0), metrics.registry)
    try:
        _, port = await server.start("127.0.0.1", 0)
        scrape_port = http.server_address[1]
        assert _value(_scrape(scrape_port), "s5a_collector_database_up") == 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            session = await open_session(channel)

            async def streaming() -> bool:
                return _value(_scrape(scrape_port), "s5a_collector_streams") == 1

            await eventually(streaming)
            good = [make_event() for _ in range(30)]
            bad = make_event(source_ip=b"\x01\x02\x03\x04\x05")
            answer = await session.deliver(1, [*good, bad])
            assert answer.WhichOneof("kind") == "rejection"
            again = await session.deliver(2, good[:10])  # a resend: duplicates
            assert again.WhichOneof("kind") == "ack"
            await session.finish()

        async def settled() -> Any:
            samples = _scrape(scrape_port)
            return samples if _value(samples, "s5a_collector_streams") == 0 else None

        samples = await eventually(settled)
    finally:
        await server.stop(0.5)
        stop_metrics(http)
        await repository.close()
    assert _value(samples, "s5a_collector_events_received_total") == 41
    assert _value(samples, "s5a_collector_events_rejected_total", reason="source_ip") == 1
    assert _value(samples, "s5a_collector_batches_total", result="rejection") == 1
    assert _value(samples, "s5a_collector_batches_total", result="ack") == 1
    assert _value(samples, "s5a_collector_rows_written_total", kind="inserted") == 30
    assert _value(samples, "s5a_collector_rows_written_total", kind="duplicate") == 10
    assert _value(samples, "s5a_collector_write_rows_count") >= 2
    assert _value(samples, "s5a_collector_commit_duration_seconds_count") >= 2
    assert _value(samples, "s5a_collector_queue_rows") == 0
    assert _value(samples, "s5a_collector_db_pool_connections", state="in_use") == 0
