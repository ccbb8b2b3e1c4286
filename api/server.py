"""Running the API: `serve` inside a running loop (the `api` command, `up`, tests), `run` as
the `socks5-analytics api` process.

Sanic's own runner forks workers and owns the loop; this uses its low-level server in the
caller's loop instead, so that one process can hold the API beside other components and
tests can bind port 0 and read the port back. The lifecycle is one sequence: listeners up,
serve until `stop` is set, close the listener, drain, listeners down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

from api.app import create_app
from socks5_analytics import __version__, runtime
from socks5_analytics.config import Settings, format_address
from socks5_analytics.logs import configure_logging, get_logger
from socks5_analytics.storage import Repository
from socks5_analytics.storage.errors import StorageError
from socks5_analytics.telemetry import setup_tracing

__all__ = ["run", "serve"]

log = get_logger("api")


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    repository: Repository | None = None,
    clock: Callable[[], datetime] | None = None,
    ready: Callable[[str, int], Any] | None = None,
    tracer: Any = None,
) -> None:
    """Serve the API on `settings.api.listen` until `stop` is set.

    `ready(host, port)` is called once the port is bound and the repository is open (with
    port 0 in the settings, that is the port the system chose).
    """
    options: dict[str, Any] = {"repository": repository, "tracer": tracer}
    if clock is not None:
        options["clock"] = clock
    app = create_app(settings, **options)
    host, port = settings.api.listen
    sock = _listening_socket(host, port)
    # Not accepting before the listeners have opened the repository. (Sanic's AsyncioServer
    # is untyped.)
    server: Any = await app.create_server(
        sock=sock, access_log=False, backlog=1024, return_asyncio_server=True,
        asyncio_server_kwargs={"start_serving": False},
    )
    await server.startup()
    await server.before_start()  # opens the repository
    try:
        await server.start_serving()
        await server.after_start()
        bound = sock.getsockname()
        if ready is not None:
            ready(bound[0], bound[1])
        await stop.wait()
    finally:
        await server.before_stop()
        closing = server.close()
        for connection in list(server.connections):
            connection.close_if_idle()
        if closing is not None:
            await closing
        await server.after_stop()  # closes the repository
        sock.close()


async def _main(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    provider = setup_tracing(settings.telemetry, service="api", node=settings.node_id)
    tracer = provider.get_tracer("api", __version__) if provider is not None else None

    def announce(host: str, port: int) -> None:
        address = format_address(host, port)
        log.info("api listening", address=address, dashboard=f"http://{address}/dashboard",
                 auth="token" if settings.api.token is not None else "none",
                 tracing=tracer is not None)
    try:
        await serve(settings, stop=stop, ready=announce, tracer=tracer)
    except StorageError as exc:
        log.error("cannot open the database", error=str(exc))
        return 1
    except OSError as exc:
        log.error("cannot start the api", error=exc.strerror or str(exc))
        return 1
    finally:
        if provider is not None:
            provider.shutdown()
    log.info("api stopped")
    return 0


def run(settings: Settings) -> int:
    """The `socks5-analytics api` process: until SIGTERM/SIGINT; returns the exit status.

    Without a database URL it starts the embedded PostgreSQL (as `migrate` does) and stops
    it on the way out.
    """
    configure_logging(settings.log, component="api", node=settings.node_id)
    # Sanic's banner, its extensions' list, alembic's plugin list (readiness reads the head
    # revision): startup chatter, not events.
    for chatty in ("sanic.root", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if settings.database.url:
        return runtime.run(_main(settings))
    from socks5_analytics.storage.embedded import EmbeddedPostgres, default_data_dir

    data_dir = settings.database.embedded_data_dir or default_data_dir()
    try:
        with EmbeddedPostgres(data_dir, bin_dir=settings.database.embedded_bin_dir) as server:
            log.info("embedded postgresql", data_dir=str(data_dir))
            with_url = settings.model_copy(update={
                "database": settings.database.model_copy(update={"url": server.dsn})
            })
            return runtime.run(_main(with_url))
    except StorageError as exc:
        log.error("cannot start the embedded postgresql", error=str(exc))
        return 1
