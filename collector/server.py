"""The collector's gRPC server: options, interceptors, start and one orderly stop.

Stop sequence: refuse new streams (UNAVAILABLE, so nodes fail over) and stop reading the
live ones; give the publisher the grace period to commit what it holds, whose acks then go
out; end the streams UNAVAILABLE; stop the gRPC server. Nothing taken is lost: a batch that
did not commit in time was never acked, so its node still has it and resends it elsewhere.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from collector.publisher import Publisher
from collector.servicer import IngestServicer, method_handlers
from socks5_analytics.config import format_address
from socks5_analytics.logs import get_logger

__all__ = ["CollectorServer", "ServerOptions"]

log = get_logger("collector.server")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """The transport settings of the gRPC server."""

    max_message_bytes: int = 4 * 1024 * 1024
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    # The shared secret nodes must send as `authorization: Bearer <token>`; None: not required.
    token: str | None = None
    # PEM certificate chain and key: TLS on; a client CA bundle: client certificates required.
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS server credentials, or None for plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC core's channel arguments for these settings."""
        return [
            # Larger messages end the stream RESOURCE_EXHAUSTED before we see them.
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Nodes may ping every 10 s on a quiet stream without being told off.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            # A second collector on the same port must fail, not share it silently.
            ("grpc.so_reuseport", 0),
        ]


class _RefuseWhileStopping(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """New calls during the stop get UNAVAILABLE at once, so nodes fail over."""

    def __init__(self, stopping: Callable[[], bool]) -> None:
        self._stopping = stopping

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not self._stopping():
            return await continuation(handler_call_details)

        async def refuse(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the collector is stopping")

        return grpc.stream_stream_rpc_method_handler(refuse)


class _RequireToken(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Calls without the shared token end UNAUTHENTICATED before reaching the servicer."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(presented).encode(), self._expected):
            return await continuation(handler_call_details)

        async def refuse(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        return grpc.stream_stream_rpc_method_handler(refuse)


class CollectorServer:
    """A grpc.aio server for one servicer and its publisher."""

    def __init__(self, servicer: IngestServicer, publisher: Publisher, *,
                 options: ServerOptions = ServerOptions()) -> None:
        self.servicer = servicer
        self.publisher = publisher
        interceptors: list[grpc.aio.ServerInterceptor] = [
            _RefuseWhileStopping(lambda: servicer.stopping)
        ]
        if options.token is not None:
            interceptors.append(_RequireToken(options.token))
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=options.channel_options(),
        )
        self._credentials = options.credentials()
        self._server.add_generic_rpc_handlers((method_handlers(servicer),))
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Start the publisher and listen on (host, port); returns the bound address."""
        address = format_address(host, port)
        if self._credentials is not None:
            bound = self._server.add_secure_port(address, self._credentials)
        else:
            bound = self._server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {format_address(host, port)}")
        await self.publisher.start()
        await self._server.start()
        self.address = (host, bound)
        return self.address

    async def stop(self, grace: float) -> None:
        """The stop sequence (see the module); takes about `grace` seconds at most."""
        self.servicer.begin_stop()
        await self.publisher.stop(grace)
        await self.servicer.wait_closed(1.0)
        await self._server.stop(1.0)

    async def wait_for_termination(self) -> None:
        """Until the server has stopped."""
        await self._server.wait_for_termination()
