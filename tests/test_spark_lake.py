"""Scale-out collection: several `kilde serve --collector-only` on one lake, and its upkeep.

Real collector processes on loopback append to one lake directory without talking to each
other; `kilde lake compact`, `erase` and `retain` rewrite its files. Read back with DuckDB, as
any engine would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO_PLAN, START_TIMEOUT, WEB_KEY, Server, free_port

pytestmark = pytest.mark.spark
TIMEOUT = 60.0


def start_collector(lake: Path, work: Path) -> Server:
    """`kilde serve --collector-only` as a load balancer would run it."""
    port = free_port()
    data = work / f"collector-{port}"
    data.mkdir(parents=True)
    env = {
        **os.environ,
        "KILDE_DATA": str(data),
        "KILDE_PLAN": str(DEMO_PLAN),
        "KILDE_LAKE": str(lake),
        "KILDE_PORT": str(port),
    }
    log_path = work / f"collector-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "kilde.cli", "serve", "--collector-only"],
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the collector exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return Server(url, data, DEMO_PLAN, process, log_path, env)
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the collector did not answer:\n{log_path.read_text()}")


@pytest.fixture
def collectors(tmp_path: Path) -> Iterator[tuple[Path, list[Server]]]:
    lake = tmp_path / "lake"
    started = [start_collector(lake, tmp_path), start_collector(lake, tmp_path)]
    yield lake, started
    for server in started:
        server.stop()


def lake_cli(lake: Path, *args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "kilde.cli", "lake", *args, "--lake", str(lake), "--json"],
        env={**os.environ, "KILDE_PLAN": str(DEMO_PLAN)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def event(message_id: str, anon: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "anonymousId": anon,
        "properties": {"product_id": "p-ten-0", "category": "tents"},
        **extra,
    }


def post(server: Server, batch: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/batch", json={"batch": batch}, auth=(WEB_KEY, ""), timeout=TIMEOUT
    )


def lake_rows(lake: Path, where: str = "true") -> list[dict[str, Any]]:
    files = sorted(str(p) for p in (lake / "events").glob("day=*/*.parquet"))
    if not files:
        return []
    con = duckdb.connect()
    try:
        rel = con.sql(f"SELECT * FROM read_parquet({files!r}) WHERE {where}")
        return rel.to_arrow_table().to_pylist()
    finally:
        con.close()


def test_two_collectors_append_to_one_lake_without_coordination(
    collectors: tuple[Path, list[Server]],
) -> None:
    lake, (first, second) = collectors
    sent: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def load(server: Server, worker: int) -> None:
        for n in range(6):
            ids = [f"w{worker}-{n}-{i}-{uuid.uuid4().hex[:6]}" for i in range(25)]
            response = post(server, [event(m, f"dev-{worker}") for m in ids])
            with lock:
                if response.status_code == 200 and not response.json()["rejected"]:
                    sent.extend(ids)
                else:
                    failures.append(response.text[:200])

    threads = [
        threading.Thread(target=load, args=(server, number))
        for number, server in enumerate([first, second, first, second])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    # A client that retried against the other collector: the same message in both.
    retried = [event(f"retry-{uuid.uuid4().hex[:8]}", "dev-retry") for _ in range(3)]
    assert post(first, retried).status_code == 200
    assert post(second, retried).status_code == 200

    files = sorted((lake / "events").glob("day=*/*.parquet"))
    names = [f.name for f in files]
    assert len(set(names)) == len(names)
    writers = {name.split("-")[3] for name in names}  # part-<time>-<host>-<pid>-...
    assert writers == {str(first.process.pid), str(second.process.pid)}
    status = lake_cli(lake, "status")
    assert status["datasets"]["events"]["rows"] == len(sent) + 2 * len(retried)
    assert status["datasets"]["events"]["files"] == len(files)

    report = lake_cli(lake, "compact")["events"]
    assert report["files_before"] == len(files)
    assert report["files_after"] < report["files_before"]
    assert report["duplicates_dropped"] == len(retried)
    stored = [r["message_id"] for r in lake_rows(lake)]
    assert sorted(stored) == sorted(sent + [r["messageId"] for r in retried])

    # Collectors serve collection only: no admin API over the data, no dashboard.
    assert httpx.get(f"{first.url}/api/events", timeout=TIMEOUT).status_code == 404
    assert httpx.get(f"{first.url}/", timeout=TIMEOUT).status_code == 404
    health = httpx.get(f"{second.url}/api/health", timeout=TIMEOUT).json()
    assert health["mode"] == "collector" and health["files_written"] > 0


def test_rejected_records_land_in_the_lake_dead_letters(
    collectors: tuple[Path, list[Server]],
) -> None:
    lake, (first, _) = collectors
    bad = {"type": "track", "messageId": "no-event-name", "anonymousId": "dev-x"}
    response = post(first, [bad, event("good-one", "dev-x")])
    assert response.status_code == 200
    body = response.json()
    assert body["stored"] == 1 and len(body["rejected"]) == 1
    letters = pq.read_table(sorted((lake / "dead_letters").glob("day=*/*.parquet"))).to_pylist()
    assert [letter["reason"] for letter in letters] == ["a track message needs an event name"]
    assert letters[0]["status"] == "pending"
    assert "no-event-name" in letters[0]["payload"]


def test_a_collector_killed_under_load_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    victim = start_collector(lake, tmp_path)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        with httpx.Client(base_url=victim.url, auth=(WEB_KEY, ""), timeout=30) as client:
            while not stop.is_set():
                ids = [f"k-{n}-{i}" for i in range(20)]
                n += 1
                try:
                    response = client.post(
                        "/v1/batch", json={"batch": [event(m, "dev-k") for m in ids]}
                    )
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    acknowledged.extend(ids)

    thread = threading.Thread(target=load)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()
    stop.set()
    thread.join(timeout=30)
    assert len(acknowledged) >= 200
    stored = {r["message_id"] for r in lake_rows(lake)}
    assert set(acknowledged) <= stored
    # No half-written file is visible: every data file reads whole.
    for path in (lake / "events").glob("day=*/*.parquet"):
        assert pq.read_metadata(path).num_rows > 0


def test_erasure_and_retention_rewrite_the_lake_files(
    collectors: tuple[Path, list[Server]],
) -> None:
    lake, (first, second) = collectors
    erased, kept = f"gone-{uuid.uuid4().hex[:8]}", f"stays-{uuid.uuid4().hex[:8]}"
    email = f"{erased}@example.com"
    old = (datetime.now(UTC) - timedelta(days=800)).isoformat()
    assert (
        post(
            first,
            [
                {
                    "type": "identify",
                    "userId": erased,
                    "traits": {"email": email},
                    "messageId": uuid.uuid4().hex,
                },
                event(uuid.uuid4().hex, "dev-gone", userId=erased),
            ],
        ).status_code
        == 200
    )
    assert (
        post(
            second,
            [
                {
                    "type": "identify",
                    "userId": kept,
                    "traits": {"email": f"{kept}@example.com"},
                    "messageId": uuid.uuid4().hex,
                },
                event(uuid.uuid4().hex, "dev-stays", userId=kept),
                event(uuid.uuid4().hex, "dev-stays", userId=kept, timestamp=old),
                event(uuid.uuid4().hex, "dev-stays", userId=kept, timestamp=old),
            ],
        ).status_code
        == 200
    )

    report = lake_cli(lake, "erase", f"email:{email}", f"user_id:{erased}")
    assert report["rows_removed"]["events"] == 2
    assert report["files_rewritten"]
    everything = json.dumps(lake_rows(lake), default=str)
    assert erased not in everything and email not in everything
    assert kept in everything

    dry = lake_cli(lake, "retain", "--dry-run")
    viewed = {e["event"]: e["expired"] for e in dry["events"]}
    assert viewed["track Product Viewed"] == 2
    tracks = f"user_id = '{kept}' AND type = 'track'"
    assert len(lake_rows(lake, tracks)) == 3  # a dry run changes nothing
    done = lake_cli(lake, "retain")
    assert done["expired_events"] == 2 and done["files_rewritten"]
    assert len(lake_rows(lake, tracks)) == 1


def test_consent_given_through_a_collector_reaches_the_state_ledger_once(
    collectors: tuple[Path, list[Server]],
) -> None:
    from kilde.store.backends import StateTables
    from kilde.store.compute import apply_statements
    from kilde.store.lake import Lake

    lake, (first, second) = collectors
    person = f"consents-{uuid.uuid4().hex[:8]}"
    choice = {
        "type": "track",
        "event": "Consent Updated",
        "userId": person,
        "messageId": uuid.uuid4().hex,
        "properties": {"purposes": {"marketing_email": True, "advertising": False}},
    }
    assert post(first, [choice]).status_code == 200
    assert post(second, [choice]).status_code == 200  # the same choice, retried elsewhere
    assert apply_statements(Lake(lake)) >= 2
    assert apply_statements(Lake(lake)) >= 2  # every compute applies them again
    ledger = StateTables(lake / "state").read("consent_ledger").to_pylist()
    mine = {(r["purpose"], r["state"]) for r in ledger if r["user_id"] == person}
    assert mine == {("marketing_email", "granted"), ("advertising", "denied")}
    assert len([r for r in ledger if r["user_id"] == person]) == 2
