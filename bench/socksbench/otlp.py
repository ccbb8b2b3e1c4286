"""A minimal OTLP/gRPC trace receiver that only counts what it is sent.

Built from opentelemetry-proto's service definition (TraceServiceServicer), on 127.0.0.1
and a port the kernel picks; it stands in for an OpenTelemetry Collector or Jaeger so the
proxy's exporter does its real work (serialising and sending spans) during a benchmark.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .netutil import LOOPBACK


class CountingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts spans (by name) and export requests; keeps nothing else."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans = 0
        self.requests = 0
        self.by_name: dict[str, int] = {}

    def Export(self, request: Any, context: Any) -> Any:
        names: dict[str, int] = {}
        count = 0
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    names[span.name] = names.get(span.name, 0) + 1
                    count += 1
        with self._lock:
            self.spans += count
            self.requests += 1
            for name, n in names.items():
                self.by_name[name] = self.by_name.get(name, 0) + n
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` serves until the block ends; `endpoint` for the
    proxy's S5A_TELEMETRY__OTLP_ENDPOINT."""

    def __init__(self) -> None:
        self.counter = CountingReceiver()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.counter, self._server)
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")
        self.endpoint = f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.stop(grace=1.0).wait(5)

    @property
    def spans(self) -> int:
        return self.counter.spans
