"""Metrics and traces, set up the same way for every component.

Prometheus: each process serves `/metrics` from its own registry on its own port
(`serve_metrics`). Proxy workers sharing a port with SO_REUSEPORT use prometheus_client's
multiprocess mode, so one scrape of the node sees every worker.

OpenTelemetry: `setup_tracing` installs an OTLP/gRPC exporter when an endpoint is configured
(`telemetry.otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`); otherwise it
returns None and the components skip every tracing call, so tracing off costs a branch.
Log lines inside a span carry its `trace_id` and `span_id` (socks5_analytics.logs).
"""

from __future__ import annotations

import os
from typing import Any

from socks5_analytics import __version__
from socks5_analytics.config import TelemetrySettings

__all__ = [
    "multiprocess_dir",
    "serve_metrics",
    "setup_tracing",
    "span_context_ids",
    "stop_metrics",
]

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The shared folder of multiprocess metrics, when this process is a worker of a node."""
    return os.environ.get(_MULTIPROC_ENV) or None


def serve_metrics(address: tuple[str, int] | None, registry: Any = None, *,
                  log: Any = None) -> Any:
    """Serve /metrics on `address` (None: don't); returns the server (or None).

    In multiprocess mode the served registry aggregates every worker's files. A port that
    cannot be bound is logged and skipped: the data path must not die for its metrics.
    """
    if address is None:
        return None
    try:
        return _start_metrics_server(address, registry)
    except OSError as exc:
        if log is None:
            raise
        log.error("cannot serve metrics; running without /metrics",
                  metrics_listen=f"{address[0]}:{address[1]}", error=exc.strerror or str(exc))
        return None


def stop_metrics(server: Any) -> None:
    """Stop a server from `serve_metrics` and release its port (None: nothing to do)."""
    if server is not None:
        server.shutdown()
        server.server_close()


def _start_metrics_server(address: tuple[str, int], registry: Any) -> Any:
    from prometheus_client import CollectorRegistry, start_http_server

    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    host, port = address
    kwargs = {"registry": registry} if registry is not None else {}
    server, _thread = start_http_server(port, addr=host, **kwargs)
    return server


def setup_tracing(settings: TelemetrySettings, *, service: str, node: str) -> Any:
    """A TracerProvider exporting OTLP/gRPC, or None when tracing is off."""
    endpoint = (
        settings.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = settings.sample_ratio
    if "OTEL_TRACES_SAMPLER_ARG" in os.environ:
        try:
            ratio = float(os.environ["OTEL_TRACES_SAMPLER_ARG"])
        except ValueError:
            pass
    resource = Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME", f"socks5-analytics-{service}"),
        "service.version": __version__,
        "service.instance.id": node,
    })
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
    insecure = endpoint.startswith("http://") or "://" not in endpoint
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
    )
    return provider


def span_context_ids(span: Any) -> tuple[str, str] | None:
    """(trace_id, span_id) as hex of a sampled span, else None."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
