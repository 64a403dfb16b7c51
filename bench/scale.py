"""Scale: profile rebuild on DuckDB and on Spark local mode as events grow; ingest with two
collector processes versus one.

Rebuild: a synthetic shop of N events (about 25 per person: page views, product views, orders,
one identify with an email per identified person, every third device shared by two people's
sessions) is written once as a lake (Parquet by day) and once into a DuckDB store. Then, each in
its own process, the profile rebuild runs:

- DuckDB: `IdentityEngine.rebuild` on the store, what `kilde profiles rebuild` runs;
- Spark: `kilde compute --store spark:local[*] --steps identity` on the lake (the Spark session's
  start is timed apart).

Printed per size: seconds, peak memory (resident set of the process and its children: the JVM
for Spark), events per second, Spark's time as a multiple of DuckDB's (the baseline), and how
time grows with size (the exponent k in time ~ size^k between successive sizes: 1 is linear).

Ingest: `kilde serve --collector-only` processes on one lake, loaded over HTTP by separate load
processes (batches of 100 events) for a fixed time; events acknowledged per second with two
collectors as a multiple of one (the baseline).

    python bench/scale.py --quick          # 100k/300k/1M DuckDB, 100k/300k Spark, short ingest
    python bench/scale.py                  # 1M/5M/10M DuckDB, 1M/5M Spark
    python bench/scale.py --spark-sizes 1000000,5000000,10000000   # Spark at 10M too (long)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
CHUNK = 1_000_000
CATEGORIES = np.array(["tents", "jackets", "boots", "packs", "sleeping"])


# -- synthetic events ------------------------------------------------------------------------------


def synth_chunk(start: int, n: int, people: int, rng: np.random.Generator) -> pa.Table:
    """Events start .. start+n of a shop with `people` people (vectorised)."""
    from kilde.store.schema import EVENT_SCHEMA

    idx = np.arange(start, start + n)
    person = rng.integers(0, people, n)
    device = person * 2 + (rng.random(n) < 0.2)  # some people use a second device
    shared = (device % 3 == 0) & (rng.random(n) < 0.02)  # now and then a shared device
    device = np.where(shared, device + 2, device)
    kind = rng.random(n)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    offset = rng.integers(0, 90 * 86400, n)
    ts = np.datetime64(now.replace(tzinfo=None), "us") - offset.astype("timedelta64[s]")
    identify = kind < 0.02
    order = (kind >= 0.02) & (kind < 0.05)
    viewed = (kind >= 0.05) & (kind < 0.45)
    identified = identify | (person % 2 == 0) & (kind < 0.2)
    types = np.where(identify, "identify", np.where(kind < 0.45, "track", "page"))
    none = np.full(len(kind), None, dtype=object)
    names = np.where(order, "Order Completed", np.where(viewed, "Product Viewed", none))
    category = CATEGORIES[person % len(CATEGORIES)]
    revenue = (person % 40 + 1) * 50
    properties = [
        f'{{"order_id": "o{i}", "revenue": {r}.0, "currency": "NOK"}}'
        if o
        else (f'{{"product_id": "p-{c}", "category": "{c}"}}' if v else '{"path": "/"}')
        for i, o, v, c, r in zip(idx, order, viewed, category, revenue, strict=True)
    ]
    traits = [
        f'{{"email": "p{p}@example.com"}}' if d else None
        for p, d in zip(person, identify, strict=True)
    ]
    anon = np.char.add("dev-", device.astype(str))
    user = np.where(identified, np.char.add("u-", person.astype(str)), none)
    received = ts + np.timedelta64(2, "s")
    columns: dict[str, Any] = {
        "message_id": np.char.add("m-", idx.astype(str)),
        "source": "web",
        "type": types,
        "event": names,
        "user_id": user,
        "anonymous_id": anon,
        "timestamp": ts,
        "received_at": received,
        "properties": properties,
        "traits": traits,
        "context": '{"library": {"name": "bench"}}',
        "plan_status": "ok",
    }
    arrays = []
    for field in EVENT_SCHEMA:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        elif isinstance(value, str):
            arrays.append(pa.array([value] * n, field.type))
        elif field.type == pa.timestamp("us", tz="UTC"):
            arrays.append(pa.array(value).cast(pa.timestamp("us")).cast(field.type))
        elif isinstance(value, list) or value.dtype == object:
            arrays.append(pa.array(list(value), field.type))
        else:
            arrays.append(pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


def make_shop(size: int, base: Path, seed: int = 7) -> tuple[Path, Path]:
    """A DuckDB data directory and a lake holding the same `size` events."""
    from kilde.store import Store
    from kilde.store.lake import EVENTS, Lake, append

    data, lake_dir = base / "data", base / "lake"
    store = Store(data)
    lake = Lake(lake_dir).create()
    rng = np.random.default_rng(seed)
    people = max(size // 25, 10)
    con = store.cursor()
    try:
        for start in range(0, size, CHUNK):
            chunk = synth_chunk(start, min(CHUNK, size - start), people, rng)
            append(lake, EVENTS, chunk, durable=False)
            con.register("chunk", chunk)
            con.execute("INSERT INTO events BY NAME SELECT * FROM chunk")
            con.unregister("chunk")
        con.execute("CHECKPOINT")
    finally:
        con.close()
        store.close()
    return data, lake_dir


# -- measured children ------------------------------------------------------------------------


class TreeMemory:
    """Peak resident memory of a process and all its children (the JVM, Python workers)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_child(args: list[str]) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KILDE_PLAN": str(PLAN)},
    )
    watch = TreeMemory(process.pid)
    out, err = process.communicate()
    peak = watch.stop()
    if process.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_bytes"] = peak
    return result


def child_duckdb(data: Path) -> dict[str, Any]:
    from kilde.identity.engine import IdentityEngine
    from kilde.plan import load_plan
    from kilde.store import Store, Writer

    plan = load_plan(PLAN)
    store = Store(data)
    writer = Writer(store)
    engine = IdentityEngine(store, writer, lambda: plan, data)
    started = time.perf_counter()
    report = engine.rebuild()
    seconds = time.perf_counter() - started
    engine.stop()
    writer.close()
    store.close()
    return {
        "seconds": seconds,
        "profiles": report.profiles,
        "identifiers": report.identifiers,
        "timings": report.timings,
    }


def child_spark(lake: Path, memory: str) -> dict[str, Any]:
    from kilde.plan import load_plan
    from kilde.store.backends import spark_session
    from kilde.store.compute import LakeCompute
    from kilde.store.lake import Lake

    t0 = time.perf_counter()
    spark = spark_session(
        "local[*]",
        conf={"spark.driver.memory": memory, "spark.sql.shuffle.partitions": "8"},
    )
    spark.sql("SELECT 1").collect()
    session_seconds = time.perf_counter() - t0
    job = LakeCompute(spark, Lake(lake), load_plan(PLAN))
    started = time.perf_counter()
    report = job.compute(("identity",))
    seconds = time.perf_counter() - started
    job.close()
    spark.stop()
    result = report.steps["identity"]["result"]
    return {
        "seconds": seconds,
        "session_seconds": session_seconds,
        "profiles": result["profiles"],
        "identifiers": result["identifiers"],
        "timings": result["timings"],
    }


# -- ingest -------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_collector(lake: Path, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "KILDE_PLAN": str(PLAN),
        "KILDE_DATA": str(work / f"c{port}"),
        "KILDE_LAKE": str(lake),
        "KILDE_PORT": str(port),
    }
    log = (work / f"collector-{port}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kilde.cli", "serve", "--collector-only"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("a collector did not start")


def ingest(collectors: int, duration: float, connections: int, work: Path) -> dict[str, Any]:
    from _load import run_load

    lake = work / f"lake-{collectors}"
    started = [start_collector(lake, work) for _ in range(collectors)]
    try:
        with ProcessPoolExecutor(max_workers=collectors) as pool:
            futures = [
                pool.submit(
                    run_load, "127.0.0.1", port, connections, duration, 100, 11 + n, f"c{n}"
                )
                for n, (_, port) in enumerate(started)
            ]
            loads = [f.result() for f in futures]
        # CPU the collectors themselves spent: what a collector costs per event, which is what
        # decides how many collectors a machine (or a cluster) of N cores can run side by side.
        cpu = 0.0
        for process, _ in started:
            times = psutil.Process(process.pid).cpu_times()
            cpu += times.user + times.system
    finally:
        for process, _ in started:
            process.terminate()
            process.wait(timeout=30)
    acked = sum(load.events_acked for load in loads)
    wall = max(load.wall_s for load in loads)
    from kilde.store.lake import Lake

    files = len(Lake(lake).files())
    return {
        "collectors": collectors,
        "events": acked,
        "events_per_s": acked / wall,
        "failed": sum(load.failed for load in loads),
        "files": files,
        "collector_cpu_s": cpu,
    }


# -- report -------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def growth(points: list[tuple[int, float]]) -> list[str]:
    out = ["-"]
    for (n0, t0), (n1, t1) in itertools.pairwise(points):
        out.append(f"{math.log(t1 / t0) / math.log(n1 / n0):.2f}" if t0 > 0 and t1 > 0 else "-")
    return out


def sizes_of(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short ingest")
    parser.add_argument("--sizes", help="DuckDB sizes, e.g. 1000000,5000000,10000000")
    parser.add_argument("--spark-sizes", help="Spark sizes (default: the two smallest)")
    parser.add_argument("--spark-memory", default="8g", help="Spark driver memory")
    parser.add_argument("--ingest-seconds", type=float, help="seconds of load per scenario")
    parser.add_argument("--no-spark", action="store_true")
    parser.add_argument("--no-ingest", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the generated data here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path, *rest = args.child
        if kind == "duckdb":
            result = child_duckdb(Path(path))
        else:
            result = child_spark(Path(path), rest[0] if rest else "8g")
        print(json.dumps(result))
        return

    sizes = (
        sizes_of(args.sizes)
        if args.sizes
        else ([100_000, 300_000, 1_000_000] if args.quick else [1_000_000, 5_000_000, 10_000_000])
    )
    spark_sizes = (
        sizes_of(args.spark_sizes)
        if args.spark_sizes
        else ([] if args.no_spark else sorted(sizes)[:2])
    )
    seconds = args.ingest_seconds or (8.0 if args.quick else 30.0)
    base = args.keep or Path(tempfile.mkdtemp(prefix="kilde-bench-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"kilde bench/scale.py  cores: {os.cpu_count()}  memory: "
        f"{fmt_bytes(psutil.virtual_memory().total)}  load average: "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"rebuild sizes: DuckDB {sizes}, Spark local[*] {spark_sizes}")
    rows: list[dict[str, Any]] = []
    try:
        for size in sorted(set(sizes) | set(spark_sizes)):
            folder = base / f"n{size}"
            t0 = time.perf_counter()
            data, lake = make_shop(size, folder)
            made = time.perf_counter() - t0
            row: dict[str, Any] = {"size": size, "generate_s": made}
            if size in sizes:
                row["duckdb"] = run_child(["duckdb", str(data)])
            if size in spark_sizes:
                row["spark"] = run_child(["spark", str(lake), args.spark_memory])
            rows.append(row)
            print(
                f"  {size:>11,} events: generated in {made:.0f} s; "
                + "; ".join(
                    f"{k} {v['seconds']:.1f} s, {fmt_bytes(v['peak_bytes'])}, "
                    f"{v['profiles']:,} profiles"
                    for k, v in row.items()
                    if isinstance(v, dict)
                ),
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        print()
        print("profile rebuild (identity resolution + profiles + traits), one process each")
        print(
            f"{'events':>12} {'DuckDB s':>9} {'peak':>10} {'ev/s':>9} {'Spark s':>9} "
            f"{'peak':>10} {'ev/s':>9} {'Spark/DuckDB':>13}"
        )
        for row in rows:
            d, s = row.get("duckdb"), row.get("spark")
            cells = [f"{row['size']:>12,}"]
            for part in (d, s):
                if part:
                    cells += [
                        f"{part['seconds']:>9.1f}",
                        f"{fmt_bytes(part['peak_bytes']):>10}",
                        f"{row['size'] / part['seconds']:>9,.0f}",
                    ]
                else:
                    cells += [f"{'-':>9}", f"{'-':>10}", f"{'-':>9}"]
            ratio = f"{s['seconds'] / d['seconds']:.2f}x" if d and s else "-"
            cells.append(f"{ratio:>13}")
            print(" ".join(cells))
        for name in ("duckdb", "spark"):
            points = [(r["size"], r[name]["seconds"]) for r in rows if name in r]
            mems = [(r["size"], float(r[name]["peak_bytes"])) for r in rows if name in r]
            if len(points) > 1:
                first = points[0]
                print(
                    f"growth {name}: time exponent between sizes {growth(points)[1:]}, "
                    f"memory exponent {growth(mems)[1:]}; "
                    f"{points[-1][0] // first[0]}x the events took "
                    f"{points[-1][1] / first[1]:.1f}x the time (baseline: {first[0]:,})"
                )
        for name in ("duckdb", "spark"):
            last = next((r for r in reversed(rows) if name in r), None)
            if last is not None:
                t = last[name].get("timings", {})
                parts = ("extract", "prepare", "components", "greedy", "assign", "profiles")
                print(
                    f"where the time goes, {name} at {last['size']:,}: "
                    + ", ".join(f"{k} {t[k]:.1f} s" for k in parts if k in t)
                )
        sessions = [r["spark"]["session_seconds"] for r in rows if "spark" in r]
        if sessions:
            print(
                f"Spark session start (not in the times above): {min(sessions):.1f}-"
                f"{max(sessions):.1f} s"
            )
        if not args.no_ingest:
            print()
            print(f"ingest: collectors on one lake, {seconds:.0f} s of batched load each")
            one = ingest(1, seconds, 4, base)
            two = ingest(2, seconds, 4, base)
            for result in (one, two):
                print(
                    f"  {result['collectors']} collector(s): {result['events_per_s']:>9,.0f} "
                    f"events/s ({result['events']:,} acknowledged, {result['failed']} failed, "
                    f"{result['files']:,} files); collector CPU "
                    f"{result['collector_cpu_s'] / result['events'] * 1e6:.0f} µs per event"
                )
            per_event = [r["collector_cpu_s"] / r["events"] for r in (one, two)]
            print(
                f"  two collectors / one (baseline): "
                f"{two['events_per_s'] / one['events_per_s']:.2f}x; CPU per event, two / one: "
                f"{per_event[1] / per_event[0]:.2f}x"
                f" (1.00x: collectors add capacity in proportion to the cores they get; this "
                f"machine has {os.cpu_count()} cores, shared with the load processes)"
            )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
