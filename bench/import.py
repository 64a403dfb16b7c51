"""Import benchmark: a generated CSV of order rows through `kilde import`, against dlt.

    .venv/bin/python bench/import.py [--rows 2000000] [--skip-dlt | --skip-dlt-dicts]
                                     [--in-process] [--row-path]

1. Generates a CSV of `--rows` transaction rows (one order per row, one product each) with
   DuckDB, so generating it costs little time.
2. Starts `kilde serve` on a fresh data directory and runs `kilde import transactions FILE`
   against it as a separate process, as a user would. Figures: rows/s (wall clock from start
   to the summary), the peak RSS of the import process and of the server process (sampled every
   50 ms), and the number of events in the store afterwards (which must equal the rows).
   With --in-process no server runs and the CLI serves the admin API itself. The import takes
   the columnar path (docs/imports-performance.md); --row-path measures the row-by-row path.
3. The floor: DuckDB alone inserting the events rows of the same orders from Arrow records,
   with the SELECT the server uses, in a fresh store (no HTTP, checks or deduplication): the
   least the server's part can cost, printed beside the server's CPU.
4. In the same run, loads the same file into DuckDB with dlt (a well-known Python loader), in a
   child process: once yielding rows as dicts (dlt's ordinary path, with its schema inference
   and normalisation), once yielding Arrow tables read by pyarrow's CSV reader (dlt's fast path,
   which skips per-row normalisation, storing the file's columns as they are), and once
   yielding, as Arrow, the events rows Kilde stores for those orders, built by DuckDB with
   Kilde's own SELECT and no checks (like for like: the same data in the end). Each figure is
   printed with its ratio to Kilde's.

Kilde does more per row than either dlt path: mapping with per-row error reporting, the
collection plan's JSON Schema check, deduplication by message id and provenance on every
record, and it writes through the server's single writer (the columnar path does the same
checks set-wise, and hands the rows it is unsure about to the row path). The server's memory
includes the app itself (about 320 MB idle) and DuckDB's buffers, bounded by
KILDE_DUCKDB_MEMORY_LIMIT. The targets of issue 5 are
>= 100,000 rows/s, faster than dlt, < 500 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import httpx
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
DEMO_PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
ADMIN_TOKEN = "kat_bench-admin-token-0123456789abcdef"
TARGET_ROWS_PER_S = 100_000
TARGET_MB = 500


def generate(path: Path, rows: int) -> None:
    """Orders of 5,000 customers over two years, about 130 bytes a row."""
    duckdb.sql(
        f"""
        COPY (
            SELECT
                'o-' || lpad(i::VARCHAR, 9, '0') AS order_id,
                'cust-' || lpad((i % 5000)::VARCHAR, 6, '0') AS customer_id,
                'person' || (i % 5000) || '@example.com' AS email,
                strftime(TIMESTAMP '2024-12-01' + to_seconds(i % 63000000), '%Y-%m-%dT%H:%M:%SZ')
                    AS order_date,
                'FF-' || (i % 97) AS sku,
                'Product ' || (i % 97) AS product_name,
                ['tents', 'jackets', 'boots', 'packs', 'sleeping'][1 + i % 5] AS category,
                round(99 + (i % 4000) * 1.25, 2) AS price,
                1 + i % 3 AS quantity,
                round((99 + (i % 4000) * 1.25) * (1 + i % 3), 2) AS total,
                'NOK' AS currency
            FROM range({rows}) t(i)
        ) TO '{path}' (HEADER, DELIMITER ',')
        """
    )


class PeakRss:
    """Samples the RSS of a process (and its children) until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            process = psutil.Process(self.pid)
            while not self._stop.is_set():
                total = process.memory_info().rss
                for child in process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                self.peak = max(self.peak, total)
                time.sleep(0.05)
        except psutil.Error:
            return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Measured:
    seconds: float
    peak_rss: int
    server_rss: int = 0
    stored: int = 0
    detail: str = ""
    cpu: float = 0.0  # CPU seconds of the loading process (and its children)
    server_cpu: float = 0.0
    server_idle: int = 0  # RSS of the server before the import
    # CPU seconds of the server while the import ran (server_cpu adds its start and its
    # shutdown, whose checkpoint writes what the import left in DuckDB's memory and log)
    server_import_cpu: float = 0.0


def children_cpu() -> float:
    """CPU seconds of the child processes waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def calibration() -> float:
    """Seconds of CPU for a fixed pure-Python loop: how fast this machine is right now."""
    started = time.process_time()
    total = 0
    for number in range(2_000_000):
        total += number
    return time.process_time() - started


def start_server(data: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**env, "KILDE_PORT": str(port)}
    log = (data.parent / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kilde.cli", "serve"], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("kilde serve did not start")


def run_kilde(
    csv_path: Path, work: Path, in_process: bool, identity: bool, row_path: bool = False
) -> Measured:
    data = work / "kilde-data"
    env = {
        **os.environ,
        "KILDE_DATA": str(data),
        "KILDE_PLAN": str(DEMO_PLAN),
        "KILDE_ADMIN_TOKEN": ADMIN_TOKEN,
        # Identity resolution, segments and deliveries update profiles from new events in
        # background threads of the server; paused by default here, so the figures are those of
        # the import itself.
        "KILDE_IDENTITY_BACKGROUND": "1" if identity else "0",
        "KILDE_INSIGHTS_BACKGROUND": "1" if identity else "0",
        "KILDE_DELIVERY_BACKGROUND": "1" if identity else "0",
        "KILDE_IMPORT_COLUMNAR": "0" if row_path else "1",
    }
    server = None
    server_rss = None
    server_idle = 0
    server_cpu_before = 0.0
    if not in_process:
        server, url = start_server(data, env)
        server_idle = psutil.Process(server.pid).memory_info().rss
        server_cpu_before = sum(psutil.Process(server.pid).cpu_times()[:4])
        server_rss = PeakRss(server.pid)
    try:
        started = time.perf_counter()
        cpu_before = children_cpu()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kilde.cli",
                "import",
                "transactions",
                str(csv_path),
                "--source",
                "shop-orders",
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        rss = PeakRss(process.pid)
        out, err = process.communicate()
        seconds = time.perf_counter() - started
        cpu = children_cpu() - cpu_before
        peak = rss.stop()
        server_import_cpu = (
            sum(psutil.Process(server.pid).cpu_times()[:4]) - server_cpu_before
            if server is not None
            else 0.0
        )
        if process.returncode != 0:
            raise SystemExit(f"kilde import failed:\n{err.decode()[-2000:]}")
        summary = orjson.loads(out)
        if server is not None:
            answer = httpx.get(
                f"{url}/api/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
            ).json()
            stored = sum(
                int(row["events"])
                for row in answer["by_source_and_type"]
                if row["source"] == "shop-orders"
            )
        else:
            with duckdb.connect(str(data / "kilde.duckdb"), read_only=True) as con:
                row = con.execute(
                    "SELECT count(*) FROM events WHERE source = 'shop-orders'"
                ).fetchone()
                stored = int(row[0]) if row else 0
    finally:
        before_server = children_cpu()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    server_cpu = children_cpu() - before_server
    server_peak = server_rss.stop() if server_rss is not None else 0
    detail = (
        f"summary: read {summary['rows_read']:,}, stored {summary['stored']:,}, "
        f"rejected {summary['rejected']:,}; read {summary.get('read', 'row by row')}"
    )
    return Measured(
        seconds, peak, server_peak, stored, detail, cpu, server_cpu, server_idle, server_import_cpu
    )


DLT_CHILD = r"""
import csv, sys, time
import dlt
import pyarrow.csv as pacsv

path, target, mode = sys.argv[1], sys.argv[2], sys.argv[3]

@dlt.resource(name="orders", write_disposition="append")
def rows():
    with open(path, newline="") as handle:
        yield from csv.DictReader(handle)

@dlt.resource(name="orders", write_disposition="append")
def tables():
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=16 << 20))
    for batch in reader:
        yield batch

@dlt.resource(name="events", write_disposition="append")
def events():
    # The rows Kilde stores for these orders, built by DuckDB with Kilde's own SELECT (random
    # message ids, no checks), handed to dlt as Arrow batches: the same data in the end.
    from datetime import UTC, datetime
    import duckdb
    from kilde.collect.importers.columnar_ingest import events_select
    info = {"tier": "first_party", "kind": "transactions", "file": "orders.csv"}
    select, params = events_select({**info, "provenance": {}, "run_id": "dlt"}, datetime.now(UTC))
    con = duckdb.connect()
    relation = con.execute(
        f'''
        WITH arrow_events AS (
            SELECT row_number() OVER () + 1 AS line, uuid()::VARCHAR AS message_id, order_id,
                   customer_id AS user_id, NULL::VARCHAR AS anonymous_id, email,
                   strftime(order_date::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.000Z') AS timestamp,
                   total AS revenue, currency, sku AS product_id, sku, product_name AS name,
                   category, price, quantity::BIGINT AS quantity, 'shop-orders' AS source
            FROM read_csv('{path}'))
        {select}
        ''',
        params,
    )
    yield from relation.to_arrow_reader(122_880)

pipeline = dlt.pipeline(
    pipeline_name="bench_" + mode,
    destination=dlt.destinations.duckdb(target),
    dataset_name="bench",
    pipelines_dir=sys.argv[4],
)
started = time.perf_counter()
info = pipeline.run({"dicts": rows, "arrow": tables, "events": events}[mode]())
print(time.perf_counter() - started)
"""


def run_dlt(csv_path: Path, work: Path, mode: str) -> Measured:
    target = work / f"dlt-{mode}.duckdb"
    script = work / "dlt_child.py"
    script.write_text(DLT_CHILD)
    env = {
        **os.environ,
        "RUNTIME__LOG_LEVEL": "WARNING",
        "DLT_DATA_DIR": str(work / "dlt-data"),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }
    started = time.perf_counter()
    cpu_before = children_cpu()
    process = subprocess.Popen(
        [sys.executable, str(script), str(csv_path), str(target), mode, str(work / "dlt-pipes")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    rss = PeakRss(process.pid)
    _, err = process.communicate()
    seconds = time.perf_counter() - started
    cpu = children_cpu() - cpu_before
    peak = rss.stop()
    if process.returncode != 0:
        raise SystemExit(f"dlt ({mode}) failed:\n{err.decode()[-2000:]}")
    table = "bench.events" if mode == "events" else "bench.orders"
    with duckdb.connect(str(target), read_only=True) as con:
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    return Measured(seconds, peak, stored=int(row[0]) if row else 0, cpu=cpu)


def duckdb_floor(csv_path: Path, work: Path) -> Measured:
    """DuckDB alone writing the events rows of the same orders: the server's insert (the
    SELECT `columnar_ingest` hands the writer) from Arrow records like those `kilde import`
    sends, 122,880 a transaction, into a fresh store with Kilde's settings; no HTTP, checks
    or deduplication. The least the server's part of an import can cost."""
    from datetime import UTC, datetime

    from kilde.collect.importers.columnar_ingest import events_select
    from kilde.store.database import Store

    records = duckdb.sql(
        f"""
        SELECT row_number() OVER () + 1 AS line, uuid()::VARCHAR AS message_id, order_id,
               customer_id AS user_id, NULL::VARCHAR AS anonymous_id, email,
               strftime(order_date::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.000Z') AS timestamp,
               total AS revenue, currency, sku AS product_id, sku, product_name AS name,
               category, price, quantity::BIGINT AS quantity, 'shop-orders' AS source
        FROM read_csv('{csv_path}')
        """
    ).to_arrow_table()
    store = Store(work / "floor-data")
    info = {"tier": "first_party", "kind": "transactions", "file": csv_path.name}
    select, params = events_select({**info, "provenance": {}, "run_id": "floor"}, datetime.now(UTC))
    con = store.cursor()
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, records.num_rows, 122_880):
        arrow_events = records.slice(start, 122_880).combine_chunks()  # noqa: F841 - by DuckDB
        con.execute(f"INSERT INTO events BY NAME SELECT *, 1 AS write_seq FROM ({select})", params)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    stored = int(store.scalar("SELECT count(*) FROM events"))
    con.close()
    store.close()
    return Measured(seconds, 0, stored=stored, cpu=cpu)


def mb(size: int) -> str:
    return f"{size / (1 << 20):,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument(
        "--skip-dlt-dicts",
        action="store_true",
        help="dlt's Arrow path only (its dict path is slow)",
    )
    parser.add_argument("--in-process", action="store_true", help="no server: CLI in-process")
    parser.add_argument("--row-path", action="store_true", help="the row-by-row import path")
    parser.add_argument(
        "--identity",
        action="store_true",
        help="keep identity resolution, segments and deliveries running in the server",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kilde-bench-import-"))
    try:
        csv_path = work / "orders.csv"
        started = time.perf_counter()
        generate(csv_path, args.rows)
        size = csv_path.stat().st_size
        print(
            f"generated {args.rows:,} order rows, {mb(size)}, in "
            f"{time.perf_counter() - started:.1f} s ({os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f})"
        )
        print(f"calibration loop: {calibration():.2f} s of CPU (about 0.08 s on an idle core)")
        kilde = run_kilde(csv_path, work, args.in_process, args.identity, args.row_path)
        k_rate = args.rows / kilde.seconds
        # Client and server run in parallel, each on a core of its own when the machine is idle:
        # the busier one bounds the rate.
        k_cpu_rate = args.rows / max(kilde.cpu, kilde.server_cpu)
        where = "in-process" if args.in_process else "through kilde serve"
        where += ", background engines " + ("running" if args.identity else "paused")
        print(
            f"kilde import ({where}): {kilde.seconds:.1f} s, {k_rate:,.0f} rows/s, peak RSS "
            f"import process {mb(kilde.peak_rss)}"
            + (
                f", server {mb(kilde.server_rss)} (idle before the import {mb(kilde.server_idle)})"
                if kilde.server_rss
                else ""
            )
            + f"; events in the store {kilde.stored:,}; {kilde.detail}"
        )
        print(
            f"  CPU: import process {kilde.cpu:.1f} s ({kilde.cpu / args.rows * 1e6:.1f} us/row)"
            + (
                f", server {kilde.server_cpu:.1f} s ({kilde.server_cpu / args.rows * 1e6:.1f} "
                f"us/row; {kilde.server_import_cpu:.1f} s while the import ran)"
                if kilde.server_cpu
                else ""
            )
            + f"; rows per second of the busier process's CPU: {k_cpu_rate:,.0f}"
        )
        print(
            f"  ratio to the target of {TARGET_ROWS_PER_S:,} rows/s: wall "
            f"{k_rate / TARGET_ROWS_PER_S:.2f}, CPU-bound {k_cpu_rate / TARGET_ROWS_PER_S:.2f}; "
            f"memory target {TARGET_MB} MB per process: "
            f"{'met' if max(kilde.peak_rss, kilde.server_rss) < TARGET_MB << 20 else 'missed'}"
        )
        if kilde.stored != args.rows:
            print(f"  WARNING: {kilde.stored:,} events stored for {args.rows:,} rows")
        floor = duckdb_floor(csv_path, work)
        share = kilde.server_import_cpu / floor.cpu
        print(
            f"floor, DuckDB alone inserting the same events rows from Arrow: "
            f"{floor.seconds:.1f} s, {args.rows / floor.seconds:,.0f} rows/s, "
            f"CPU {floor.cpu:.1f} s; the server's CPU while the import ran: {share:.2f} times this"
        )
        if not args.skip_dlt:
            modes = ("arrow", "events") + (() if args.skip_dlt_dicts else ("dicts",))
            for mode in modes:
                dlt = run_dlt(csv_path, work, mode)
                rate = args.rows / dlt.seconds
                cpu_rate = args.rows / dlt.cpu
                print(
                    f"dlt {mode:>6} -> duckdb: {dlt.seconds:.1f} s, {rate:,.0f} rows/s, CPU "
                    f"{dlt.cpu:.1f} s ({cpu_rate:,.0f} rows per CPU second), peak RSS "
                    f"{mb(dlt.peak_rss)}, rows loaded {dlt.stored:,}"
                )
                print(
                    f"  kilde/dlt-{mode} ratio: wall {k_rate / rate:.2f}, CPU-bound "
                    f"{k_cpu_rate / cpu_rate:.2f}; the floor's CPU is {floor.cpu / dlt.cpu:.2f} "
                    f"times dlt's whole run"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
