"""The same shop on DuckDB and on Spark: identical identities, profiles, scores and segments.

One scenario, collected by a real server: the identity cases (a kiosk, a family laptop, aliases
to the wrong person and in circles, traits from several tiers, an unmerge) and the demo shop at
small scale. Then, with the server stopped, the store is exported to a lake (`kilde lake
export`), `kilde compute --store duckdb:DATA` runs the server's engines on the store and
`kilde compute --store spark:local[2]` runs the same functions on Spark over the lake, both as
of the same moment. Every table they produce must match row for row.

Spark runs in local mode in this process (one session for the whole test run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from kilde.cli import app as kilde_app
from kilde.store.backends import StateTables, conform, spark_session, table_schema
from tests.conftest import DEMO_PLAN, WEB_KEY, Server, start_server
from tests.test_identity import lookup, send, uid, until

pytestmark = pytest.mark.spark


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    session = spark_session("local[2]", conf={"spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()


@dataclass
class Shop:
    data: Path
    lake: Path
    now: datetime
    duckdb_report: dict[str, Any]
    spark_report: dict[str, Any]
    people: dict[str, str]

    def store(self, table: str, drop: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
        con = duckdb.connect(str(self.data / "kilde.duckdb"), read_only=True)
        try:
            raw = con.sql(f'SELECT * FROM "{table}"').to_arrow_table()
        finally:
            con.close()
        return rows(conform(raw, table_schema(table)), drop)

    def state(self, table: str, drop: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
        return rows(StateTables(self.lake / "state").read(table), drop)


def _value(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.10g}")  # the same arithmetic, summed in another order
    if isinstance(value, list):
        return tuple(_value(v) for v in value)
    return value


def rows(table: pa.Table, drop: tuple[str, ...]) -> list[tuple[Any, ...]]:
    names = [n for n in table.column_names if n not in drop]
    out = [tuple(_value(r[n]) for n in names) for r in table.select(names).to_pylist()]
    return sorted(out, key=repr)


def kilde(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kilde.cli", *args],
        env={**os.environ, "KILDE_PLAN": str(DEMO_PLAN)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def identity_cases(server: Server) -> dict[str, str]:
    """The identity scenarios of tests/test_identity.py, in one shop."""
    kiosk = uid("kiosk")
    for user in [uid("user") for _ in range(4)]:
        send(
            server,
            WEB_KEY,
            {"type": "page", "anonymousId": kiosk, "name": "Home"},
            {"type": "identify", "anonymousId": kiosk, "userId": user},
        )
    laptop, mum, son = uid("laptop"), uid("mum"), uid("son")
    send(
        server,
        WEB_KEY,
        {"type": "identify", "anonymousId": laptop, "userId": mum},
        {"type": "identify", "anonymousId": laptop, "userId": son},
    )
    anon, old, new, ann, bob, bob_anon = (uid(p) for p in ("a", "o", "n", "ann", "bob", "ba"))
    send(
        server,
        WEB_KEY,
        {"type": "page", "anonymousId": anon},
        {"type": "alias", "previousId": anon, "userId": old},
        {"type": "alias", "previousId": old, "userId": old},
        {"type": "identify", "anonymousId": bob_anon, "userId": bob},
        {
            "type": "identify",
            "userId": ann,
            "traits": {"name": "Ann", "city": "Bergen"},
            "timestamp": "2026-03-01T10:00:00Z",
        },
        {"type": "alias", "previousId": bob_anon, "userId": ann},
        {"type": "identify", "userId": new},
        {"type": "alias", "previousId": new, "userId": old},
        {"type": "alias", "previousId": old, "userId": new},
        {
            "type": "identify",
            "userId": ann,
            "traits": {"city": "Oslo", "job_title": "Editor"},
            "timestamp": "2026-03-02T10:00:00Z",
        },
    )
    email = f"{uid('family')}@example.com"
    dad, daughter = uid("dad"), uid("daughter")
    send(
        server,
        WEB_KEY,
        {"type": "identify", "anonymousId": dad, "traits": {"email": email}},
        {"type": "page", "anonymousId": dad, "name": "Home"},
        {"type": "identify", "anonymousId": daughter, "traits": {"email": email}},
        {"type": "page", "anonymousId": daughter, "name": "Home"},
    )

    def merged() -> str | None:
        found = lookup(server, anonymous_id=daughter)
        return found[0]["profile_id"] if found and found[0]["identifiers"] == 4 else None

    profile_id = until(merged, "the family merge")
    server.kilde("profile", "unmerge", profile_id, f"anonymous_id:{daughter}", "--reason", "two")
    return {"kiosk": kiosk, "laptop": laptop, "son": son, "ann": ann, "daughter": daughter}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, spark: Any) -> Shop:
    base = tmp_path_factory.mktemp("spark-shop")
    data = base / "data"
    server = start_server(data)
    try:
        people = identity_cases(server)
        server.kilde("demo", "--customers", "40", "--days", "60", "--seed", "11")
    finally:
        server.stop()
    lake = base / "lake"
    now = datetime.now(UTC).replace(microsecond=0)
    kilde("lake", "export", "--data", str(data), "--lake", str(lake), "--json")
    on_duckdb = kilde("compute", "--store", f"duckdb:{data}", "--now", now.isoformat(), "--json")
    # In this process, so it runs on the session's Spark (getOrCreate finds it).
    result = CliRunner().invoke(
        kilde_app,
        [
            "compute",
            "--store",
            "spark:local[2]",
            "--lake",
            str(lake),
            "--plan",
            str(DEMO_PLAN),
            "--now",
            now.isoformat(),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return Shop(data, lake, now, json.loads(on_duckdb), json.loads(result.stdout), people)


def test_identity_is_identical(shop: Shop) -> None:
    for table in (
        "identity_records",
        "identity_observations",
        "identity_map",
        "identity_conflicts",
        "profile_ids",
    ):
        # write_seq numbers the DuckDB store's own Writer transactions; a lake has none
        drop = ("write_seq",) if table == "identity_records" else ()
        on_duckdb, on_spark = shop.store(table, drop=drop), shop.state(table, drop=drop)
        assert on_duckdb, table
        assert on_spark == on_duckdb, table
    # ... and it is the identity a user expects, not merely the same mistake twice.
    conflicts = StateTables(shop.lake / "state").read("identity_conflicts").to_pylist()
    reasons = {(c["reason"], c["id_value"]) for c in conflicts}
    assert ("shared_identifier", shop.people["kiosk"]) in reasons
    assert ("limit_exceeded", shop.people["laptop"]) in reasons
    assert ("unmerged", shop.people["daughter"]) in reasons
    assert any(reason == "circular_alias" for reason, _ in reasons)
    identity = shop.spark_report["steps"]["identity"]["result"]
    assert identity["profiles"] == shop.duckdb_report["steps"]["identity"]["result"]["profiles"]


def test_profiles_and_traits_are_identical(shop: Shop) -> None:
    on_duckdb = shop.store("profiles", drop=("updated_at",))
    assert len(on_duckdb) > 40
    assert shop.state("profiles", drop=("updated_at",)) == on_duckdb
    assert shop.state("profile_traits") == shop.store("profile_traits")
    traits = StateTables(shop.lake / "state").read("profile_traits").to_pylist()
    ann = shop.store("identity_map")
    ann_profile = next(r[2] for r in ann if r[0] == "user_id" and r[1] == shop.people["ann"])
    city = [t for t in traits if t["profile_id"] == ann_profile and t["name"] == "city"]
    assert [json.loads(t["value"]) for t in city] == ["Oslo"]  # the newest, same tier


def test_rfm_clv_churn_and_preferences_are_identical(shop: Shop) -> None:
    on_duckdb = shop.store("profile_insights", drop=("computed_at",))
    assert sum(1 for r in on_duckdb if r[1] is not None) > 10  # buyers with RFM scores
    assert shop.state("profile_insights", drop=("computed_at",)) == on_duckdb
    models_duckdb = shop.duckdb_report["steps"]["insights"]["result"]
    models_spark = shop.spark_report["steps"]["insights"]["result"]
    for model in ("bgnbd", "gamma_gamma"):
        assert models_spark[model] == models_duckdb[model], model


def test_segment_memberships_and_events_are_identical(shop: Shop) -> None:
    memberships = shop.store("segment_memberships")
    assert memberships
    assert shop.state("segment_memberships") == memberships
    assert shop.state("segment_runs", drop=("seconds",)) == shop.store(
        "segment_runs", drop=("seconds",)
    )
    by_segment = {
        r["segment_id"]: (r["members"], r["entered"], r["exited"])
        for r in shop.duckdb_report["steps"]["segments"]["result"]
    }
    assert {
        r["segment_id"]: (r["members"], r["entered"], r["exited"])
        for r in shop.spark_report["steps"]["segments"]["result"]
    } == by_segment
    # The Segment Entered/Exited events: in the store on DuckDB, appended to the lake on Spark.
    names = "('Segment Entered', 'Segment Exited')"
    con = duckdb.connect(str(shop.data / "kilde.duckdb"), read_only=True)
    try:
        stored = con.execute(
            f"SELECT message_id, event, user_id, anonymous_id FROM events WHERE event IN {names}"
        ).fetchall()
        files = [str(p) for p in (shop.lake / "events").glob("day=*/*.parquet")]
        in_lake = con.execute(
            "SELECT message_id, event, user_id, anonymous_id FROM "
            f"read_parquet(?, hive_partitioning = false) WHERE event IN {names}",
            [files],
        ).fetchall()
    finally:
        con.close()
    assert stored and sorted(in_lake) == sorted(stored)


def test_erasure_removes_the_person_from_the_lake_and_its_state(shop: Shop) -> None:
    """Runs last: it changes the lake."""
    state = StateTables(shop.lake / "state")
    idmap = state.read("identity_map").to_pylist()
    email = next(r["id_value"] for r in idmap if r["id_type"] == "email" and not r["shared"])
    profile_id = next(r["profile_id"] for r in idmap if r["id_value"] == email)
    theirs = {r["id_value"] for r in idmap if r["profile_id"] == profile_id and not r["shared"]}
    report = json.loads(
        kilde("lake", "erase", f"email:{email}", "--lake", str(shop.lake), "--json")
    )
    assert report["rows_removed"]["events"] > 0
    mapped = [r for r in idmap if r["profile_id"] == profile_id]
    assert report["rows_removed"]["identity_map"] == len(mapped)
    con = duckdb.connect()
    try:
        for folder in [shop.lake / "events", *sorted((shop.lake / "state").iterdir())]:
            files = [str(p) for p in folder.rglob("*.parquet")]
            if not files:
                continue
            found = con.execute(
                "SELECT string_agg(CAST(t AS VARCHAR), ' ') FROM "
                "read_parquet(?, union_by_name = true, hive_partitioning = false) t",
                [files],
            ).fetchall()
            text = found[0][0] or ""
            for value in theirs:
                assert value not in text, folder.name
    finally:
        con.close()
    others = [r for r in state.read("identity_map").to_pylist() if r["profile_id"] != profile_id]
    assert len(others) == len(idmap) - len(mapped)
