"""The `kilde` command against a running server, and in-process when none runs."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import httpx
import orjson

from tests.conftest import DEMO_PLAN, WEB_KEY, Server, run_kilde, start_server


def demo_counts(output: str) -> tuple[int, int, int, int]:
    pattern = r"(\d+) events sent, (\d+) stored, (\d+) already there, (\d+) in the dead letter"
    match = re.search(pattern.replace(" ", r"\s+"), output)  # the terminal may wrap the line
    assert match, output
    sent, stored, duplicates, rejected = (int(g) for g in match.groups())
    return sent, stored, duplicates, rejected


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_help_lists_the_commands() -> None:
    result = run_kilde("--help")
    assert result.returncode == 0
    for command in ("serve", "plan", "bad-events", "events", "stats", "demo", "admin"):
        assert command in result.stdout


def test_events_list_against_the_running_server(kilde_server: Server) -> None:
    user = f"cli-{uuid.uuid4().hex[:8]}"
    for event in ("Signed Up", "Signed In"):
        sent = httpx.post(
            f"{kilde_server.url}/v1/track",
            json={"userId": user, "event": event, "messageId": f"{user}-{event}"},
            auth=(WEB_KEY, ""),
        )
        assert sent.status_code == 200
    table = kilde_server.kilde("events", "list", "--user-id", user).stdout
    assert "2 events" in table
    assert "Signed Up" in table and "Signed In" in table

    listed = orjson.loads(
        kilde_server.kilde(
            "events", "list", "--user-id", user, "--event", "Signed In", "--json"
        ).stdout
    )
    assert [e["message_id"] for e in listed] == [f"{user}-Signed In"]
    limited = orjson.loads(
        kilde_server.kilde("events", "list", "--user-id", user, "--limit", "1", "--json").stdout
    )
    assert len(limited) == 1


def test_cli_without_the_token_says_how_to_get_one(kilde_server: Server) -> None:
    env = {k: v for k, v in kilde_server.env.items() if k != "KILDE_ADMIN_TOKEN"}
    result = run_kilde("stats", env=env)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "admin token" in output
    assert "KILDE_ADMIN_TOKEN" in output
    wrong = run_kilde("stats", "--token", "kat_wrong", env=env)
    assert wrong.returncode != 0
    assert "401" in wrong.stdout + wrong.stderr


def test_demo_through_the_running_server(own_server: Server) -> None:
    result = own_server.kilde("demo", "--customers", "50")
    sent, stored, duplicates, rejected = demo_counts(result.stdout)
    assert sent > 50 * 5  # several sessions per customer
    assert stored + duplicates + rejected == sent
    assert duplicates == 0
    assert rejected < sent // 20  # a few off-plan events, on purpose, for the dead-letter tour

    stats = orjson.loads(own_server.kilde("stats", "--json").stdout)
    assert stats["events"] >= stored  # the demo also fills in forms, which store events too
    assert stats["dead_letters_pending"] == rejected
    types = {(r["source"], r["type"]) for r in stats["by_source_and_type"]}
    assert {("web", "page"), ("web", "track"), ("web", "identify"), ("backend", "track")} <= types
    table = own_server.kilde("stats").stdout
    assert f"{stats['events']} events" in table
    store = stats["store"]
    assert f"DuckDB with {store['duckdb_threads']} threads" in table
    assert f"memory limit {store['duckdb_memory_limit']}" in table

    orders = orjson.loads(
        own_server.kilde(
            "events", "list", "--event", "Order Completed", "--limit", "5", "--json"
        ).stdout
    )
    assert orders and all(o["properties"]["currency"] == "NOK" for o in orders)
    assert all(o["source"] == "backend" for o in orders)


def test_demo_and_stats_in_process_when_no_server_runs(tmp_path: Path) -> None:
    env = {"KILDE_DATA": str(tmp_path / "data"), "KILDE_PLAN": str(DEMO_PLAN)}
    result = run_kilde("demo", "--customers", "50", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    _, stored, _, rejected = demo_counts(result.stdout)
    assert stored > 0

    stats = orjson.loads(ok(run_kilde("stats", "--json", env=env)))
    assert stats["events"] >= stored  # the demo also fills in forms, which store events too
    assert stats["dead_letters_pending"] >= rejected

    # A server started afterwards serves what the in-process run stored.
    server = start_server(tmp_path / "data")
    try:
        served = httpx.get(f"{server.url}/api/stats", headers=server.admin).json()
        assert served["events"] == stats["events"]
    finally:
        server.stop()
