"""Where connection events go. A sink never blocks or slows the relay.

`emit()` is a non-waiting append to a bounded buffer; a full buffer drops the event and
counts it. The JSON-lines sink writes from its own thread, so a slow disk delays only the
file, never a proxied byte; that thread also fills in `registered_domain`, which the
collector would otherwise derive (same function, same Public Suffix List).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from proxy_node.events import ConnectionEvent, InterimSample
from socks5_analytics.domains import default_suffix_list, registered_domain
from socks5_analytics.logs import get_logger

__all__ = ["EventSink", "JsonLinesSink", "NullSink"]

log = get_logger(__name__)

# Distinct names remembered by the file sink's registered-domain lookup.
_REGISTERED_CACHE = 65_536


class EventSink(Protocol):
    """Receives each finished connection event."""

    dropped: int

    def emit(self, event: ConnectionEvent) -> None:
        """Take the event without waiting; drop (and count) it when full."""

    def emit_interim(self, sample: InterimSample) -> None:
        """Take an open connection's byte counts without waiting."""

    async def start(self) -> None:
        """Begin delivering."""

    async def close(self) -> None:
        """Deliver or persist what is buffered, then release resources."""


class NullSink:
    """Discards events (analytics off)."""

    dropped = 0

    def emit(self, event: ConnectionEvent) -> None:
        """Discard the event."""

    def emit_interim(self, sample: InterimSample) -> None:
        """Discard the sample."""

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to flush."""


class JsonLinesSink:
    """Appends one JSON object per line to a file, from a background thread."""

    def __init__(self, path: Path, *, capacity: int, flush_interval: float,
                 registered: Callable[[str], str | None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: worker processes share the file; each batch is one write() call.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._capacity = capacity
        self._interval = flush_interval
        self._registered = registered
        # deque.append and popleft are atomic: the loop thread never takes a lock.
        self._buffer: deque[ConnectionEvent] = deque()
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0
        self._reported_dropped = 0
        self._thread = threading.Thread(target=self._run, name="jsonl-sink", daemon=True)
        self._thread.start()

    def emit(self, event: ConnectionEvent) -> None:
        """Buffer the event for the writer thread; drop it if the buffer is full."""
        buffer = self._buffer
        if len(buffer) >= self._capacity:
            self.dropped += 1
            return
        buffer.append(event)

    def emit_interim(self, sample: InterimSample) -> None:
        """Interim counts feed the collectors' rollups; the file keeps one line per connection."""

    async def start(self) -> None:
        """The writer thread runs from construction."""

    async def close(self) -> None:
        """Write what is buffered, then stop the writer thread."""
        await asyncio.get_running_loop().run_in_executor(None, self._stop)

    def _stop(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        os.close(self._fd)

    def _registered_lookup(self) -> Callable[[str], str | None]:
        """The name -> registrable part function, built on first use in the writer thread
        (loading the Public Suffix List takes some 30 ms and 1.3 MB; the loop never waits
        for it, and a node whose clients send no names never loads it)."""
        if self._registered is None:
            suffixes = default_suffix_list()
            self._registered = functools.lru_cache(maxsize=_REGISTERED_CACHE)(
                functools.partial(registered_domain, suffixes))
        return self._registered

    def _swap(self) -> list[ConnectionEvent]:
        buffer = self._buffer
        return [buffer.popleft() for _ in range(len(buffer))]

    def _run(self) -> None:
        last_report = time.monotonic()
        while True:
            closing = self._closed
            batch = self._swap()
            if batch:
                lines = "".join([
                    event.to_json_line() if event.domain is None
                    else event.to_json_line(self._registered_lookup()(event.domain))
                    for event in batch
                ])
                try:
                    os.write(self._fd, lines.encode())
                except OSError as exc:
                    self.dropped += len(batch)
                    log.error("event sink write failed", error=exc.strerror, events=len(batch))
            now = time.monotonic()
            if self.dropped != self._reported_dropped and now - last_report >= 10:
                log.warning("events dropped: sink buffer full",
                            dropped_total=self.dropped,
                            dropped_since=self.dropped - self._reported_dropped)
                self._reported_dropped = self.dropped
                last_report = now
            if closing:
                if self.dropped != self._reported_dropped:
                    log.warning("events dropped: sink buffer full", dropped_total=self.dropped)
                return
            self._wake.wait(self._interval)
