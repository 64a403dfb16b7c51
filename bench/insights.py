"""Insights benchmark: segments, RFM and CLV, a funnel and retention at a million profiles.

    .venv/bin/python bench/insights.py [--scale 1.0] [--keep DIR]

At scale 1.0: 1,000,000 profiles and 10,000,000 events in a Kilde store (the schema of the
migrations). The events, identity records and the identity map are generated with DuckDB; the
profiles table is their aggregate (the identity engine's own cost is bench/identity.py's
business). Then, through the same functions the server uses:

- five typical segment rules (count of members);
- RFM, CLV (BG/NBD + Gamma-Gamma fitted on a fixed sample of at most 50,000 buyers, every buyer
  scored), churn and preferences for all profiles (the `profile_insights` table), and RFM and
  CLV alone;
- a 4-step funnel and a 12-week retention table;

each with its time (wall and CPU) and the ratio to the baseline measured in the same run: one
scan of the events table (`count(*)` of the orders), the least any of these can cost. Beside it,
the join of every event to its profile (through identity_records and identity_map), which the
profile insights do once per pass: the least a pass over all profiles' events can cost. Peak
memory is the process's peak resident set (DuckDB included). Finally the CLV fit on CDNOW beside the
`lifetimes` package's fit of the same data (time ratio and parameters), or beside the published
parameters only when lifetimes is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kilde.insights import funnels, retention
from kilde.insights.clv import (
    CDNOW_CALIBRATION_END,
    PUBLISHED_BGNBD,
    PUBLISHED_GAMMA_GAMMA,
    fit_bgnbd,
    fit_gamma_gamma,
    purchase_summary,
    read_cdnow_sample,
    score_profiles,
    summarise,
)
from kilde.insights.data import backend_of, profile_events
from kilde.insights.rfm import rfm_scores
from kilde.insights.scores import compute
from kilde.insights.segments.compiler import Context, members
from kilde.plan import load_plan
from kilde.store.database import Store

ROOT = Path(__file__).resolve().parent.parent
DEMO_PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
CDNOW = ROOT.parent / "shared" / "data" / "cdnow"
CATEGORIES = ["tents", "jackets", "boots", "packs", "sleeping"]

RULES: dict[str, dict[str, Any]] = {
    "repeat buyers (computed traits)": {
        "all": [{"computed": "orders", "gte": 2}, {"computed": "total_revenue", "gte": 1000}]
    },
    "2+ orders over 500 in 30 days": {
        "event": "Order Completed",
        "where": [{"property": "revenue", "gt": 500}],
        "count": {"gte": 2},
        "within": "30 days",
    },
    "viewed tents, never bought one": {
        "all": [
            {
                "event": "Product Viewed",
                "where": [{"property": "category", "equals": "tents"}],
                "within": "90 days",
            },
            {
                "not": {
                    "event": "Order Completed",
                    "where": [{"property": "products[].category", "equals": "tents"}],
                }
            },
        ]
    },
    "subscribers with no open in 90 days": {
        "all": [
            {"trait": "newsletter", "equals": True},
            {"not": {"event": "Email Opened", "within": "90 days"}},
        ]
    },
    "high-value customers at risk": {
        "all": [
            {"computed": "clv", "gte": 500},
            {
                "any": [
                    {"computed": "rfm_group", "in": ["At risk", "Can't lose them"]},
                    {"computed": "churn_risk", "gte": 0.5},
                ]
            },
        ]
    },
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process (all threads): on a shared machine, wall time alone misleads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(store: Store, profiles: int, events: int) -> None:
    """Events, identity records and map, profiles and traits, straight into the store."""
    con = store.cursor()
    now = datetime.now(UTC)
    cats = "['" + "','".join(CATEGORIES) + "']"
    con.execute("SET preserve_insertion_order = false")
    con.execute(
        f"""
        CREATE TEMP TABLE gen AS
        SELECT n,
               'p_' || CAST(floor({profiles} * pow(random(), 1.6)) AS BIGINT) AS profile_id,
               random() AS kind,
               CAST(floor(random() * 15) AS INTEGER) AS product,
               TIMESTAMPTZ '{now.isoformat()}' - to_microseconds(
                   CAST(random() * 365 * 86400e6 AS BIGINT)) AS ts
        FROM range({events}) t(n)
        """
    )
    con.execute(
        f"""
        INSERT INTO events (message_id, source, type, event, user_id, timestamp, received_at,
                            properties, context, plan_status)
        SELECT 'm' || n,
               CASE WHEN kind < 0.04 THEN 'backend' WHEN kind < 0.09 THEN 'email' ELSE 'web' END,
               CASE WHEN kind >= 0.80 THEN 'page' ELSE 'track' END,
               CASE WHEN kind < 0.04 THEN 'Order Completed'
                    WHEN kind < 0.09 THEN 'Email Opened'
                    WHEN kind < 0.10 THEN 'Signed Up'
                    WHEN kind < 0.15 THEN 'Checkout Started'
                    WHEN kind < 0.30 THEN 'Product Added'
                    WHEN kind < 0.80 THEN 'Product Viewed' END,
               'u' || substr(profile_id, 3), ts, ts,
               CASE WHEN kind < 0.04 THEN
                      '{{"order_id":"o' || n || '","revenue":' || (200 + product * 150)
                      || ',"currency":"NOK","products":[{{"product_id":"p-' || product
                      || '","category":"' || {cats}[product % 5 + 1] || '"}}]}}'
                    WHEN kind < 0.09 THEN
                      '{{"campaign_id":"c' || (product % 3) || '","recipient":"r' || n
                      || '","machine_open":' || CASE WHEN product < 4 THEN 'true' ELSE 'false'
                      END || '}}'
                    WHEN kind < 0.80 AND kind >= 0.15 THEN
                      '{{"product_id":"p-' || product || '","category":"'
                      || {cats}[product % 5 + 1] || '","price":' || (200 + product * 150) || '}}'
                    ELSE '{{}}' END,
               CASE WHEN kind >= 0.80 AND product < 3 THEN
                      '{{"campaign":{{"source":"'
                      || ['google', 'newsletter', 'instagram'][product + 1]
                      || '","medium":"cpc","name":"c' || product || '"}}}}'
                    ELSE '{{}}' END,
               'ok'
        FROM gen
        """
    )
    con.execute(
        """
        INSERT INTO identity_records
            (source, message_id, ts, received_at, kind, primary_type, primary_value, dropped,
             write_seq)
        SELECT source, message_id, timestamp, received_at, type, 'user_id', user_id, NULL,
               write_seq
        FROM events
        """
    )
    con.execute(
        """
        INSERT INTO identity_map
        SELECT 'user_id', 'u' || substr(profile_id, 3), profile_id, profile_id, min(ts), max(ts),
               false
        FROM gen GROUP BY profile_id
        """
    )
    con.execute(
        """
        INSERT INTO profiles
        SELECT m.profile_id, m.closure_id, 'user_id', m.first_seen, m.last_seen, 1, false,
               count(*), count(*) // 5, count(*) FILTER (WHERE e.type = 'page'), 0,
               count(*) FILTER (WHERE e.event = 'Order Completed'),
               coalesce(sum(CAST(json_extract(e.properties, '$.revenue') AS DOUBLE))
                 FILTER (WHERE e.event = 'Order Completed'), 0),
               avg(CAST(json_extract(e.properties, '$.revenue') AS DOUBLE))
                 FILTER (WHERE e.event = 'Order Completed'),
               max(e.timestamp) FILTER (WHERE e.event = 'Order Completed'),
               NULL, ['web'], 0, 0, NULL, NULL, now()
        FROM events e JOIN identity_map m ON m.id_value = e.user_id
        GROUP BY ALL
        """
    )
    con.execute(
        """
        INSERT INTO profile_traits (profile_id, closure_id, name, value, source, tier,
                                    observed_at, message_id, candidates)
        SELECT profile_id, profile_id, 'newsletter',
               CASE WHEN random() < 0.3 THEN 'true' ELSE 'false' END, 'web', 'person', now(),
               'x', 1
        FROM identity_map
        """
    )
    con.execute("CHECKPOINT")
    con.close()


def timed(name: str, fn: Callable[[], Any], results: list[dict[str, Any]]) -> Any:
    started, cpu = time.perf_counter(), cpu_seconds()
    value = fn()
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    results.append(
        {"step": name, "seconds": seconds, "cpu": cpu, "peak_mb": peak_mb(), "result": value}
    )
    print(
        f"  {name:<44} {seconds:8.2f} s  cpu {cpu:7.2f} s   peak {peak_mb():7.0f} MB   {value}",
        flush=True,
    )
    return value


def clv_on_cdnow() -> None:
    print("\nCLV fit on CDNOW (2,357 customers, weeks 1-39)")
    customers, days, values = read_cdnow_sample(CDNOW / "CDNOW_sample.txt")
    s = summarise(customers, days, values, CDNOW_CALIBRATION_END)
    started = time.perf_counter()
    fit = fit_bgnbd(s.x, s.t_x, s.T)
    spend = fit_gamma_gamma(s.x, s.m)
    ours = time.perf_counter() - started
    print(f"  kilde (scipy)      {ours:7.3f} s   {fmt(fit.params())}   {fmt(spend.params())}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from lifetimes import BetaGeoFitter, GammaGammaFitter
    except ImportError:
        print(f"  lifetimes not installed; published: {PUBLISHED_BGNBD} {PUBLISHED_GAMMA_GAMMA}")
        return
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bg = BetaGeoFitter().fit(s.x, s.t_x, s.T)
        repeat = s.x > 0
        gg = GammaGammaFitter().fit(s.x[repeat], s.m[repeat])
    theirs = time.perf_counter() - started
    lt_bg = {k: float(bg.params_[k]) for k in ("r", "alpha", "a", "b")}
    lt_gg = {
        "p": float(gg.params_["p"]),
        "q": float(gg.params_["q"]),
        "gamma": float(gg.params_["v"]),
    }
    print(f"  lifetimes          {theirs:7.3f} s   {fmt(lt_bg)}   {fmt(lt_gg)}")
    print(f"  published                      {fmt(PUBLISHED_BGNBD)}   {fmt(PUBLISHED_GAMMA_GAMMA)}")
    print(f"  time ratio kilde/lifetimes: {ours / theirs:.2f}")
    worst = max(abs(fit.params()[k] / v - 1) for k, v in lt_bg.items())
    print(f"  largest parameter difference to lifetimes: {100 * worst:.3f}%")


def fmt(params: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in params.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 1M profiles, 10M events")
    parser.add_argument("--keep", type=Path, help="Keep the generated store in this directory")
    args = parser.parse_args()
    profiles = int(1_000_000 * args.scale)
    events = int(10_000_000 * args.scale)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kilde-bench-insights-"))
    plan = load_plan(DEMO_PLAN)
    print(f"kilde insights bench: {profiles:,} profiles (at most), {events:,} events, in {work}")
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        store = Store(work)
        if not store.scalar("SELECT count(*) FROM events"):
            started = time.perf_counter()
            generate(store, profiles, events)
            print(f"  generated in {time.perf_counter() - started:.1f} s")
        real_profiles = int(store.scalar("SELECT count(*) FROM profiles"))
        real_events = int(store.scalar("SELECT count(*) FROM events"))
        buyers = int(store.scalar("SELECT count(*) FROM profiles WHERE orders > 0"))
        print(
            f"  store: {real_profiles:,} profiles ({buyers:,} with orders), {real_events:,} events"
        )
        results: list[dict[str, Any]] = []
        backend = backend_of(store)
        # DuckDB's memory limit as the server sets it while it computes insights and reports
        # (Store.analytics_memory), for every step below.
        stack.enter_context(store.analytics_memory())
        now = datetime.now(UTC)

        print("\nbaseline")
        base = timed(
            "scan: count the orders in events",
            lambda: store.scalar("SELECT count(*) FROM events WHERE event = 'Order Completed'"),
            results,
        )
        baseline = results[-1]["seconds"]
        timed(
            "join: every event to its profile (count)",
            lambda: int(backend.to_pyarrow(profile_events(backend).count()).as_py()),
            results,
        )

        print("\nprofile insights")
        timed(
            "RFM for all profiles",
            lambda: backend.to_pyarrow(rfm_scores(backend.table("profiles"), now)).num_rows,
            results,
        )

        def clv_all() -> str:
            # in the order the server's pass uses (the fit's sample depends on it)
            summary = purchase_summary(backend, now).order_by("profile_id").to_pyarrow()
            values = score_profiles(summary)
            return f"{len(values.profile_id):,} buyers, mean clv {np.nanmean(values.clv):.1f}"

        timed("CLV for all profiles (fit + score)", clv_all, results)
        out = work / "insights.parquet"

        def all_insights() -> str:
            compute(backend, now, out)
            store.cursor().execute(
                "DELETE FROM profile_insights; "
                f"INSERT INTO profile_insights BY NAME SELECT * FROM read_parquet('{out}')"
            )
            return f"{store.scalar('SELECT count(*) FROM profile_insights'):,} rows"

        timed("RFM+CLV+churn+preferences (profile_insights)", all_insights, results)

        print("\nsegments (count of members)")
        for name, rule in RULES.items():
            ctx = Context(backend, plan, now)
            timed(
                name, lambda r=rule, c=ctx: int(members(r, c).count().to_pyarrow().as_py()), results
            )

        print("\nreports")
        steps = funnels.parse_steps(
            ["Product Viewed", "Product Added", "Checkout Started", "Order Completed"]
        )
        timed(
            "4-step funnel (7 days, 90 days back)",
            lambda: [
                s["profiles"] for s in funnels.funnel(Context(backend, plan, now), steps)["steps"]
            ],
            results,
        )
        timed(
            "12-week retention table",
            lambda: f"{len(retention.retention(backend, now, 'week', 12)['cohorts'])} cohorts",
            results,
        )

        print(f"\n{'step':<46} {'seconds':>8} {'x scan':>8} {'cpu s':>8}")
        for r in results[1:]:
            print(
                f"{r['step']:<46} {r['seconds']:8.2f} {r['seconds'] / baseline:8.1f}"
                f" {r['cpu']:8.2f}"
            )
        print(f"baseline scan {baseline:.3f} s ({base:,} orders); peak memory {peak_mb():,.0f} MB")
        clv_on_cdnow()


if __name__ == "__main__":
    sys.exit(main())
