"""Identity resolution benchmark: full rebuild, networkx beside it, and freshness under load.

    python bench/identity.py                # scale 1.0: 10M events, 1M people, ~3M identifiers
    python bench/identity.py --scale 0.1    # 1M events, 100k people

1. Generates the events of `1,000,000 x scale` people (10 each; people with one to three
   devices, 70% signed up, emails, phones, family laptops, kiosks) straight into a store
   through the Writer (SQL generation; the HTTP path is measured by bench/ingest.py).
2. Full rebuild (`IdentityEngine.rebuild`: identifier extraction, stitching, profiles) in its
   own process: wall time and peak memory (ru_maxrss, which includes DuckDB's memory).
3. networkx on the same links in its own process: graph build + connected components, peak
   memory; the ratio to Kilde's component stage and to the whole rebuild.
4. Freshness: a real `kilde serve` on that store, a paced load of 5,000 events/s, and two
   kinds of probe, one after the other under that load (p50/p95/max of each):
   - links, for `--seconds`: identify calls that link a new device to a known user; latency
     from the identify's 2xx to the profile lookup showing the link;
   - computed traits, for `--traits-seconds` more: a page view from a known device; latency
     from its 2xx to the profile's event count (in the lookup) showing it.
   The target is about the steady state, so the probes of the first `--warmup` seconds are
   reported apart: then the server has just started (cold caches) and the load's first pass
   brings a thousand new people at once.
Every figure is printed with its baseline from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import WEB_KEY, Connection, Stamper, basic_auth, event_pool, percentile

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
ADMIN = "kat_bench-identity-0123456789abcdef"
LOAD_CONNECTIONS = 4  # the freshness load's connections

GENERATE = """
INSERT INTO events BY NAME
WITH people AS (
    SELECT p,
        1 + (hash(p, 'd1') % 100 < 40)::INT + (hash(p, 'd2') % 100 < 10)::INT AS devices,
        hash(p, 'u') % 100 < 70 AS has_user,
        hash(p, 'e') % 100 < 40 AS has_email,
        hash(p, 'ph') % 100 < 12 AS has_phone,
        p > 0 AND hash(p, 'f') % 1000 < 3 AS family,
        hash(p, 'k') % 1000 < 2 AS kiosk
    FROM range(?) t(p)
), ev AS (
    SELECT i, i % ? AS p, i // ? AS j FROM range(?) t(i)
), shaped AS (
    SELECT ev.*, people.* EXCLUDE (p),
        CASE
            WHEN people.has_user AND ev.j < people.devices THEN 'identify'
            WHEN NOT people.has_user AND people.has_email AND ev.j = 0 THEN 'identify'
            WHEN people.has_user AND hash(ev.i, 'o') % 100 < 8 THEN 'order'
            WHEN hash(ev.i, 'pg') % 2 = 0 THEN 'page'
            ELSE 'view'
        END AS kind,
        CASE
            WHEN people.family AND ev.j = 0 THEN 'anon-' || (ev.p - 1) || '-0'
            WHEN people.kiosk AND ev.j = 1 THEN 'kiosk-' || (hash(ev.p, 'kk') % 50)
            ELSE 'anon-' || ev.p || '-' || (ev.j % people.devices)
        END AS anon
    FROM ev JOIN people USING (p)
)
SELECT
    'b-' || i AS message_id,
    CASE WHEN kind = 'order' THEN 'backend' ELSE 'web' END AS source,
    CASE WHEN kind IN ('order', 'view') THEN 'track' ELSE kind END AS type,
    CASE kind WHEN 'order' THEN 'Order Completed' WHEN 'view' THEN 'Product Viewed' END AS event,
    CASE
        WHEN kind IN ('identify', 'order') AND has_user THEN 'user-' || p
        WHEN has_user AND j >= devices AND hash(i, 'known') % 2 = 0 THEN 'user-' || p
    END AS user_id,
    CASE WHEN kind <> 'order' THEN anon END AS anonymous_id,
    TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(j * 500000 + hash(i, 't') % 400000)
        AS timestamp,
    TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(j * 500000 + hash(i, 't') % 400000)
        AS received_at,
    CASE kind
        WHEN 'order' THEN '{"order_id": "o' || i || '", "revenue": ' || (hash(i, 'r') % 5000)
            || '.0, "currency": "NOK"}'
        WHEN 'view' THEN '{"product_id": "p-' || (hash(i, 'c') % 14) || '", "category": "'
            || ['tents', 'jackets', 'boots', 'packs', 'sleeping'][(1 + hash(i, 'c') % 5)::BIGINT]
            || '"}'
        ELSE '{}'
    END AS properties,
    CASE WHEN kind = 'identify' THEN
        '{' || concat_ws(', ',
            CASE WHEN has_email AND j = 0 THEN '"email": "person' || p || '@example.com"' END,
            CASE WHEN has_phone AND j = 0
                THEN '"phone": "+47 4' || lpad((p % 10000000)::VARCHAR, 7, '0') || '"' END,
            '"first_name": "P' || p || '"'
        ) || '}'
    END AS traits,
    '{}' AS context,
    'ok' AS plan_status
FROM shaped
"""


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_generate(data: Path, scale: float) -> dict[str, Any]:
    from kilde.store import Store, Writer
    from kilde.store.writer import WriteBatch

    people = max(1000, int(1_000_000 * scale))
    events = people * 10
    store = Store(data)
    writer = Writer(store)
    started = time.perf_counter()
    writer.write_sync(WriteBatch(statements=[(GENERATE, [people, people, people, events])]))
    seconds = time.perf_counter() - started
    counts = store.query(
        "SELECT count(*) AS events, count(DISTINCT anonymous_id) AS anonymous_ids, "
        "count(DISTINCT user_id) AS user_ids FROM events"
    )[0]
    writer.close()
    store.close()
    return {"people": people, **counts, "seconds": seconds}


def phase_rebuild(data: Path, memory_limit: str) -> dict[str, Any]:
    from kilde.identity.engine import IdentityEngine
    from kilde.plan import load_plan
    from kilde.store import Store, Writer

    plan = load_plan(PLAN)
    store = Store(data)
    # DuckDB spills to disk beyond this; the default is 80% of the machine's memory.
    store.cursor().execute(f"SET memory_limit = '{memory_limit}'")
    writer = Writer(store)
    engine = IdentityEngine(store, writer, lambda: plan, data)
    started = time.perf_counter()
    report = engine.rebuild()
    seconds = time.perf_counter() - started
    counts = store.query(
        "SELECT (SELECT count(*) FROM identity_map) AS identifiers, "
        "(SELECT count(*) FROM profiles) AS profiles, "
        "(SELECT count(*) FROM identity_conflicts) AS conflicts, "
        "(SELECT count(*) FROM identity_map WHERE shared) AS shared"
    )[0]
    engine.stop()
    writer.close()
    store.close()
    return {
        "seconds": seconds,
        "timings": report.timings,
        "rounds": report.rounds,
        "dirty_closures": report.dirty_closures,
        **counts,
        "peak_rss_mb": rss_mb(),
    }


def phase_networkx(data: Path) -> dict[str, Any]:
    import duckdb
    import networkx as nx

    con = duckdb.connect(str(data / "kilde.duckdb"), read_only=True)
    # The same links Kilde uses: identifiers of one record, each linked to the record's first
    # (shared identifiers excluded, as Kilde excludes them).
    edges = con.execute(
        "WITH o AS (SELECT o.source, o.message_id, o.id_type || ':' || o.id_value AS node "
        "FROM identity_observations o ANTI JOIN identity_map m "
        "ON m.id_type = o.id_type AND m.id_value = o.id_value AND m.shared "
        "WHERE o.role = 'self'), "
        "f AS (SELECT source, message_id, min(node) AS first FROM o GROUP BY ALL) "
        "SELECT DISTINCT o.node, f.first FROM o JOIN f USING (source, message_id)"
    ).fetchall()
    con.close()
    loaded = rss_mb()
    started = time.perf_counter()
    graph = nx.Graph()
    graph.add_edges_from(edges)
    components = sum(1 for _ in nx.connected_components(graph))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "components": components,
        "nodes": graph.number_of_nodes(),
        "links": len(edges),
        "peak_rss_mb": rss_mb(),
        "rss_before_graph_mb": loaded,
    }


@dataclass
class Probes:
    """The latencies of one kind of probe, and how many never saw their change."""

    seconds: list[float] = field(default_factory=list)
    missed: int = 0

    def note(self, seconds: float | None) -> None:
        if seconds is None:
            self.missed += 1
        else:
            self.seconds.append(seconds)

    def figures(self, prefix: str) -> dict[str, Any]:
        found = self.seconds
        return {
            f"{prefix}probes": len(found),
            f"{prefix}missed": self.missed,
            f"{prefix}p50_s": percentile(found, 50),
            f"{prefix}p95_s": percentile(found, 95),
            f"{prefix}max_s": max(found) if found else float("nan"),
        }


async def _seconds_until(
    check: Callable[[], Awaitable[bool]], since: float, every: float
) -> float | None:
    """Seconds from `since` until `check()` holds, asked every `every` seconds; None after 30."""
    while True:
        if await check():
            return time.perf_counter() - since
        if time.perf_counter() - since > 30:
            return None
        await asyncio.sleep(every)


async def _latency(
    url: str,
    rate: int,
    seconds: float,
    warmup: float,
    traits_seconds: float,
    users: list[str],
    devices: list[str],
) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    pool = event_pool(11)
    stamper = Stamper(pool, f"lat-{uuid.uuid4().hex[:6]}")
    # Several connections, each paced at its share: one connection waits for each durable ack
    # before its next request, which capped the load below the asked rate on a large store.
    conns = [Connection(host, int(port), basic_auth(WEB_KEY)) for _ in range(LOAD_CONNECTIONS)]
    for conn in conns:
        await conn.open()
    sent = 0
    statuses: dict[int, int] = {}
    # links are probed for `seconds`, then computed traits for `traits_seconds`, one after the
    # other under the same load: each probe's polling would slow the other's answers
    links_deadline = time.perf_counter() + seconds
    deadline = links_deadline + traits_seconds
    per_tick = max(1, rate // 50)
    share = rate / len(conns)

    async def load(conn: Connection) -> None:
        nonlocal sent
        next_at = time.perf_counter()
        while time.perf_counter() < deadline:
            status, _ = await conn.post("/v1/batch", stamper.batch_body(per_tick))
            statuses[status] = statuses.get(status, 0) + 1
            sent += per_tick
            next_at += per_tick / share
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    links = Probes()
    warming = Probes()  # link probes sent during the warm-up
    started = time.perf_counter()

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            await asyncio.sleep(2.0)
            index = 0
            while time.perf_counter() < links_deadline - 5:
                user = users[index % len(users)]
                index += 1
                device = f"probe-{uuid.uuid4().hex}"
                answer = await client.post(
                    "/v1/identify",
                    json={"userId": user, "anonymousId": device},
                    auth=(WEB_KEY, ""),
                )
                acked = time.perf_counter()
                found_in = warming if acked - started < warmup else links
                assert answer.status_code == 200, answer.text

                async def linked(device: str = device, user: str = user) -> bool:
                    found = await client.post(
                        "/api/profiles/lookup", json={"anonymous_id": device}, headers=admin
                    )
                    profiles = found.json()["profiles"]
                    if not profiles:
                        return False
                    mine = await client.post(
                        "/api/profiles/lookup", json={"user_id": user}, headers=admin
                    )
                    home = mine.json()["profiles"][0]["profile_id"]
                    return bool(home == profiles[0]["profile_id"])

                found_in.note(await _seconds_until(linked, acked, every=0.02))
                await asyncio.sleep(0.3)

    counted = Probes()  # page view 2xx -> the profile's event count shows it

    async def probe_counts() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            await asyncio.sleep(max(0.0, links_deadline - time.perf_counter()))
            index = 0
            while time.perf_counter() < deadline - 5:
                device = devices[index % len(devices)]
                index += 1
                lookup = {"anonymous_id": device}
                found = await client.post("/api/profiles/lookup", json=lookup, headers=admin)
                before = found.json()["profiles"][0]["events"]
                answer = await client.post(
                    "/v1/page",
                    json={"anonymousId": device, "name": "Home", "properties": {"path": "/"}},
                    auth=(WEB_KEY, ""),
                )
                acked = time.perf_counter()
                assert answer.status_code == 200, answer.text

                async def counted_in(lookup: dict[str, str] = lookup, before: int = before) -> bool:
                    now = await client.post("/api/profiles/lookup", json=lookup, headers=admin)
                    return bool(now.json()["profiles"][0]["events"] > before)

                counted.note(await _seconds_until(counted_in, acked, every=0.05))
                await asyncio.sleep(0.3)

    await asyncio.gather(*(load(conn) for conn in conns), probe(), probe_counts())
    wall = time.perf_counter() - started
    warm = warming.figures("warmup_")
    for conn in conns:
        conn.close()
    return {
        "events_sent": sent,
        "achieved_rate": sent / wall,
        "statuses": statuses,
        **links.figures(""),
        "missed": links.missed + warming.missed,
        **{k: warm[k] for k in ("warmup_probes", "warmup_p50_s", "warmup_max_s")},
        **counted.figures("counted_"),
    }


def phase_latency(
    data: Path, rate: int, seconds: float, warmup: float, traits_seconds: float
) -> dict[str, Any]:
    import duckdb

    con = duckdb.connect(str(data / "kilde.duckdb"), read_only=True)
    users = [
        r[0]
        for r in con.execute(
            "SELECT id_value FROM identity_map WHERE id_type = 'user_id' ORDER BY id_value "
            "LIMIT 200"
        ).fetchall()
    ]
    # devices of known people, for the computed-traits probe
    devices = [
        r[0]
        for r in con.execute(
            "SELECT id_value FROM identity_map WHERE id_type = 'anonymous_id' AND NOT shared "
            "ORDER BY id_value LIMIT 200"
        ).fetchall()
    ]
    con.close()
    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "KILDE_DATA": str(data),
        "KILDE_PLAN": str(PLAN),
        "KILDE_ADMIN_TOKEN": ADMIN,
        "KILDE_PORT": str(port),
    }
    log = open(data.parent / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "kilde.cli", "serve"], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        return asyncio.run(_latency(url, rate, seconds, warmup, traits_seconds, users, devices))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _child(phase: str, data: Path, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--data", str(data), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 10M events, 1M people")
    parser.add_argument("--rate", type=int, default=5000, help="load in events per second")
    parser.add_argument("--seconds", type=float, default=70, help="length of the load")
    parser.add_argument(
        "--warmup", type=float, default=10, help="seconds of load whose probes are kept apart"
    )
    parser.add_argument(
        "--traits-seconds",
        type=float,
        default=45,
        help="seconds of load after the link probes, for the computed-traits probe",
    )
    parser.add_argument("--memory-limit", default="3GB", help="DuckDB memory limit")
    parser.add_argument("--skip-networkx", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phases = {
            "generate": lambda: phase_generate(args.data, args.scale),
            "rebuild": lambda: phase_rebuild(args.data, args.memory_limit),
            "networkx": lambda: phase_networkx(args.data),
            "latency": lambda: phase_latency(
                args.data, args.rate, args.seconds, args.warmup, args.traits_seconds
            ),
        }
        print(json.dumps(phases[args.phase](), default=str))
        return

    base = Path(tempfile.mkdtemp(prefix="kilde-bench-identity-"))
    data = base / "data"
    try:
        print(f"scale {args.scale}: machine {os.cpu_count()} cores", flush=True)
        gen = _child("generate", data, "--scale", str(args.scale))
        print(
            f"generated {gen['events']:,} events of {gen['people']:,} people "
            f"({gen['anonymous_ids']:,} anonymous ids, {gen['user_ids']:,} user ids) "
            f"in {gen['seconds']:.1f} s",
            flush=True,
        )
        rebuild = _child("rebuild", data, "--memory-limit", args.memory_limit)
        t = rebuild["timings"]
        graph_s = t["components"]
        print(
            f"full rebuild: {rebuild['seconds']:.1f} s, "
            f"peak memory {rebuild['peak_rss_mb']:,.0f} MB -> "
            f"{rebuild['identifiers']:,} identifiers, {rebuild['profiles']:,} profiles, "
            f"{rebuild['conflicts']:,} refused merges, {rebuild['shared']:,} shared identifiers",
            flush=True,
        )
        python_records = int(t.pop("extract_python_records", 0))
        print(
            "  stages: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
            + f"; components took {rebuild['rounds']} rounds; {python_records:,} records "
            "needed the Python normaliser (identify, alias, rich context)",
            flush=True,
        )
        if not args.skip_networkx:
            nxr = _child("networkx", data)
            print(
                f"networkx (baseline, same links): {nxr['seconds']:.1f} s for "
                f"{nxr['nodes']:,} nodes / {nxr['links']:,} links -> {nxr['components']:,} "
                f"components, peak memory {nxr['peak_rss_mb']:,.0f} MB",
                flush=True,
            )
            print(
                f"  ratio: Kilde's connected components {graph_s:.1f} s are "
                f"{nxr['seconds'] / graph_s:.1f}x faster than networkx; the whole rebuild "
                "(extraction, stitching, profiles) takes "
                f"{rebuild['seconds'] / nxr['seconds']:.2f}x networkx's time; peak memory "
                f"{rebuild['peak_rss_mb'] / nxr['peak_rss_mb']:.2f}x networkx's",
                flush=True,
            )
        if not args.skip_latency:
            lat = _child(
                "latency",
                data,
                *("--rate", str(args.rate), "--seconds", str(args.seconds)),
                *("--traits-seconds", str(args.traits_seconds)),
                *("--warmup", str(args.warmup)),
            )
            print(
                f"freshness under {lat['achieved_rate']:,.0f} events/s (asked {args.rate:,}), "
                f"after a {args.warmup:.0f} s warm-up: "
                f"identify 2xx -> profile shows the link: p50 {lat['p50_s'] * 1000:,.0f} ms, "
                f"p95 {lat['p95_s'] * 1000:,.0f} ms, max {lat['max_s'] * 1000:,.0f} ms over "
                f"{lat['probes']} probes ({lat['missed']} missed); target p95 < 1000 ms "
                f"(ratio {lat['p95_s']:.2f}x the target); statuses {lat['statuses']}",
                flush=True,
            )
            print(
                f"  computed traits: page view 2xx -> the profile's event count shows it: "
                f"p50 {lat['counted_p50_s'] * 1000:,.0f} ms, "
                f"p95 {lat['counted_p95_s'] * 1000:,.0f} ms, "
                f"max {lat['counted_max_s'] * 1000:,.0f} ms over {lat['counted_probes']} probes "
                f"({lat['counted_missed']} missed), in the {args.traits_seconds:.0f} s after the "
                "link probes; "
                f"target p95 < 1000 ms (ratio {lat['counted_p95_s']:.2f}x the target)",
                flush=True,
            )
            print(
                f"  warm-up (first {args.warmup:.0f} s after the server started, not in the "
                f"figures above): p50 {lat['warmup_p50_s'] * 1000:,.0f} ms, max "
                f"{lat['warmup_max_s'] * 1000:,.0f} ms over {lat['warmup_probes']} probes",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"data kept in {data}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
