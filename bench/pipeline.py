#!/usr/bin/env python3
"""The ingest pipeline: events/s from exporters to committed rows, delay, and its cost to the proxy.

Usage: .venv/bin/python bench/pipeline.py [--runs N] [--conn-runs N] [--quick] [--streams N]
       [--parts throughput,delay,conn] [--keep]

One throwaway embedded PostgreSQL (non-durable: fsync, synchronous_commit and
full_page_writes off; track_commit_timestamp on) and one real collector process
(`socks5-analytics collector`, default settings: batches of up to 5,000 events or 200 ms, 2
writers) for the whole run, all on loopback. Three parts (issue 4's targets in brackets):

1. Throughput [>= 50,000 events/s, or >= half of raw COPY, whichever is lower]. Each run,
   in alternating order: the raw COPY limit (asyncpg `copy_records_to_table` of pre-built
   rows into a bare copy of traffic_logs, batches of 5,000, one connection: see
   socksbench/pgdata.py), and the pipeline: `--streams` concurrent gRPC streams, each a node
   that says Hello and then sends batches of 500 events (the exporter's default) with up to 8
   unanswered (its default window), pre-encoded the way `GrpcExporter` encodes them
   (`proxy_node.convert.event_to_proto`, `encode_batch_request`). Events/s = events acked /
   (last ack - first send); an ack is sent only after the commit. The rows are counted in
   the database afterwards.
2. Delay at 10,000 events/s [p99 < 2 s]: the same streams, paced to 10,000 events/s in all,
   each event stamped `ended_at` = the moment it is made (the connection's close), batched
   like the exporter (500 events or 200 ms). Delay = the commit time of the row's transaction
   (`pg_xact_commit_timestamp(xmin)`: when it became visible) - ended_at; p50/p99/max over
   every row.
3. The proxy's connection rate with the pipeline on (events.sink: grpc to the collector) and
   off (events.sink: none), a fresh proxy per mode and run, measured like bench/run.py's
   conn_ipv4 scenario (bench/loadgen.c) [the pipeline costs < 10 %]. Modes: off, on (same
   priority), on-nice (the collector's and PostgreSQL's process trees and session groups at
   nice 19), on-stub (a stub collector process that acknowledges each batch without storing
   it: the exporter's own cost, without the collector and database sharing the cores). For
   each mode also the share of the run the proxy's event-loop thread was runnable but waiting
   for a CPU another task held (/proc/<pid>/schedstat): CPU time taken from it by others.

Progress on stderr; markdown on stdout and bench/results/pipeline-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from socksbench import generator, pgdata, report, scenarios
from socksbench.generator import Hop
from socksbench.procstat import tree_cpu_seconds, tree_pids
from socksbench.proxies import VENV_BIN, Ours, start
from socksbench.scenarios import Collector, Subject

from proxy_node.convert import event_to_proto
from proxy_node.events import ConnectionEvent
from proxy_node.exporter import encode_batch_request
from socks5_analytics.stubs.traffic.v1 import ingest_pb2 as ingest

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.monotonic()
METHOD = "/traffic.v1.IngestService/Stream"
BATCH = 500  # the exporter's default batch_max_events
WINDOW = 8  # the exporter's default max_inflight_batches
FLUSH_S = 0.2  # the exporter's default flush_interval


@dataclasses.dataclass(frozen=True)
class Sizes:
    runs: int
    events: int  # per throughput run
    raw_rows: int  # per raw COPY run
    delay_s: float
    delay_rate: int
    conn_runs: int
    conn: scenarios.Sizes


FULL = Sizes(runs=3, events=150_000, raw_rows=150_000, delay_s=15.0, delay_rate=10_000,
             conn_runs=5, conn=scenarios.FULL)
QUICK = Sizes(runs=1, events=20_000, raw_rows=20_000, delay_s=4.0, delay_rate=10_000,
              conn_runs=1, conn=scenarios.QUICK)


def log(message: str) -> None:
    pgdata.log_to_stderr(T0, message)


# -- the collector process ----------------------------------------------------------------------


def _terminate(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if `process` has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class CollectorProcess:
    """`socks5-analytics collector` on a free loopback port; its JSON log lines kept."""

    def __init__(self, url: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "collector.yaml"
        config.write_text(
            "log: {format: json, level: info}\n"
            f"database: {{url: '{url}'}}\n"
            "collector: {metrics_listen: null}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S5A_", "OTEL_"))}
        self.lines: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [str(VENV_BIN / "socks5-analytics"), "collector", "--config", str(config),
             "--listen", "127.0.0.1:0"],
            env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        self.address = self._wait_address()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"message": raw.decode(errors="replace").strip()})

    def _wait_address(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("message") == "collector listening":
                    return str(line["address"])
            if self.process.poll() is not None:
                raise RuntimeError(f"the collector exited: {self.lines[-5:]}")
            time.sleep(0.05)
        raise RuntimeError("the collector did not start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        _terminate(self.process, 20)
        self._pump.join(5)


class StubCollector:
    """A collector stand-in in its own process: acknowledges every batch at once, stores
    nothing. The pipeline-on proxy's cost against it is the exporter's own."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S5A_", "OTEL_"))}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-stub-collector"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            raise RuntimeError("the stub collector did not start")
        self.address = line

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        _terminate(self.process, 10)


def serve_stub_collector() -> None:
    """The stub collector's process: print the address, then ack batches until killed."""

    async def stream(requests: Any, context: Any) -> Any:
        async for raw in requests:
            request = ingest.IngestRequest.FromString(raw)
            if request.WhichOneof("kind") == "batch":
                batch = request.batch
                yield ingest.IngestResponse(ack=ingest.Ack(
                    sequence=batch.sequence, inserted=len(batch.events) + len(batch.interims),
                )).SerializeToString()

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "traffic.v1.IngestService",
            {"Stream": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=None, response_serializer=None)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


# -- load: gRPC streams like the exporter's ----------------------------------------------------

_DOMAINS = pgdata.DOMAINS
_CLIENT_W = list(pgdata._CLIENT_W)
_DOMAIN_W = list(pgdata._DOMAIN_W)


def make_events(count: int, node: str, rng: random.Random,
                ended: datetime | None = None) -> list[ConnectionEvent]:
    """Finished connections as the proxy reports them (skewed like pgdata.events)."""
    now = ended or datetime.now(UTC)
    domains = rng.choices(_DOMAINS, cum_weights=_DOMAIN_W, k=count)
    clients = rng.choices(range(len(pgdata.CLIENTS)), cum_weights=_CLIENT_W, k=count)
    made = []
    for domain, client in zip(domains, clients, strict=True):
        duration = rng.lognormvariate(7, 2)
        ok = rng.random() < 0.93
        made.append(ConnectionEvent(
            event_id=uuid.UUID(int=rng.getrandbits(128) & ~(0xF << 76) | (4 << 76)),
            node_id=node, started_at=now - timedelta(milliseconds=duration), ended_at=now,
            source_ip=str(pgdata.CLIENTS[client]), source_port=rng.randrange(1024, 65536),
            user=pgdata.USERS[client * 7 % len(pgdata.USERS)], command="connect",
            protocol="tcp", dest_host=domain[0], domain=domain[0], dest_ip=None,
            dest_port=443, registered_domain=None, status="ok" if ok else "refused",
            reply_code=0 if ok else 5, close_reason="client" if ok else "error",
            connect_ms=rng.lognormvariate(3, 1) if ok else None, ttfb_ms=None,
            duration_ms=duration, bytes_out=int(rng.lognormvariate(7, 1.5)) if ok else 0,
            bytes_in=int(rng.lognormvariate(10, 2)) if ok else 0, trace_id=None,
        ))
    return made


def encode(events: list[ConnectionEvent]) -> bytes:
    """A Batch body as the exporter serializes (and spools) it."""
    batch = ingest.Batch()
    batch.events.extend(event_to_proto(event) for event in events)
    return batch.SerializeToString()


def hello(node: str) -> bytes:
    request = ingest.IngestRequest(hello=ingest.Hello(
        node_id=node, version="bench", boot_id=uuid.uuid4().bytes, policy_version="bench"))
    request.hello.started_at.GetCurrentTime()
    return request.SerializeToString()


class Stream:
    """One node's stream: batches in, acks out, at most WINDOW unanswered."""

    def __init__(self, channel: grpc.aio.Channel, node: str) -> None:
        self.node = node
        self.call = channel.stream_stream(
            METHOD, request_serializer=None,
            response_deserializer=ingest.IngestResponse.FromString)()
        self.sequence = 0
        self.window = asyncio.Semaphore(WINDOW)
        self.pending: dict[int, tuple[int, float]] = {}
        self.acked = 0
        self.last_ack = 0.0
        self.done = asyncio.Event()
        self.expected = 0
        self.reader: asyncio.Task[None] | None = None
        self.write_lock = asyncio.Lock()  # one write at a time on a call

    async def open(self) -> None:
        await self.call.write(hello(self.node))
        self.reader = asyncio.create_task(self._read())

    async def send(self, payload: bytes, count: int) -> None:
        await self.window.acquire()
        async with self.write_lock:
            self.sequence += 1
            self.pending[self.sequence] = (count, time.perf_counter())
            await self.call.write(encode_batch_request(payload, self.sequence))

    async def _read(self) -> None:
        while True:
            answer = await self.call.read()
            if answer is grpc.aio.EOF:
                return
            kind = answer.WhichOneof("kind")
            result = answer.ack if kind == "ack" else answer.rejection
            if kind != "ack":
                raise RuntimeError(f"{self.node}: batch rejected: {result.invalid[:3]}")
            count, _ = self.pending.pop(result.sequence)
            self.acked += count
            self.last_ack = time.perf_counter()
            self.window.release()
            if self.expected and self.acked >= self.expected:
                self.done.set()

    async def close(self) -> None:
        await self.call.done_writing()
        if self.reader is not None:
            self.reader.cancel()


async def throughput(address: str, streams: int, events: int, rng: random.Random,
                     tag: str) -> dict[str, Any]:
    per_stream = events // streams // BATCH
    log(f"  building {per_stream * BATCH * streams:,} events in batches of {BATCH}")
    payloads = [[encode(make_events(BATCH, f"{tag}-{s}", rng)) for _ in range(per_stream)]
                for s in range(streams)]
    async with grpc.aio.insecure_channel(address) as channel:
        open_streams = [Stream(channel, f"{tag}-{s}") for s in range(streams)]
        for stream in open_streams:
            stream.expected = per_stream * BATCH
            await stream.open()

        async def pump(stream: Stream, batches: list[bytes]) -> None:
            for payload in batches:
                await stream.send(payload, BATCH)
            await asyncio.wait_for(stream.done.wait(), 120)

        started = time.perf_counter()
        await asyncio.gather(*(pump(s, p) for s, p in zip(open_streams, payloads, strict=True)))
        ended = max(s.last_ack for s in open_streams)
        for stream in open_streams:
            await stream.close()
    acked = sum(s.acked for s in open_streams)
    return {"events": acked, "seconds": ended - started, "events_per_s": acked / (ended - started)}


async def paced(address: str, streams: int, rate: int, seconds: float, rng: random.Random,
                tag: str) -> dict[str, Any]:
    """`rate` events/s in all for `seconds`, batched like the exporter (BATCH or FLUSH_S)."""
    tick = 0.01
    async with grpc.aio.insecure_channel(address) as channel:
        open_streams = [Stream(channel, f"{tag}-{s}") for s in range(streams)]
        for stream in open_streams:
            await stream.open()

        async def node(stream: Stream) -> int:
            loop = asyncio.get_running_loop()
            start = loop.time()
            buffered: list[ConnectionEvent] = []
            emitted = 0
            last_flush = start
            sends = []
            while (now := loop.time()) - start < seconds:
                due = int((now - start) * rate / streams) - emitted
                if due > 0:
                    buffered += make_events(due, stream.node, rng)
                    emitted += due
                if len(buffered) >= BATCH or (buffered and now - last_flush >= FLUSH_S):
                    while buffered:
                        chunk, buffered = buffered[:BATCH], buffered[BATCH:]
                        sends.append(asyncio.create_task(stream.send(encode(chunk), len(chunk))))
                    last_flush = now
                await asyncio.sleep(tick)
            if buffered:
                sends.append(asyncio.create_task(stream.send(encode(buffered), len(buffered))))
            await asyncio.gather(*sends)
            stream.expected = emitted
            if stream.acked < emitted:
                await asyncio.wait_for(stream.done.wait(), 60)
            return emitted

        started = time.perf_counter()
        emitted = await asyncio.gather(*(node(s) for s in open_streams))
        elapsed = time.perf_counter() - started
        for stream in open_streams:
            await stream.close()
    return {"events": sum(emitted), "seconds": elapsed, "rate": sum(emitted) / elapsed}


DELAY_SQL = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99,
       max(d) AS max
FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - ended_at) AS d
      FROM traffic_logs WHERE node_id LIKE $1) AS delays
"""


async def count_rows(url: str, pattern: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval(
            "SELECT count(*) FROM traffic_logs WHERE node_id LIKE $1", pattern))
    finally:
        await connection.close()


async def delays(url: str, pattern: str) -> dict[str, float]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(DELAY_SQL, pattern)
    finally:
        await connection.close()
    return {"rows": int(row["n"]), "p50_s": float(row["p50"]), "p99_s": float(row["p99"]),
            "max_s": float(row["max"])}


async def raw_limit(url: str, rows: int, rng: random.Random) -> float:
    connection = await asyncpg.connect(url)
    try:
        today = datetime.now(UTC).date()
        if await connection.fetchval(f"SELECT to_regclass('{pgdata.RAW_TABLE}')") is None:
            await pgdata.create_raw_table(connection, [today - timedelta(days=1), today])
        made = pgdata.events(rows, rng)
        batches = [pgdata.records(chunk) for chunk in pgdata.chunks(made, 5_000)]
        seconds = await pgdata.raw_copy(connection, batches)
    finally:
        await connection.close()
    return rows / seconds


# -- the proxy's connection rate, pipeline on and off -------------------------------------------


@dataclasses.dataclass
class SinkOurs(Ours):
    """Our proxy with its event sink chosen through S5A_PROXY__EVENTS__* (env beats the file)."""

    collector: str | None = None

    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        argv = super().command(port, auth, workdir)
        if self.collector is None:
            return ["env", "S5A_PROXY__EVENTS__SINK=none", *argv]
        return ["env", "S5A_PROXY__EVENTS__SINK=grpc",
                f"S5A_PROXY__EVENTS__COLLECTORS={self.collector}",
                f"S5A_PROXY__EVENTS__SPOOL_DIR={workdir / 'spool'}", *argv]


CONN_MODES = ("off", "on", "on-nice", "on-stub")


def renice(roots: list[int | None], niceness: int) -> None:
    """Set the niceness of every thread of the process trees (Linux niceness is per thread;
    threads and processes started later inherit their parent's), and of their session's
    scheduling group where the kernel groups by session (CONFIG_SCHED_AUTOGROUP, on by
    default in many distributions): there a thread's niceness only weighs it against its
    own group, and every group gets an equal share of a contended CPU."""
    for root in roots:
        if not root:
            continue
        try:
            Path(f"/proc/{root}/autogroup").write_text(f"{niceness}\n")
        except OSError:
            pass  # no autogroup (or not allowed): the per-thread niceness below is what counts
        for pid in tree_pids(root):
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                except OSError:
                    pass  # gone meanwhile


def sched_seconds(root: int) -> tuple[float, float]:
    """(running, runnable-but-waiting) seconds so far of the main thread (the event loop's)
    of every process in the tree, from /proc/<pid>/schedstat (0, 0 where the kernel keeps
    none). Helper threads (gRPC's) are left out: their waits overlap the loop's."""
    running = waiting = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
        except OSError:
            continue
        running += int(fields[0])
        waiting += int(fields[1])
    return running / 1e9, waiting / 1e9


def conn_rate(mode: str, proxy: SinkOurs, target: generator.Target, sizes: scenarios.Sizes,
              run: int, out: Collector, workdir: Path) -> int:
    """One measurement of conn_ipv4 on a fresh proxy; returns connections made. Also
    records the share of the run the proxy was runnable but kept off a CPU (`wait_share`)."""
    running = start(proxy, auth=False, workdir=workdir)
    try:
        subject = Subject(mode, Hop(running.port), running.pid)
        warm = generator.conn(subject.hop, target, "127.0.0.1", sizes.warmup_count, 3.0,
                              sizes.concurrency)
        before = len(out.raw)
        wall0, (_, wait0) = time.monotonic(), sched_seconds(running.pid)
        scenarios.measure_conn(subject, target, sizes, run, "ipv4", out)
        wall, (_, wait1) = time.monotonic() - wall0, sched_seconds(running.pid)
        out.add(mode, "wait_share", (wait1 - wait0) / max(wall, 1e-3))
        made = warm["completed"] + sum(e["result"]["completed"] for e in out.raw[before:])
        if not running.alive():
            out.note(mode, f"the proxy exited during the run: {running.log_tail()}")
    finally:
        running.stop()
    return int(made)


# -- main ---------------------------------------------------------------------------------------


def _cpu(pid: int | None) -> float:
    return tree_cpu_seconds(pid) if pid else 0.0


def _pipeline_cpu(collector: CollectorProcess, pg_pid: int | None) -> tuple[float, float]:
    """CPU seconds so far of the collector's and PostgreSQL's process trees."""
    return tree_cpu_seconds(collector.pid), _cpu(pg_pid)


def run(args: argparse.Namespace, sizes: Sizes, workroot: Path) -> dict[str, Any]:
    rng = random.Random(4)
    samples: dict[str, list[float]] = {}
    notes: list[str] = []
    extra: dict[str, Any] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    with pgdata.embedded_postgres(commit_timestamps=True) as server:
        url = server.dsn
        pg_pid = pgdata.postmaster_pid(server)
        collector = CollectorProcess(url, workroot / "collector")
        try:
            log(f"collector at {collector.address}, PostgreSQL at {url} (non-durable)")
            # warm-up: connections, plans, partitions
            asyncio.run(throughput(collector.address, args.streams, 4 * BATCH * args.streams,
                                   rng, "warm"))
            asyncio.run(raw_limit(url, 5_000, rng))
            if "throughput" in args.parts:
                for number in range(sizes.runs):
                    meter = pgdata.LoadMeter([pg_pid, collector.pid])
                    order = ["raw", "pipeline"] if number % 2 == 0 else ["pipeline", "raw"]
                    for part in order:
                        if part == "raw":
                            pg0 = _cpu(pg_pid)
                            rate = asyncio.run(raw_limit(url, sizes.raw_rows, rng))
                            add("raw_copy", rate)
                            # PostgreSQL's own cost of a row, for comparison with the
                            # pipeline's (which adds the dedup insert and the rollups)
                            add("raw_postgres_us_per_row",
                                (_cpu(pg_pid) - pg0) / sizes.raw_rows * 1e6)
                        else:
                            tag = f"tp{number}"
                            cpu0 = _pipeline_cpu(collector, pg_pid)
                            result = asyncio.run(throughput(collector.address, args.streams,
                                                            sizes.events, rng, tag))
                            cpu1 = _pipeline_cpu(collector, pg_pid)
                            add("pipeline", result["events_per_s"])
                            # CPU per event: the collector's is what its code costs, whatever
                            # else runs on the machine (the load generator's encoding is done
                            # beforehand, outside the window).
                            add("collector_us_per_event",
                                (cpu1[0] - cpu0[0]) / result["events"] * 1e6)
                            add("postgres_us_per_event",
                                (cpu1[1] - cpu0[1]) / result["events"] * 1e6)
                            stored = asyncio.run(count_rows(url, f"{tag}-%"))
                            if stored != result["events"]:
                                notes.append(f"run {number + 1}: {result['events']} events acked "
                                             f"but {stored} rows stored")
                    load = meter.stop()
                    add("other_cores_throughput", load["other_cores"])
                    log(f"run {number + 1}/{sizes.runs}: pipeline "
                        f"{samples['pipeline'][-1]:,.0f} events/s, raw COPY "
                        f"{samples['raw_copy'][-1]:,.0f} rows/s; other load "
                        f"{load['other_cores']:.2f} cores")
            if "delay" in args.parts:
                log(f"delay: {sizes.delay_rate:,} events/s for {sizes.delay_s:g} s")
                meter = pgdata.LoadMeter([pg_pid, collector.pid])
                paced_result = asyncio.run(paced(collector.address, args.streams, sizes.delay_rate,
                                                 sizes.delay_s, rng, "delay"))
                load = meter.stop()
                delay = asyncio.run(delays(url, "delay-%"))
                extra["delay"] = {**paced_result, **delay, "other_cores": load["other_cores"],
                                  "collector_and_pg_cores": load["ours_cores"]}
                log(f"  {paced_result['rate']:,.0f} events/s achieved; delay p50 "
                    f"{delay['p50_s'] * 1000:.0f} ms, p99 {delay['p99_s'] * 1000:.0f} ms, max "
                    f"{delay['max_s'] * 1000:.0f} ms over {delay['rows']:,} rows")

            if "conn" in args.parts:
                log(f"building {generator.build()}")
                out = Collector()
                on = SinkOurs("ours", is_ours=True, collector=collector.address)
                modes = {"off": SinkOurs("ours", is_ours=True), "on": on, "on-nice": on}
                stub = StubCollector() if "on-stub" in args.conn_modes else None
                if stub is not None:
                    modes["on-stub"] = SinkOurs("ours", is_ours=True, collector=stub.address)
                made_on = 0
                before_rows = asyncio.run(count_rows(url, "%"))
                pipeline_cores: dict[str, list[float]] = {}
                lag: dict[str, list[int]] = {}
                per_event_us: dict[str, dict[str, list[float]]] = {}
                with generator.running_target() as target:
                    for number in range(sizes.conn_runs):
                        # every mode first, second and last in turn
                        shift = number % len(args.conn_modes)
                        names = args.conn_modes[shift:] + args.conn_modes[:shift]
                        for name in names:
                            if name == "on-nice":
                                renice([collector.pid, pg_pid], 19)
                            pipeline = [stub.pid] if name == "on-stub" and stub else [
                                pg_pid, collector.pid]
                            meter = pgdata.LoadMeter(pipeline)
                            rows0 = asyncio.run(count_rows(url, "%"))
                            spent0 = _pipeline_cpu(collector, pg_pid)
                            try:
                                made = conn_rate(name, modes[name], target, sizes.conn, number,
                                                 out, workroot / f"conn-{number}-{name}")
                            finally:
                                used = meter.stop()
                                # committed by the time the proxy had exited: a niced pipeline
                                # that fell behind would show here, not hide after the run
                                arrived = asyncio.run(count_rows(url, "%")) - rows0
                                if name == "on-nice":
                                    renice([collector.pid, pg_pid], 0)
                            if name in ("on", "on-nice"):
                                # +1: the harness's readiness probe is a connection too
                                lag.setdefault(name, []).append(made + 1 - arrived)
                                made_on += made
                                # what each event cost the collector and PostgreSQL at this
                                # rate (their idle work, e.g. the checkpointer, included)
                                per_event = per_event_us.setdefault(name, {})
                                for who, before, after in zip(
                                        ("collector", "postgres"), spent0,
                                        _pipeline_cpu(collector, pg_pid),
                                        strict=True):
                                    per_event.setdefault(who, []).append(
                                        (after - before) / max(arrived, 1) * 1e6)
                            # the collector's and PostgreSQL's (or the stub's) share of the
                            # machine (the meter's "ours" also counts this process, idle
                            # meanwhile)
                            pipeline_cores.setdefault(name, []).append(used["ours_cores"])
                            last = out.samples.get(name, {}).get("conn_ipv4")
                            shown = report.fmt(last[-1]) if last else "-"
                            log(f"conn run {number + 1}/{sizes.conn_runs} pipeline {name}: "
                                f"{shown} conn/s, other load "
                                f"{out.raw[-1].get('background_cores', 0):.2f} cores")
                if stub is not None:
                    stub.stop()
                time.sleep(1.0)
                after_rows = asyncio.run(count_rows(url, "%"))
                extra["conn"] = {"samples": out.samples, "notes": out.notes, "caps": out.caps,
                                 "pipeline_cores": pipeline_cores,
                                 "rows_missing_at_exit": lag,
                                 "per_event_us": per_event_us,
                                 "connections_with_pipeline": made_on,
                                 "rows_from_proxy": after_rows - before_rows,
                                 "background": [e.get("background_cores") for e in out.raw]}
                # each proxy start adds one event of its own: the readiness probe's connection
                if after_rows - before_rows < made_on:
                    notes.append(f"pipeline-on proxies made {made_on} connections; only "
                                 f"{after_rows - before_rows} rows arrived")
        finally:
            collector.stop()
    return {"samples": samples, "notes": notes, **extra}


def _runs(values: list[float], fmt: str = ",.0f") -> str:
    return ", ".join(format(v, fmt) for v in values)


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The parts that were run, as one table of medians (every run's value in brackets)."""
    samples = result["samples"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    lines = ["| Figure | Value | Target | Met |", "|---|---:|---|---|"]
    load: list[str] = []
    if "pipeline" in med:
        pipe, raw = med["pipeline"], med["raw_copy"]
        target = min(50_000, raw / 2)
        lines += [
            f"| Pipeline, exporter streams → committed rows | {pipe:,.0f} events/s "
            f"(runs: {_runs(samples['pipeline'])}) | ≥ {target:,.0f} (min of 50,000 and "
            f"raw / 2) | {'yes' if pipe >= target else 'no'} |",
            f"| Raw COPY limit, same run | {raw:,.0f} rows/s "
            f"(runs: {_runs(samples['raw_copy'])}) | | |",
            f"| Pipeline / raw COPY | {pipe / raw:.2f} | ≥ 0.50 (or 50,000/s) | |",
            f"| Collector CPU per event | {med['collector_us_per_event']:.1f} µs "
            f"(runs: {_runs(samples['collector_us_per_event'], '.1f')}) | | |",
            f"| PostgreSQL CPU per event | {med['postgres_us_per_event']:.1f} µs "
            f"(runs: {_runs(samples['postgres_us_per_event'], '.1f')}) | | |",
            f"| PostgreSQL CPU per row, raw COPY | {med['raw_postgres_us_per_row']:.1f} µs "
            f"(runs: {_runs(samples['raw_postgres_us_per_row'], '.1f')}) | | |",
        ]
        load.append(f"{med.get('other_cores_throughput', 0):.2f} cores during throughput")
    delay = result.get("delay")
    if delay is not None:
        lines += [
            f"| Delay close → row visible at {delay['rate']:,.0f} events/s, p50 | "
            f"{delay['p50_s'] * 1000:,.0f} ms | | |",
            f"| Delay close → row visible, p99 | {delay['p99_s'] * 1000:,.0f} ms "
            f"(max {delay['max_s'] * 1000:,.0f} ms, {delay['rows']:,} rows) | < 2,000 ms "
            f"| {'yes' if delay['p99_s'] < 2 else 'no'} |",
        ]
        load.append(f"{delay['other_cores']:.2f} during the delay test")
    conn_result = result.get("conn")
    notes = list(result["notes"])
    if conn_result is not None:
        by_mode = conn_result["samples"]
        conn = {k: statistics.median(v["conn_ipv4"]) for k, v in by_mode.items()
                if "conn_ipv4" in v}
        cpu = {k: statistics.median(v["cpu_per_conn_ipv4"])
               for k, v in by_mode.items() if "cpu_per_conn_ipv4" in v}
        spent = {k: statistics.median(v)
                 for k, v in conn_result.get("pipeline_cores", {}).items()}
        for mode, label in (("off", "off (sink none)"), ("on", "on (grpc), same priority"),
                            ("on-nice", "on (grpc), collector and PostgreSQL at nice 19"),
                            ("on-stub", "on (grpc) to a stub collector that only acks")):
            if mode not in conn:
                continue
            who = "stub" if mode == "on-stub" else "collector + PostgreSQL"
            cores = f"; {who} {spent[mode]:.2f} cores" if mode in spent and mode != "off" else ""
            lines.append(f"| Proxy conn/s, pipeline {label} | {conn[mode]:,.0f} (runs: "
                         f"{_runs(by_mode[mode]['conn_ipv4'])}{cores}) | | |")
        for mode, label in (("on", "same priority"), ("on-nice", "collector and PostgreSQL "
                                                                 "niced"),
                            ("on-stub", "stub collector (the exporter alone)")):
            if mode in conn and "off" in conn:
                cost = 1 - conn[mode] / conn["off"]
                lines.append(f"| Pipeline's cost to the conn rate, {label} | {cost * 100:.1f} % "
                             f"| < 10 % | {'yes' if cost < 0.10 else 'no'} |")
        for mode, costs in conn_result.get("per_event_us", {}).items():
            lines.append(f"| Collector / PostgreSQL CPU per event during the conn runs, {mode} | "
                         + " / ".join(f"{statistics.median(costs[who]):.1f}"
                                      for who in ("collector", "postgres"))
                         + " µs | | |")
        for mode, missing in conn_result.get("rows_missing_at_exit", {}).items():
            lines.append(f"| Rows not yet committed when the proxy had exited, {mode} | "
                         f"{_runs([float(m) for m in missing], '.0f')} | 0 | "
                         f"{'yes' if not any(missing) else 'no'} |")
        if cpu:
            lines.append("| Proxy CPU per connection, " + " / ".join(cpu) + " | "
                         + " / ".join(f"{v:.0f}" for v in cpu.values()) + " µs | | |")
        wait = {k: statistics.median(v["wait_share"]) for k, v in by_mode.items()
                if "wait_share" in v}
        if wait:
            lines.append("| Proxy event loop runnable but waiting for a CPU, share of the run, "
                         + " / ".join(wait) + " | "
                         + " / ".join(f"{v * 100:.1f} %" for v in wait.values()) + " | | |")
        background = [b for b in conn_result["background"] if b is not None]
        load.append(f"{statistics.median(background) if background else 0:.2f} during "
                    f"conn runs")
        notes += [f"{name}: {text}" for name, texts in conn_result["notes"].items()
                  for text in texts]
        notes += [f"{name}: hit the time cap in {', '.join(caps)}"
                  for name, caps in conn_result["caps"].items()]
    sizes = []
    if "throughput" in meta["parts"]:
        sizes.append(f"{meta['runs']} throughput run(s) of {meta['events']:,} events over "
                     f"{meta['streams']} streams")
    if "conn" in meta["parts"]:
        sizes.append(f"{meta['conn_runs']} conn run(s) per mode")
    load0, load1 = meta.get("loadavg_before"), meta.get("loadavg_after")
    loadavg = (f"; load average {load0[0]:.2f} before, {load1[0]:.2f} after"
               if load0 and load1 else "")
    md = (f"Measured {meta['date']} on {meta['machine']['cpu']}, {meta['machine']['cores']} "
          f"cores, commit {meta['commit']}; embedded PostgreSQL (non-durable); parts "
          f"{', '.join(meta['parts'])}; {', '.join(sizes)}; medians. Other CPU load: "
          f"{'; '.join(load)}{loadavg}.\n\n"
          + "\n".join(lines) + "\n")
    if notes:
        md += "\nNotes:\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="throughput runs (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run")
    parser.add_argument("--streams", type=int, default=4, help="concurrent node streams")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument("--parts", default="throughput,delay,conn",
                        help="comma-separated: throughput, delay, conn (default all)")
    parser.add_argument("--conn-runs", type=int, help="conn runs per mode (default 5)")
    parser.add_argument("--conn-modes", default=",".join(CONN_MODES),
                        help="comma-separated: off, on, on-nice, on-stub (default all)")
    parser.add_argument("--serve-stub-collector", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stub_collector:
        serve_stub_collector()
        return 0
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    args.conn_modes = [mode.strip() for mode in args.conn_modes.split(",") if mode.strip()]
    unknown = (set(args.parts) - {"throughput", "delay", "conn"}) | (set(args.conn_modes)
                                                                    - set(CONN_MODES))
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = QUICK if args.quick else FULL
    if args.runs:
        sizes = dataclasses.replace(sizes, runs=args.runs, conn_runs=args.runs)
    if args.conn_runs:
        sizes = dataclasses.replace(sizes, conn_runs=args.conn_runs)
    workroot = Path(tempfile.mkdtemp(prefix="s5a-bench-pipeline-"))
    workroot.chmod(0o755)
    load0 = os.getloadavg()
    try:
        result = run(args, sizes, workroot)
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": report.machine_info(),
        "commit": report.git_state(),
        "runs": sizes.runs,
        "conn_runs": sizes.conn_runs,
        "events": sizes.events,
        "streams": args.streams,
        "parts": args.parts,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "elapsed_s": round(time.monotonic() - T0, 1),
    }
    md = markdown(result, meta)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"pipeline-{stamp}.json").write_text(
        json.dumps({"meta": meta, **result}, indent=1, default=str) + "\n")
    (RESULTS / f"pipeline-{stamp}.md").write_text(md)
    print(md)
    log(f"done in {meta['elapsed_s']} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
