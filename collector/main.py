"""A collector process: the database, the publisher, the gRPC server, signals.

Without `database.url` it uses the embedded PostgreSQL (started here if it is not running,
stopped at exit). It waits for the database before it listens, so a node never talks to a
collector that cannot store anything yet; once listening, a database outage only holds the
acks back. SIGTERM/SIGINT run the server's orderly stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from collector.metrics import CollectorMetrics
from collector.normalize import DomainRules, default_suffix_list
from collector.publisher import Publisher
from collector.server import CollectorServer, ServerOptions
from collector.servicer import IngestServicer, StreamLimits
from socks5_analytics import __version__, runtime
from socks5_analytics.config import ConfigError, Settings, TlsServerSettings, format_address
from socks5_analytics.logs import configure_logging, get_logger
from socks5_analytics.storage import Repository, StorageError, TransientError
from socks5_analytics.storage.maintenance import run_maintenance_forever
from socks5_analytics.telemetry import serve_metrics, setup_tracing, stop_metrics

__all__ = ["build_server", "run", "serve"]

log = get_logger("collector")


def build_server(settings: Settings, repository: Repository, *,
                 metrics: CollectorMetrics | None = None, tracer: Any = None) -> CollectorServer:
    """The server, servicer and publisher of `settings.collector` over `repository`."""
    config = settings.collector
    publisher = Publisher(
        repository,
        batch_max_events=config.batch_max_events,
        batch_max_delay=config.batch_max_delay,
        queue_max_events=config.queue_max_events,
        workers=config.workers,
        retry_initial_backoff=config.retry_initial_backoff,
        retry_max_backoff=config.retry_max_backoff,
        nodes_flush_interval=config.nodes_flush_interval,
        metrics=metrics,
        tracer=tracer,
    )
    rules = DomainRules(
        default_suffix_list(private_domains=config.psl_private_domains),
        max_clock_skew=timedelta(seconds=config.max_clock_skew),
    )
    servicer = IngestServicer(
        publisher,
        rules=rules,
        limits=StreamLimits(hello_timeout=config.hello_timeout,
                            max_batch_items=config.max_batch_items,
                            max_pending=config.stream_max_pending),
        metrics=metrics,
        tracer=tracer,
    )
    if metrics is not None:
        metrics.watch(streams=lambda: servicer.active_streams,
                      queue_rows=lambda: publisher.held_rows,
                      database_up=lambda: not publisher.database_down,
                      pool=repository.pool_usage)
    tls = config.tls

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if tls.enabled and path is not None else None

    options = ServerOptions(max_message_bytes=config.max_message_bytes,
                            keepalive_time=config.keepalive_time,
                            keepalive_timeout=config.keepalive_timeout,
                            token=config.token.get_secret_value() if config.token else None,
                            tls_cert=read(tls.cert_file),
                            tls_key=read(tls.key_file),
                            client_ca=read(tls.client_ca_file))
    return CollectorServer(servicer, publisher, options=options)


def check_tls_files(tls: TlsServerSettings) -> None:
    """Raise ConfigError, naming the key, unless the certificate, its key and the client CA
    bundle can be read and used (gRPC would only say that it could not bind)."""
    for name in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, name)
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"invalid configuration: collector.tls.{name}: cannot read "
                              f"{path}: {exc.strerror}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            "invalid configuration: collector.tls.cert_file, collector.tls.key_file: not a "
            f"PEM certificate and its private key ({exc})") from exc
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError("invalid configuration: collector.tls.client_ca_file: not a PEM "
                              f"bundle of CA certificates ({exc})") from exc


@contextlib.asynccontextmanager
async def _database_url(settings: Settings) -> AsyncIterator[str]:
    database = settings.database
    if database.url:
        yield database.url
        return
    from socks5_analytics.storage.embedded import EmbeddedPostgres, default_data_dir

    data_dir = database.embedded_data_dir or default_data_dir()
    async with EmbeddedPostgres(data_dir, bin_dir=database.embedded_bin_dir) as server:
        log.info("embedded PostgreSQL running", data_dir=str(data_dir))
        yield server.dsn


async def _open_repository(settings: Settings, url: str, stop: asyncio.Event) -> Repository:
    config = settings.collector
    delay = config.retry_initial_backoff
    while True:
        try:
            # One connection per writer, one for heartbeats and partitions, one for the
            # maintenance pass's lock.
            database = settings.database.model_copy(update={
                "pool_max_size": max(settings.database.pool_max_size, config.workers + 2),
            })
            return await Repository.from_settings(database, url=url,
                                                  application_name="socks5-analytics-collector")
        except TransientError as exc:
            log.warning("waiting for the database", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(delay / 2, delay))
        if stop.is_set():
            raise asyncio.CancelledError
        delay = min(delay * 2, config.retry_max_backoff)


async def serve(settings: Settings, *, stop: asyncio.Event) -> int:
    """Run the collector until `stop` is set; returns the exit status."""
    if settings.collector.tls.enabled:
        check_tls_files(settings.collector.tls)  # before waiting for a database
    async with _database_url(settings) as url:
        try:
            repository = await _open_repository(settings, url, stop)
        except asyncio.CancelledError:
            return 0
        except StorageError as exc:
            log.error("cannot open the database", error=str(exc))
            return 1
        metrics = CollectorMetrics()
        provider = setup_tracing(settings.telemetry, service="collector",
                                 node=settings.node_id)
        tracer = provider.get_tracer("collector", __version__) if provider else None
        metrics_server = None
        try:
            server = build_server(settings, repository, metrics=metrics, tracer=tracer)
            metrics_server = serve_metrics(settings.collector.metrics_listen,
                                           metrics.registry, log=log)
            host, port = settings.collector.listen
            try:
                bound = await server.start(host, port)
            except (OSError, RuntimeError) as exc:
                log.error("cannot listen", address=format_address(host, port), error=str(exc))
                return 1
            log.info("collector listening", address=format_address(*bound), version=__version__,
                     metrics=_address_of(metrics_server), tracing=tracer is not None)
            maintenance = asyncio.create_task(run_maintenance_forever(
                repository, interval=settings.database.maintenance_interval, stop=stop,
                on_pass=metrics.maintenance))
            runtime.settle_gc()
            await stop.wait()
            log.info("shutting down", streams=server.servicer.active_streams,
                     held_rows=server.publisher.held_rows)
            await server.stop(settings.collector.shutdown_grace)
            await _finish(maintenance, settings.collector.shutdown_grace)
            log.info("stopped", committed_rows=server.publisher.committed_rows,
                     writes=server.publisher.writes)
        finally:
            await repository.close()
            if provider is not None:
                provider.shutdown()
            stop_metrics(metrics_server)
    return 0


async def _finish(maintenance: asyncio.Task[None], grace: float) -> None:
    """Let a maintenance pass under way end within `grace` seconds, else cancel it (the
    next start runs a whole pass again)."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(maintenance, timeout=max(grace, 1.0))


def _address_of(server: Any) -> str | None:
    if server is None:
        return None
    host, port = server.server_address[:2]
    return format_address(str(host), int(port))


async def _main(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return await serve(settings, stop=stop)


def run(settings: Settings) -> int:
    """Run a collector until SIGTERM/SIGINT; returns the process exit status."""
    configure_logging(settings.log, component="collector", node=settings.node_id)
    return runtime.run(_main(settings))
