"""Ingestion benchmark: `kilde serve` on loopback, driven by a separate load process.

    .venv/bin/python bench/ingest.py [--duration 20] [--quick]

Scenarios (issue 2, "Performance"):
- batched: POST /v1/batch with 100 events of about 600 bytes each, several keep-alive
  connections, every 2xx a durable acknowledgement (sent only after the group commit). Figures:
  events/s, p50/p99 request latency, the server's peak RSS, and the ceiling measured in this
  same run: the same kind of events parsed with orjson and sent through Pipeline and Writer in
  this process, without HTTP. Printed with the ratios HTTP/ceiling and HTTP/target (20,000/s).
  With identity resolution on, also how many events it had not read when the load stopped and
  how long it then took to read them (the single events start after that).
- single: one event per request (as browsers send them): requests/s and p50/p99.

At the end the store must hold exactly the events that were acknowledged. The load process's
own CPU use is printed, so one can see that it is not what limits the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import LoadResult, Stamper, event_pool, percentile, run_load

ROOT = Path(__file__).resolve().parent.parent
DEMO_PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
ADMIN_TOKEN = "kat_bench-admin-token-0123456789abcdef"
TARGET = 20_000  # events/s, batched, durable acks (issue 2)
GOAL = 100_000
BATCH = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(data_dir: Path, *, identity: bool = True) -> ServerProcess:
    port = free_port()
    env = {
        **os.environ,
        "KILDE_DATA": str(data_dir),
        "KILDE_PLAN": str(DEMO_PLAN),
        "KILDE_ADMIN_TOKEN": ADMIN_TOKEN,
        "KILDE_PORT": str(port),
        "KILDE_IDENTITY_BACKGROUND": "1" if identity else "0",
    }
    log_path = data_dir.parent / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kilde.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"kilde serve exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{server.url}/api/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise SystemExit(f"kilde serve did not answer within 60 s:\n{log_path.read_text()}")


class MemoryWatch:
    """Samples the server's RSS with psutil; also reads the kernel's high-water mark."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.1)

    def high_water_mark(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return self.peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.high_water_mark())


LOOP = "event loop (HTTP, parsing, pipeline)"
OTHER = "DuckDB's threads and others"
ENDED = "threads that ended (profile refreshes)"


def cpu_seconds(proc: psutil.Process) -> dict[str, float]:
    """CPU seconds of the server by thread: the event loop, each thread Kilde names in the OS
    (kilde.thread_names: kilde-writer, kilde-identity, ...), the unnamed rest (DuckDB), and
    threads that have ended since it started (the process's total keeps their time)."""
    times = proc.cpu_times()
    groups: dict[str, float] = {}
    for thread in proc.threads():
        if thread.id == proc.pid:
            group = LOOP
        else:
            try:
                name = Path(f"/proc/{proc.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:  # ended meanwhile: its time is counted as ended below
                continue
            group = name if name.startswith("kilde-") else OTHER
        groups[group] = groups.get(group, 0.0) + thread.user_time + thread.system_time
    groups[ENDED] = max(0.0, times.user + times.system - sum(groups.values()))
    return groups


@dataclass
class Scenario:
    name: str
    load: LoadResult
    events: int
    wall_s: float
    server_cpu_s: float
    threads_cpu_s: dict[str, float]  # by thread group, see cpu_seconds
    writer: dict[str, float]  # the server's writer totals over the scenario (GET /api/stats)

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.load.ok / self.wall_s


def drive(
    pool: ProcessPoolExecutor,
    server: ServerProcess,
    name: str,
    *,
    connections: int,
    duration: float,
    batch_size: int,
    seed: int,
) -> Scenario:
    proc = psutil.Process(server.process.pid)
    writer_before = admin_get(server, "/api/stats")["writer"]
    before = cpu_seconds(proc)
    future = pool.submit(
        run_load, "127.0.0.1", server.port, connections, duration, batch_size, seed, name
    )
    load = future.result()
    after = cpu_seconds(proc)
    writer_after = admin_get(server, "/api/stats")["writer"]
    writer = {k: writer_after[k] - writer_before[k] for k in writer_after}
    if load.failed or load.events_rejected:
        print(f"  {name}: {load.failed} failed requests, {load.events_rejected} rejected events")
        for sample in load.error_samples:
            print(f"    {sample}")
    # A thread that ended meanwhile moves its time from its group to ENDED: the total is exact,
    # a group's share of it only nearly so.
    total = sum(after.values()) - sum(before.values())
    threads = {k: v - before.get(k, 0.0) for k, v in after.items()}
    threads = {k: v for k, v in threads.items() if v > 0.005}
    return Scenario(name, load, load.events_acked, load.wall_s, total, threads, writer)


def measure_ceiling(bodies: list[tuple[str, bytes]], concurrency: int) -> tuple[float, int]:
    """The same events through Pipeline and Writer in this process: no HTTP, no sockets.

    `bodies` are (path, JSON body) as the load process sends them; returns (events/s, number
    of events in the store beyond those acknowledged, which must be 0).
    """
    from kilde.collect.segment_api import MAX_EVENT_BYTES, _batch_records
    from kilde.pipeline import Envelope, Pipeline
    from kilde.plan import load_plan
    from kilde.store import Store, Writer
    from kilde.web.app import settle_garbage_collector

    plan = load_plan(DEMO_PLAN)
    source = next(s for s in plan.sources if s.name == "web")
    settle_garbage_collector()  # as the server does at start-up
    data_dir = Path(tempfile.mkdtemp(prefix="kilde-bench-ceiling-"))
    store = Store(data_dir)
    writer = Writer(store)
    pipeline = Pipeline(plan, writer)

    async def ingest(path: str, body: bytes, prefix: str = "") -> int:
        kind = path.rsplit("/", 1)[1]
        payload = orjson.loads(body)
        if kind == "batch":
            records, message_type = _batch_records(payload), None
        else:
            records, message_type = [payload], kind
        if prefix:
            for record in records:
                record["messageId"] = prefix + record["messageId"]
        env = Envelope(datetime.now(UTC), "http", "127.0.0.1", "kilde-bench")
        result = await pipeline.ingest(
            records, source, env, message_type, max_event_bytes=MAX_EVENT_BYTES
        )
        return result.stored

    async def run(items: list[tuple[str, bytes]], prefix: str) -> int:
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        stored = 0

        async def worker() -> None:
            nonlocal stored
            while not queue.empty():
                path, body = queue.get_nowait()
                count = await ingest(path, body, prefix)
                stored += count  # not `stored += await ...`: that reads `stored` too early

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return stored

    try:
        # Warm up caches (user agents, compiled schemas) with renamed copies of some events.
        warmed = asyncio.run(run(bodies[: max(1, len(bodies) // 20)], "warmup-"))
        started = time.perf_counter()
        stored = asyncio.run(run(bodies, ""))
        elapsed = time.perf_counter() - started
        in_store = int(store.scalar("SELECT count(*) FROM events"))
    finally:
        writer.close()
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return stored / elapsed, in_store - stored - warmed


def admin_get(server: ServerProcess, path: str) -> Any:
    """GET an admin API path of the server, as JSON."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return httpx.get(f"{server.url}{path}", headers=headers, timeout=60).json()


def identity_catch_up(server: ServerProcess, timeout: float = 120.0) -> tuple[int, float]:
    """Events identity resolution had not read when the load stopped, and the seconds it then
    took to read them all (whether it keeps up with the load, or falls behind)."""
    started = time.monotonic()
    first: int | None = None
    while True:
        unread = int(admin_get(server, "/api/identity/status")["unread_events"])
        first = unread if first is None else first
        waited = time.monotonic() - started
        if unread == 0 or waited > timeout:
            return first, waited
        time.sleep(0.1)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of batched load")
    parser.add_argument("--quick", action="store_true", help="short run (5 s + 3 s)")
    parser.add_argument("--connections", type=int, default=8, help="batched connections")
    parser.add_argument(
        "--single-connections", type=int, default=32, help="connections sending single events"
    )
    parser.add_argument(
        "--no-identity",
        action="store_true",
        help="stop the server's background identity resolution (ingestion alone)",
    )
    args = parser.parse_args()
    duration = 5.0 if args.quick else args.duration
    single_duration = 3.0 if args.quick else max(5.0, duration / 2)

    base = Path(tempfile.mkdtemp(prefix="kilde-bench-"))
    print(
        f"kilde ingestion benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average before the run {os.getloadavg()[0]:.1f} (other processes share the CPUs)"
    )
    print(
        f"batched: {args.connections} connections x {BATCH} events/request for {duration:.0f} s; "
        f"single: {args.single_connections} connections for {single_duration:.0f} s; "
        f"background identity resolution {'off' if args.no_identity else 'on (as shipped)'}"
    )
    stamper = Stamper(event_pool(7), "ceiling")
    sample = stamper.events(1000)
    mean_size = sum(len(orjson.dumps(e)) for e in sample) / len(sample)

    ctx = get_context("spawn")
    server = start_server(base / "data", identity=not args.no_identity)
    try:
        memory = MemoryWatch(server.process.pid)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            warm = drive(
                pool, server, "warmup", connections=args.connections, duration=1.0,
                batch_size=BATCH, seed=1,
            )  # fmt: skip
            batched = drive(
                pool, server, "batched", connections=args.connections, duration=duration,
                batch_size=BATCH, seed=2,
            )  # fmt: skip
            # before the single events, so that phase starts with identity caught up
            behind = None if args.no_identity else identity_catch_up(server)
            single = drive(
                pool, server, "single", connections=args.single_connections,
                duration=single_duration, batch_size=0, seed=3,
            )  # fmt: skip
        peak_rss = memory.stop()
        stats = admin_get(server, "/api/stats")
    finally:
        server.stop()

    acked = warm.events + batched.events + single.events
    in_store = int(stats["events"])
    dead = int(stats["dead_letters_pending"])

    # The ceiling runs after the server stopped, so the two never share the CPUs.
    seconds = min(duration, 10.0)
    count = max(50, int(min(batched.events_per_s, 50_000) * seconds / BATCH))
    batches = [("/v1/batch", stamper.batch_body(BATCH)) for _ in range(count)]
    ceiling, leftover = measure_ceiling(batches, args.connections)
    count = max(500, int(min(single.requests_per_s, 20_000) * min(single_duration, 5.0)))
    singles = [stamper.single_body() for _ in range(count)]
    single_ceiling, single_leftover = measure_ceiling(singles, args.single_connections)
    shutil.rmtree(base, ignore_errors=True)

    def writer_rows(scenario: Scenario) -> None:
        """Where an acknowledgement's time went, from the server's own writer totals."""
        w = scenario.writer
        if not w["commits"] or not w["resumed"]:
            return
        row(
            "writer: commits/s, events per commit",
            f"{w['commits'] / scenario.wall_s:,.0f}, {w['events'] / w['commits']:,.0f}",
        )
        row(
            "  commit (share of the time the writer committed)",
            f"{w['commit_seconds'] / w['commits'] * 1e3:.1f} ms "
            f"({w['commit_seconds'] / scenario.wall_s:.0%})",
        )
        row(
            "  batch queued before its commit began",
            f"{w['queue_seconds'] / w['batches'] * 1e3:.1f} ms",
        )
        row(
            "  request went on after its commit",
            f"{w['resume_seconds'] / w['resumed'] * 1e3:.1f} ms",
        )
        if w["applies"]:
            row(
                "applier: DuckDB commits/s, events per commit",
                f"{w['applies'] / scenario.wall_s:,.0f}, {w['applied_events'] / w['applies']:,.0f}",
            )
            row(
                "  commit (share of the time the applier committed)",
                f"{w['apply_seconds'] / w['applies'] * 1e3:.1f} ms "
                f"({w['apply_seconds'] / scenario.wall_s:.0%})",
            )

    def row(label: str, value: str) -> None:
        print(f"  {label:<52} {value:>16}")

    lb = batched.load
    ls = single.load
    print()
    print(f"event size (JSON): {mean_size:.0f} bytes on average")
    print("batched  POST /v1/batch, 100 events per request, durable acks")
    row("events/s acknowledged", f"{batched.events_per_s:,.0f}")
    row("requests/s", f"{batched.requests_per_s:,.0f}")
    row("latency p50 / p99", f"{percentile(lb.latencies_ms, 50):.1f} / "
        f"{percentile(lb.latencies_ms, 99):.1f} ms")  # fmt: skip
    row("failed requests (non-2xx)", f"{lb.failed}")
    row("server CPU (both cores = 200%)", f"{batched.server_cpu_s / batched.wall_s:.0%}")
    row("  CPU per event, all threads", f"{batched.server_cpu_s / batched.events * 1e6:.1f} µs")
    for group, seconds in sorted(batched.threads_cpu_s.items(), key=lambda kv: -kv[1]):
        row(f"    {group}", f"{seconds / batched.events * 1e6:.1f} µs")
    writer_rows(batched)
    row("load process CPU", f"{lb.cpu_s / lb.wall_s:.0%}")
    row("ceiling: Pipeline+Writer in-process, events/s", f"{ceiling:,.0f}")
    row("ratio HTTP / ceiling", f"{batched.events_per_s / ceiling:.2f}")
    row(f"ratio HTTP / target {TARGET:,}", f"{batched.events_per_s / TARGET:.2f}")
    row(f"ratio HTTP / goal {GOAL:,}", f"{batched.events_per_s / GOAL:.2f}")
    caught_up = ""
    if behind is not None:
        row("identity: events not read when the load stopped", f"{behind[0]:,}")
        row("identity: all read after", f"{behind[1]:.1f} s")
        caught_up = f", identity {behind[0]:,} events behind, read {behind[1]:.1f} s later"
    print("single   POST /v1/<type>, 1 event per request, durable acks")
    row("requests/s", f"{single.requests_per_s:,.0f}")
    row("latency p50 / p99", f"{percentile(ls.latencies_ms, 50):.1f} / "
        f"{percentile(ls.latencies_ms, 99):.1f} ms")  # fmt: skip
    row("failed requests (non-2xx)", f"{ls.failed}")
    row("server CPU (both cores = 200%)", f"{single.server_cpu_s / single.wall_s:.0%}")
    row("  CPU per request, all threads", f"{single.server_cpu_s / single.events * 1e6:.0f} µs")
    for group, seconds in sorted(single.threads_cpu_s.items(), key=lambda kv: -kv[1]):
        row(f"    {group}", f"{seconds / single.events * 1e6:.0f} µs")
    writer_rows(single)
    row("load process CPU", f"{ls.cpu_s / ls.wall_s:.0%}")
    row("ceiling: one event per Pipeline.ingest, events/s", f"{single_ceiling:,.0f}")
    row("ratio HTTP / ceiling", f"{single.requests_per_s / single_ceiling:.2f}")
    print("server")
    row("peak RSS", fmt_bytes(peak_rss))
    row("events acknowledged (warmup+batched+single)", f"{acked:,}")
    row("events in the store", f"{in_store:,}")
    row("dead letters", f"{dead:,}")
    row("load average after the run (1 min)", f"{os.getloadavg()[0]:.1f}")
    ok = in_store == acked and dead == 0 and leftover == 0 and single_leftover == 0
    print()
    print(
        f"RESULT batched {batched.events_per_s:,.0f} events/s "
        f"(x{batched.events_per_s / TARGET:.2f} of target, "
        f"x{batched.events_per_s / ceiling:.2f} of in-process ceiling {ceiling:,.0f}/s), "
        f"p50 {percentile(lb.latencies_ms, 50):.1f} ms, p99 {percentile(lb.latencies_ms, 99):.1f} "
        f"ms, peak RSS {fmt_bytes(peak_rss)}{caught_up}; "
        f"single {single.requests_per_s:,.0f} req/s, "
        f"p99 {percentile(ls.latencies_ms, 99):.1f} ms "
        f"(x{single.requests_per_s / single_ceiling:.2f} of ceiling {single_ceiling:,.0f}/s); "
        "store check " + ("OK" if ok else "FAILED")
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
