"""Privacy benchmark: what the screen at the door costs, and what an erasure costs.

    .venv/bin/python bench/privacy.py [--events 100000] [--suppressed 50000]

1. The door: `Pipeline.prepare` over the same events twice in this run, once with an empty
   suppression list (the baseline: the door does nothing) and once with many people on it
   (every record's identifiers normalised, hashed and looked up). Printed: microseconds per
   event and the ratio to the baseline.
2. An erasure: one person out of a store of the given number of events (deletion in every
   table, the value sweep, and the compaction that rewrites the file), against the baseline of
   what any compaction must cost at least: COPY FROM DATABASE of the same store into a fresh
   file, timed in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kilde.identity.engine import IdentityEngine
from kilde.identity.identifiers import Identifier
from kilde.pipeline import Pipeline
from kilde.pipeline.normalize import Envelope
from kilde.plan import load_plan
from kilde.privacy.erasure import erase
from kilde.privacy.services import Privacy
from kilde.signing import TokenSigner
from kilde.store import Store, Writer

PLAN = Path(__file__).resolve().parent.parent / "src" / "kilde" / "demo" / "kilde.yaml"


def events_for(people: int, total: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(people):
        out.append(
            {
                "type": "identify",
                "messageId": uuid.uuid4().hex,
                "userId": f"u{i}",
                "anonymousId": f"a{i}",
                "traits": {"email": f"person{i}@example.com", "city": "Oslo"},
            }
        )
    i = 0
    while len(out) < total:
        out.append(
            {
                "type": "track",
                "messageId": uuid.uuid4().hex,
                "userId": f"u{i % people}",
                "anonymousId": f"a{i % people}",
                "event": "Product Viewed",
                "properties": {"product_id": f"p{i % 500}", "price": 499.0, "currency": "NOK"},
                "context": {"traits": {"email": f"person{i % people}@example.com"}},
            }
        )
        i += 1
    return out


def time_prepare(pipeline: Pipeline, records: list[dict[str, Any]]) -> float:
    source = pipeline.plan.source("backend")
    assert source is not None
    env = Envelope(received_at=datetime.now(UTC))
    started = time.perf_counter()
    for at in range(0, len(records), 500):
        pipeline.prepare(records[at : at + 500], source, env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--people", type=int, default=2_000)
    parser.add_argument("--suppressed", type=int, default=50_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kilde-bench-privacy-"))
    try:
        plan = load_plan(PLAN)
        store = Store(work / "data")
        writer = Writer(store)
        pipeline = Pipeline(plan, writer)
        records = events_for(args.people, args.events)

        # 1. the door
        time_prepare(pipeline, records[:5000])  # warm caches
        empty = time_prepare(pipeline, records)
        others = [Identifier("email", f"someone{i}@example.net") for i in range(args.suppressed)]
        pipeline.privacy.suppression.add(others)
        listed = time_prepare(pipeline, records)
        pipeline.privacy.suppression.forget(pipeline.privacy.suppression.hashes_of(others))
        n = len(records)
        print(f"door, empty suppression list (baseline): {empty / n * 1e6:.2f} µs/event")
        print(
            f"door, {args.suppressed} people suppressed: {listed / n * 1e6:.2f} µs/event "
            f"(x{listed / empty:.2f} the baseline)"
        )

        # 2. an erasure
        source = plan.source("backend")
        assert source is not None
        env = Envelope(received_at=datetime.now(UTC))
        for at in range(0, len(records), 2000):
            pipeline.ingest_sync(records[at : at + 2000], source, env)
        engine = IdentityEngine(store, writer, lambda: plan, work / "data")
        engine.rebuild()
        size = (work / "data" / "kilde.duckdb").stat().st_size
        con = store.cursor()
        name = con.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        started = time.perf_counter()
        con.execute(f"ATTACH '{work / 'copy.duckdb'}' AS copy")
        con.execute(f'COPY FROM DATABASE "{name}" TO copy')
        con.execute("DETACH copy")
        copy = time.perf_counter() - started
        con.close()
        privacy = Privacy(
            store=store,
            writer=writer,
            screen=pipeline.privacy,
            plan_of=lambda: plan,
            data_dir=work / "data",
            identity=engine,
            signer_of=lambda: TokenSigner([b"k" * 32]),
            pipeline=pipeline,
        )
        started = time.perf_counter()
        report = erase(privacy, {"email": "person7@example.com"})
        erased = time.perf_counter() - started
        engine.stop()
        print(
            f"store: {n} events, {size / 1e6:.1f} MB; COPY FROM DATABASE alone (baseline): "
            f"{copy:.2f} s"
        )
        print(
            f"erasure of one person ({report['rows_removed']} rows, compacted: "
            f"{report['compacted']}): {erased:.2f} s (x{erased / copy:.2f} the baseline)"
        )
        writer.close()
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
