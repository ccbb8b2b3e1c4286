"""The publisher: batches from every stream, gathered into large database writes.

Streams `submit` their normalized batches; a gatherer takes them in arrival order into a
group of up to `batch_max_events` rows (or whatever arrived within `batch_max_delay` of the
first), and one of `workers` writers stores the group with one `Repository.insert_batch`,
one transaction. Only after it commits is each submitted batch's future resolved, with its
share of the result; the streams send their acks from those futures.

Back-pressure. Rows are counted from `submit` until their future is resolved; past
`queue_max_events` a `submit` waits. A stream waiting in `submit` does not read its next
message, so gRPC's flow control fills and the proxy's sends block (its spool grows).

Failures. While the database is unavailable (or not migrated) a group is retried, forever,
with exponential backoff and jitter; nothing is acked meanwhile and nothing is dropped. When
the database refuses a group outright (a constraint no row check caught), the group is split
by batch and then bisected until the offending rows are found: those are rejected with the
database's reason, the rest stored. A batch that fails for another reason fails its future
(`UnstorableBatchError`), and its stream ends so that the node keeps and resends it.

Heartbeats are coalesced: the newest report per node is written every `nodes_flush_interval`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from collector.errors import PublisherClosedError, UnstorableBatchError
from collector.metrics import CollectorMetrics
from socks5_analytics.logs import get_logger
from socks5_analytics.storage import (
    BatchResult,
    InterimReport,
    InvalidBatchError,
    NodeReport,
    RejectedRow,
    SchemaMissingError,
    StorageError,
    StoredEvent,
    TransientError,
)

__all__ = ["BatchWriter", "Outcome", "Publisher"]

log = get_logger("collector.publisher")

_UNKNOWN_ERROR_TRIES = 3


class BatchWriter(Protocol):
    """What the publisher needs of `socks5_analytics.storage.Repository`."""

    retention_days: int

    async def insert_batch(
        self,
        *,
        events: Sequence[StoredEvent] = (),
        interims: Sequence[InterimReport] = (),
        now: datetime | None = None,
        checked: bool = False,
    ) -> BatchResult:
        """Store a batch exactly once (see the repository)."""
        ...

    async def upsert_node(self, *, report: NodeReport) -> None:
        """Record a node's heartbeat."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one submitted batch once its rows were committed.

    `inserted` and `duplicates` add up to the rows stored or already there; rows older than
    the retention are in neither (they would be dropped at once); `rejected` rows were not
    stored and never will be.
    """

    inserted: int
    duplicates: int
    expired: int
    rejected: tuple[RejectedRow, ...] = ()


@dataclass(eq=False, slots=True)
class _Submission:
    events: Sequence[StoredEvent]
    interims: Sequence[InterimReport]
    done: asyncio.Future[Outcome]
    size: int
    released: bool = False
    span_context: Any = None  # the node batch's span, for the write span to link to


@dataclass(slots=True)
class _Partial:
    """The merged result of the writes one group took (one, or several after a split)."""

    inserted: int = 0
    duplicates: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)

    def add(self, result: BatchResult) -> None:
        self.inserted += result.inserted
        self.duplicates += result.duplicates
        self.rejected.extend(result.rejected)


_MAX_LINKS = 128


def _utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _current(span: Any) -> contextlib.AbstractContextManager[Any]:
    """`span` as the current span (for the log lines written meanwhile), or nothing."""
    if span is None:
        return contextlib.nullcontext()
    from opentelemetry import trace

    return trace.use_span(span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False)


class Publisher:
    """Gathers submitted batches into large writes; resolves each after its commit."""

    def __init__(
        self,
        writer: BatchWriter,
        *,
        batch_max_events: int = 5000,
        batch_max_delay: float = 0.2,
        queue_max_events: int = 50_000,
        workers: int = 2,
        retry_initial_backoff: float = 0.1,
        retry_max_backoff: float = 5.0,
        nodes_flush_interval: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: CollectorMetrics | None = None,
        tracer: Any = None,
    ) -> None:
        self._writer = writer
        self.metrics = metrics
        self.tracer = tracer
        self._batch_max_events = batch_max_events
        self._batch_max_delay = batch_max_delay
        self._capacity = queue_max_events
        self._workers = workers
        self._backoff = (retry_initial_backoff, retry_max_backoff)
        self._nodes_flush_interval = nodes_flush_interval
        self._clock = clock
        self._queue: collections.deque[_Submission] = collections.deque()
        self._queued_rows = 0
        self._held = 0  # rows submitted and not yet resolved: queued, grouped or writing
        self._room = asyncio.Event()  # set whenever held rows are released
        self._arrived = asyncio.Event()
        self._groups: asyncio.Queue[list[_Submission]] = asyncio.Queue(maxsize=1)
        self._writing: set[_Submission] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._nodes: dict[str, NodeReport] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._outage_since: float | None = None
        self.committed_rows = 0
        self.writes = 0

    @property
    def held_rows(self) -> int:
        """Rows submitted and not yet committed (the back-pressure gauge)."""
        return self._held

    @property
    def database_down(self) -> bool:
        """Whether writes are failing for want of the database right now."""
        return self._outage_since is not None

    async def start(self) -> None:
        """Start the gatherer, the writers and the heartbeat flusher."""
        self._tasks.append(asyncio.create_task(self._gather(), name="publisher-gather"))
        for number in range(self._workers):
            self._tasks.append(
                asyncio.create_task(self._write_groups(), name=f"publisher-writer-{number}")
            )
        self._tasks.append(asyncio.create_task(self._flush_nodes_forever(),
                                               name="publisher-nodes"))

    # -- the streams' side ----------------------------------------------------------------

    async def submit(
        self, events: Sequence[StoredEvent], interims: Sequence[InterimReport], *,
        span_context: Any = None,
    ) -> asyncio.Future[Outcome]:
        """Queue a batch once there is room; the future resolves after its commit.

        The rows must come from `collector.normalize` (it checks every field as the
        repository would, so the repository does not check them again).
        """
        size = max(1, len(events) + len(interims))
        # An oversized batch is let in alone rather than never.
        while not (self._closing or self._held == 0 or self._held + size <= self._capacity):
            self._room.clear()
            await self._room.wait()
        if self._closing:
            raise PublisherClosedError("the collector is stopping")
        self._held += size
        submission = _Submission(events, interims,
                                 asyncio.get_running_loop().create_future(), size,
                                 span_context=span_context)
        if not events and not interims:
            self._resolve(submission, Outcome(0, 0, 0))
            return submission.done
        self._idle.clear()
        self._queue.append(submission)
        self._queued_rows += size
        self._arrived.set()
        return submission.done

    def note_node(self, report: NodeReport) -> None:
        """Keep a node's newest heartbeat for the next write to proxy_nodes."""
        known = self._nodes.get(report.node_id)
        if known is None or known.last_seen <= report.last_seen:
            self._nodes[report.node_id] = report

    # -- gathering and writing ------------------------------------------------------------

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = loop.time() + self._batch_max_delay
            while self._queued_rows < self._batch_max_events and not self._closing:
                self._arrived.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Not wait_for, whose 3.11 version can swallow close()'s cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
            group: list[_Submission] = []
            rows = 0
            while self._queue and (not group or rows + self._queue[0].size
                                   <= self._batch_max_events):
                submission = self._queue.popleft()
                self._queued_rows -= submission.size
                rows += submission.size
                group.append(submission)
            if not self._queue:
                self._arrived.clear()
            if group:
                self._writing.update(group)
                await self._groups.put(group)

    async def _write_groups(self) -> None:
        while True:
            group = await self._groups.get()
            try:
                await self._store_group(group)
            except asyncio.CancelledError:
                raise
            except Exception:  # a writer must outlive any one group; the nodes resend
                log.exception("storing a group failed", batches=len(group))
                for submission in group:
                    self._fail(submission, UnstorableBatchError("internal collector error"))

    async def _store_group(self, group: list[_Submission]) -> None:
        now = self._clock()
        events = [row for s in group for row in s.events]
        interims = [row for s in group for row in s.interims]
        span = self._write_span(group, len(events) + len(interims))
        started = time.monotonic()
        try:
            # The span is current while the write runs: its retry and failure lines carry
            # the trace_id and span_id.
            with _current(span):
                partial = await self._store(events, interims, now)
        except UnstorableBatchError as exc:
            if span is not None:
                span.record_exception(exc)
                span.end()
            with _current(span):
                log.error("the database keeps failing a write; its streams end and their "
                          "nodes resend later", batches=len(group), error=str(exc))
            for submission in group:
                self._fail(submission, exc)
            return
        self.writes += 1
        self.committed_rows += partial.inserted + partial.duplicates
        if self.metrics is not None:
            self.metrics.commit_seconds.observe(time.monotonic() - started)
            self.metrics.write_rows.observe(len(events) + len(interims))
            self.metrics.rows_written.labels("inserted").inc(partial.inserted)
            self.metrics.rows_written.labels("duplicate").inc(partial.duplicates)
            if partial.rejected:
                self.metrics.rejected([row.reason for row in partial.rejected])
        if span is not None:
            span.set_attribute("db.response.returned_rows", partial.inserted)
            span.end()
        self._attribute(group, partial, now)

    def _write_span(self, group: list[_Submission], rows: int) -> Any:
        """The database write's span: a child of its first sampled batch's span, linked to
        every batch it carries."""
        if self.tracer is None:
            return None
        from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, set_span_in_context

        contexts = [s.span_context for s in group[:_MAX_LINKS] if s.span_context is not None]
        # A child of the first batch's span (one trace from a connection to the write that
        # stored it), linked to every batch it carries.
        sampled = [context for context in contexts if context.trace_flags.sampled]
        parent = set_span_in_context(NonRecordingSpan(sampled[0])) if sampled else None
        return self.tracer.start_span(
            "INSERT traffic_logs", context=parent, kind=SpanKind.CLIENT,
            links=[Link(context) for context in contexts],
            attributes={"db.system.name": "postgresql", "db.operation.name": "INSERT",
                        "db.collection.name": "traffic_logs",
                        "db.operation.batch.size": rows},
        )

    async def _store(
        self, events: Sequence[StoredEvent], interims: Sequence[InterimReport], now: datetime
    ) -> _Partial:
        """Write rows (retrying while the database is away); bisect what it refuses."""
        partial = _Partial()
        try:
            partial.add(await self._insert_retrying(events, interims, now))
            return partial
        except InvalidBatchError as exc:
            refused = exc
        rows = len(events) + len(interims)
        if rows <= 1:
            row = events[0] if events else interims[0]
            partial.rejected.append(RejectedRow(
                row.event_id, "event" if events else "interim",
                f"refused by the database: {refused}",
            ))
            return partial
        log.warning("the database refused a write; bisecting it", rows=rows,
                    error=str(refused))
        half_events, half_interims = len(events) // 2, len(interims) // 2
        for part_events, part_interims in (
            (events[:half_events], interims[:half_interims]),
            (events[half_events:], interims[half_interims:]),
        ):
            if part_events or part_interims:
                sub = await self._store(part_events, part_interims, now)
                partial.inserted += sub.inserted
                partial.duplicates += sub.duplicates
                partial.rejected.extend(sub.rejected)
        return partial

    async def _insert_retrying(
        self, events: Sequence[StoredEvent], interims: Sequence[InterimReport], now: datetime
    ) -> BatchResult:
        delay, longest = self._backoff
        attempt = failures = 0
        while True:
            try:
                # Every row comes from collector.normalize, which builds rows only from
                # values it checked as the repository would (tests/collector/
                # test_normalize.py holds every row it makes to check_event): the
                # repository need not check them again (2.9 µs an event).
                result = await self._writer.insert_batch(events=events, interims=interims,
                                                         now=now, checked=True)
            except InvalidBatchError:
                raise
            except (TransientError, SchemaMissingError, StorageError) as exc:
                if not isinstance(exc, (TransientError, SchemaMissingError)):
                    # Neither the database's absence nor the data: a few tries, then the
                    # batches go back to their nodes rather than block everyone.
                    failures += 1
                    if failures >= _UNKNOWN_ERROR_TRIES:
                        raise UnstorableBatchError(str(exc)) from exc
                attempt += 1
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("database write failed; acks are held and the write retried",
                                error=str(exc), kind=exc.__class__.__name__)
                # Full jitter: collectors that lost the database together come back apart.
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, longest)
                continue
            if self._outage_since is not None:
                log.info("database writes resumed",
                         outage_seconds=round(time.monotonic() - self._outage_since, 3),
                         retries=attempt)
                self._outage_since = None
            return result

    # -- resolving ------------------------------------------------------------------------

    def _attribute(self, group: list[_Submission], partial: _Partial, now: datetime) -> None:
        """Give each batch its share of the group's result and resolve it.

        Rejections and expiries are per row, so exact. Which rows were new and which
        already stored is known only for the whole write: exact per batch when the write
        was all new or all already stored, otherwise new rows are counted to the earlier
        batches first (the sum is always exact).
        """
        rejected_events: dict[Any, RejectedRow] = {}
        rejected_interims: dict[Any, RejectedRow] = {}
        for row in partial.rejected:
            (rejected_events if row.kind == "event" else rejected_interims)[row.event_id] = row
        oldest = _utc_day(now) - timedelta(days=self._writer.retention_days)
        # Comparing aware datetimes is the same test as comparing UTC days, without making
        # a date per row.
        oldest_start = datetime(oldest.year, oldest.month, oldest.day, tzinfo=UTC)
        new_left = partial.inserted
        for submission in group:
            mine: list[RejectedRow] = []
            expired = 0
            if rejected_events:
                for event in submission.events:
                    refused = rejected_events.get(event.event_id)
                    if refused is not None:
                        mine.append(refused)
                    elif event.started_at < oldest_start:
                        expired += 1
            else:
                for event in submission.events:
                    if event.started_at < oldest_start:
                        expired += 1
            stored = len(submission.events) - len(mine) - expired
            for report in submission.interims:
                refused = rejected_interims.get(report.event_id)
                if refused is not None:
                    mine.append(refused)
            inserted = min(stored, new_left)
            new_left -= inserted
            self._resolve(submission, Outcome(inserted, stored - inserted, expired,
                                              tuple(mine)))

    def _release(self, submission: _Submission) -> None:
        if submission.released:
            return
        submission.released = True
        self._writing.discard(submission)
        self._held -= submission.size
        if self._held == 0:
            self._idle.set()
        self._room.set()

    def _resolve(self, submission: _Submission, outcome: Outcome) -> None:
        if not submission.done.done():
            submission.done.set_result(outcome)
        self._release(submission)

    def _fail(self, submission: _Submission, error: Exception) -> None:
        if not submission.done.done():
            submission.done.set_exception(error)
            # The stream that waits for it may already be gone (it is answered by its node
            # resending); mark the error seen so it is not reported as never retrieved.
            submission.done.exception()
        self._release(submission)

    # -- heartbeats -----------------------------------------------------------------------

    async def flush_nodes(self) -> None:
        """Write the newest heartbeat of each node seen since the last flush."""
        pending, self._nodes = self._nodes, {}
        for node_id, report in pending.items():
            try:
                await self._writer.upsert_node(report=report)
            except StorageError as exc:
                # Keep it for the next flush unless a newer one came meanwhile.
                self._nodes.setdefault(node_id, report)
                log.debug("heartbeat write failed; kept for the next flush", error=str(exc))

    async def _flush_nodes_forever(self) -> None:
        while True:
            await asyncio.sleep(self._nodes_flush_interval)
            await self.flush_nodes()

    # -- stopping -------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Take no more batches; give those queued `grace` seconds to commit, then fail them."""
        self._closing = True
        self._arrived.set()
        self._room.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        leftover = list(self._queue) + list(self._writing)
        while not self._groups.empty():
            leftover.extend(self._groups.get_nowait())
        self._queue.clear()
        for submission in leftover:
            self._fail(submission, PublisherClosedError("stopped before the commit"))
        if leftover:
            log.warning("stopped with batches not committed; their nodes resend them",
                        batches=len(leftover))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush_nodes(), max(grace, 1.0))
