"""The API tests' parts: a real API server in a thread of its own, and known traffic.

`RunningApi` serves `create_app` with Sanic's real HTTP server on 127.0.0.1 port 0, in a
thread with its own event loop, exactly as `socks5-analytics api` does (api.server.serve);
tests talk to it over real HTTP. `Traffic` builds events and computes, in plain Python, what
every stats route must answer for them: the oracle the routes are checked against.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dbtools import stored_event

from socks5_analytics.config import Settings, load_settings
from socks5_analytics.storage import NodeReport, Repository, StoredEvent

DEADLINE = 20.0  # seconds a server may take to start or stop


def api_settings(database_url: str, **api: Any) -> Settings:
    """Settings for a test API on port 0 over `database_url`."""
    return load_settings(None, database={"url": database_url, "pool_max_size": 4},
                         api={"listen": "127.0.0.1:0", **api})


class RunningApi:
    """`api.server.serve` in a thread; `url` once started. Use as a context manager."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] | None = None,
                 tracer: Any = None):
        self.settings = settings
        self.clock = clock
        self.tracer = tracer
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="api-server", daemon=True)

    def _main(self) -> None:
        from api.server import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(host: str, port: int) -> None:
                self.url = f"http://{host}:{port}"
                self._ready.set()

            await serve(self.settings, stop=self._stop, clock=self.clock, ready=ready,
                        tracer=self.tracer)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> RunningApi:
        self._thread.start()
        if not self._ready.wait(DEADLINE):
            raise TimeoutError("the API did not start")
        if self._error is not None:
            raise RuntimeError("the API failed to start") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DEADLINE)
        if self._thread.is_alive():
            raise TimeoutError("the API did not stop")
        if self._error is not None:
            raise RuntimeError("the API failed") from self._error


def run(coroutine_factory: Callable[[], Any]) -> Any:
    """Run a coroutine on a loop of its own (from sync fixtures and tests)."""

    async def main() -> Any:
        return await coroutine_factory()

    return asyncio.run(main())


def iso(moment: datetime) -> str:
    """As the API prints times."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# A valid event: a 30 s HTTPS connection of alice's, with changes applied.
event = stored_event


@dataclass
class Traffic:
    """Events to store, and what each stats route must say about them."""

    events: list[StoredEvent] = field(default_factory=list)
    nodes: list[NodeReport] = field(default_factory=list)

    def store(self, database_url: str, *, now: datetime) -> None:
        """Write the events (and node reports) through the repository, in batches."""

        async def write() -> None:
            repo = await Repository.open(url=database_url, min_size=1, max_size=2)
            try:
                for start in range(0, len(self.events), 5_000):
                    result = await repo.insert_batch(events=self.events[start:start + 5_000],
                                                     now=now)
                    assert not result.rejected, result.rejected
                for report in self.nodes:
                    await repo.upsert_node(report=report)
            finally:
                await repo.close()

        run(write)

    # -- the oracle -----------------------------------------------------------------------

    def select(self, since: datetime, until: datetime, **filters: Any) -> list[StoredEvent]:
        """The events of [since, until) (whole minutes, as the API counts) matching filters."""
        since = since.replace(second=0, microsecond=0)
        end = until.replace(second=0, microsecond=0)
        if end < until:
            end += timedelta(minutes=1)
        names = {"user": "user_name", "node": "node_id"}
        chosen = []
        for item in self.events:
            if not since <= item.started_at < end:
                continue
            if all(getattr(item, names.get(key, key)) == value for key, value in filters.items()):
                chosen.append(item)
        return chosen

    @staticmethod
    def grouped(events: Iterable[StoredEvent], key: Callable[[StoredEvent], Any],
                sort: str = "connections") -> list[dict[str, Any]]:
        """Connections and bytes per key, in the API's order (ties by key)."""
        groups: dict[Any, list[StoredEvent]] = defaultdict(list)
        for item in events:
            groups[key(item)].append(item)
        rows = []
        order: dict[str, Any] = {}
        for name, members in groups.items():
            if name is None:
                continue
            latencies = [m.connect_ms for m in members if m.connect_ms is not None]
            rows.append({
                "key": str(name),
                "connections": len(members),
                "bytes_in": sum(m.bytes_in for m in members),
                "bytes_out": sum(m.bytes_out for m in members),
                "bytes_total": sum(m.bytes_in + m.bytes_out for m in members),
                "avg_connect_ms": round(sum(latencies) / len(latencies), 3) if latencies else None,
                "users": len({m.user_name for m in members if m.user_name}),
                "source_ips": len({m.source_ip for m in members}),
            })
            # PostgreSQL orders inet by family, then address; text keys here are chosen to
            # sort alike in every collation.
            order[str(name)] = ((name.version, int(name)) if hasattr(name, "version")
                                else (0, name))
        measure = "connections" if sort == "connections" else "bytes_total"
        rows.sort(key=lambda row: order[row["key"]])
        rows.sort(key=lambda row: row[measure], reverse=True)
        return rows
