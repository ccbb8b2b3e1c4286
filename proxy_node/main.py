"""A proxy node process: wire the parts together, handle signals, run one or more workers.

With `proxy.workers` > 1 the parent reserves the port (bound, not listening) and forks
workers that each listen on it with SO_REUSEPORT, so the kernel spreads connections over
every core. Signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads the policy file.
"""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy_node.auth import PolicyAuthenticator
from proxy_node.exporter import GrpcExporter, NodeIdentity, new_boot_id
from proxy_node.gatekeeper import Gatekeeper
from proxy_node.reload import PolicyWatcher
from proxy_node.resolver import CachingResolver
from proxy_node.secret_watch import SecretWatch
from proxy_node.server import ProxyServer, open_listening_socket
from proxy_node.sink import EventSink, JsonLinesSink, NullSink
from socks5_analytics import __version__, runtime
from socks5_analytics.config import Settings, format_address
from socks5_analytics.logs import configure_logging, get_logger
from socks5_analytics.policy import Policy, PolicyError, load_policy
from socks5_analytics.telemetry import serve_metrics, setup_tracing, stop_metrics

__all__ = ["run"]

log = get_logger("proxy_node")


def _make_sink(settings: Settings, status: Callable[[], tuple[int, str]],
               tracer: Any = None) -> EventSink:
    events = settings.proxy.events
    if events.kind == "none":
        return NullSink()
    if events.kind == "grpc":
        identity = NodeIdentity(
            node_id=settings.node_id,
            version=__version__,
            boot_id=new_boot_id(),
            started_at=datetime.now(UTC),
        )
        return GrpcExporter(events, identity=identity, status=status, log=log, tracer=tracer)
    return JsonLinesSink(events.path, capacity=events.buffer_events,
                         flush_interval=events.flush_interval)


def _raise_fd_limit() -> None:
    """Two descriptors per connection (four while splicing): take the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve(settings: Settings, *, reuse_port: bool, worker: int,
                 ready: Any = None) -> int:
    if worker > 1:  # each worker keeps its own spool; the first one the node's own, so a
        # node going from one process to several still replays what it spooled before
        events = settings.proxy.events
        events = events.model_copy(update={"spool_dir": events.spool_dir / f"worker-{worker}"})
        settings = settings.model_copy(
            update={"proxy": settings.proxy.model_copy(update={"events": events})}
        )
    proxy = settings.proxy
    try:
        policy = load_policy(proxy.policy_file)
    except PolicyError as exc:
        log.error("invalid policy", error=str(exc))
        return 2
    from proxy_node.metrics import ProxyMetrics  # after the multiprocess setup, if any

    metrics = ProxyMetrics()
    metrics.set_policy(policy.version)
    metrics_server = None
    if worker == 0:  # workers write shared files; the parent serves them
        metrics_server = serve_metrics(proxy.metrics_listen, metrics.registry, log=log)
    provider = setup_tracing(settings.telemetry, service="proxy", node=settings.node_id)
    tracer = provider.get_tracer("proxy_node", __version__) if provider is not None else None
    authenticator = PolicyAuthenticator(policy)
    gatekeeper = Gatekeeper(policy)
    loop = asyncio.get_running_loop()
    current = {"policy": policy}
    server: ProxyServer | None = None

    def status() -> tuple[int, str]:
        active = server.active_connections if server is not None else 0
        return active, current["policy"].version

    sink = _make_sink(settings, status, tracer)
    await sink.start()
    server = ProxyServer(
        proxy,
        node_id=settings.node_id,
        sink=sink,
        authenticator=authenticator,
        rules=gatekeeper,
        resolver=CachingResolver(timeout=proxy.dns_timeout, ttl=proxy.dns_cache_ttl,
                                 size=proxy.dns_cache_size),
        log=log,
        metrics=metrics,
        tracer=tracer,
    )
    host, port = proxy.listen
    listener = open_listening_socket(host, port, reuse_port=reuse_port)
    bound = server.serve(listener)
    interims = loop.create_task(server.report_interims(proxy.events.interim_interval))
    stop = asyncio.Event()

    def apply_policy(new: Policy) -> None:
        authenticator.update(new)
        gatekeeper.update(new)
        current["policy"] = new
        metrics.set_policy(new.version)
        revoked = server.revoke() if server is not None else 0
        log.info("policy applied", policy_version=new.version, users=len(new.users),
                 revoked_sessions=revoked)

    async def sample_metrics() -> None:
        exporter = sink if isinstance(sink, GrpcExporter) else None
        while True:
            metrics.sample(active=server.active_connections if server else 0, exporter=exporter)
            await asyncio.sleep(1.0)

    tasks = [interims, loop.create_task(sample_metrics())]
    # One watcher, one current version: the file and the Secret watch both offer to it.
    watcher = PolicyWatcher(proxy.policy_file, current=policy, apply=apply_policy,
                            interval=proxy.policy_poll_interval, log=log)
    if proxy.policy_file is not None:
        tasks.append(loop.create_task(watcher.run()))
        loop.add_signal_handler(signal.SIGHUP, lambda: watcher.check(force=True))
    else:  # SIGHUP means "reload" (never "die"), even with nothing to re-read
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info(
            "SIGHUP: no policy file to re-read", policy_version=watcher.version))
    if proxy.policy_secret.enabled:
        secret_watch = SecretWatch(proxy.policy_secret, offer=watcher.offer, log=log)
        tasks.append(loop.create_task(secret_watch.run()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    _warn_if_open(host, policy)
    runtime.settle_gc()
    if ready is not None:
        ready.set()
    if worker == 0:
        log.info("proxy listening", address=format_address(*bound), version=__version__,
                 policy_version=policy.version, auth=policy.requires_auth,
                 workers=proxy.workers, metrics=_metrics_address(metrics_server),
                 tracing=tracer is not None)
    try:
        await stop.wait()
        log.info("shutting down", active_connections=server.active_connections)
        await server.shutdown(proxy.shutdown_grace)
    finally:
        for task in tasks:
            task.cancel()
        await sink.close()
        if provider is not None:
            provider.shutdown()
        stop_metrics(metrics_server)
    log.info("stopped", events_dropped=sink.dropped)
    return 0


def _metrics_address(server: Any) -> str | None:
    if server is None:
        return None
    host, port = server.server_address[:2]
    return format_address(str(host), int(port))


def _warn_if_open(host: str, policy: Policy) -> None:
    """An open proxy on a public interface is a finding; say so loudly."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        loopback = host == "localhost"
    else:
        mapped = getattr(address, "ipv4_mapped", None)
        loopback = (mapped or address).is_loopback
    if not loopback and not policy.whitelist and not policy.users:
        log.warning("open proxy: listening beyond loopback with no whitelist and no users",
                    listen=host)


def _worker_main(settings: Settings, worker: int, ready: Any) -> None:
    configure_logging(settings.log, component="proxy", node=settings.node_id)
    _raise_fd_limit()
    sys.exit(runtime.run(_serve(settings, reuse_port=True, worker=worker, ready=ready)))


def _run_workers(settings: Settings) -> int:
    host, port = settings.proxy.listen
    reservation = open_listening_socket(host, port, reuse_port=True, listen=False)
    port = reservation.getsockname()[1]
    pinned = settings.model_copy(
        update={"proxy": settings.proxy.model_copy(update={"listen": (host, port)})}
    )
    # Workers record metrics into shared files; this process serves their sum. Set before
    # anything imports prometheus_client, which reads it once.
    metrics_dir = tempfile.mkdtemp(prefix="s5a-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("fork")
    workers = []
    for index in range(settings.proxy.workers):
        ready = context.Event()
        process = context.Process(target=_worker_main, args=(pinned, index + 1, ready),
                                  name=f"proxy-worker-{index + 1}")
        process.start()
        workers.append((process, ready))
    for _, ready in workers:
        ready.wait(timeout=30)
    metrics_server = serve_metrics(settings.proxy.metrics_listen, log=log)
    log.info("proxy listening", address=format_address(host, port), version=__version__,
             workers=len(workers), metrics=_metrics_address(metrics_server))

    def forward(signum: int, _frame: Any) -> None:
        for process, _ in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status = 0
    from prometheus_client import multiprocess

    for process, _ in workers:
        process.join()
        status = status or (process.exitcode or 0)
        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
    reservation.close()
    stop_metrics(metrics_server)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("stopped", workers=len(workers))
    return status


def run(settings: Settings) -> int:
    """Run a proxy node until SIGTERM/SIGINT; returns the process exit status."""
    configure_logging(settings.log, component="proxy", node=settings.node_id)
    _raise_fd_limit()
    if settings.proxy.workers > 1:
        return _run_workers(settings)
    try:
        return runtime.run(_serve(settings, reuse_port=False, worker=0))
    except OSError as exc:
        log.error("cannot start proxy", error=exc.strerror or str(exc))
        return 1
