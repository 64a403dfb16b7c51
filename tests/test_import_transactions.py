"""`kilde import transactions`: order history into Order Completed / Order Refunded events."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import Server, start_server
from tests.import_support import SAMPLES, dead_letters, events, get, kilde_import, post, write


def orders_file(tmp_path: Path, prefix: str) -> Path:
    """The sample order history with order ids of this test only."""
    text = (SAMPLES / "orders.csv").read_text().replace("o-10", f"{prefix}-")
    return write(tmp_path / "orders.csv", text)


def test_orders_become_order_events_and_a_second_import_stores_nothing(
    kilde_server: Server, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    file = orders_file(tmp_path, prefix)

    code, summary, run = kilde_import(kilde_server, "transactions", file, "--source", "shop-orders")
    assert code == 0, run.stderr
    assert summary is not None
    assert (summary["rows_read"], summary["records"], summary["stored"]) == (5, 4, 4)
    assert summary["rejected"] == 0

    stored = {
        (e["event"], e["properties"]["order_id"]): e
        for e in events(kilde_server, source="shop-orders")
        if e["properties"]["order_id"].startswith(prefix)
    }
    assert set(stored) == {
        ("Order Completed", f"{prefix}-01"),
        ("Order Completed", f"{prefix}-02"),
        ("Order Completed", f"{prefix}-03"),
        ("Order Refunded", f"{prefix}-02"),
    }
    first = stored[("Order Completed", f"{prefix}-01")]
    assert first["user_id"] == "cust-000001"
    assert first["timestamp"].startswith("2026-09-02T10:15:00")
    assert first["properties"]["revenue"] == 4380.0
    assert first["properties"]["currency"] == "NOK"
    assert [p["product_id"] for p in first["properties"]["products"]] == [
        "FF-TEN-000",
        "FF-JAC-002",
    ]
    assert first["context"]["provenance"]["tier"] == "first_party"
    assert first["context"]["provenance"]["line"] == 2
    refund = stored[("Order Refunded", f"{prefix}-02")]
    assert refund["properties"]["total"] == 1990.0
    # A customer known only by email gets the same stable id on every import.
    guest = stored[("Order Completed", f"{prefix}-03")]
    assert guest["user_id"] is None and guest["anonymous_id"]
    assert guest["context"]["externalIds"][0] == {
        "id": "sara.olsen2@example.com",
        "type": "email",
        "collection": "users",
        "encoding": "none",
    }

    code, again, _ = kilde_import(kilde_server, "transactions", file, "--source", "shop-orders")
    assert code == 0
    assert again is not None
    assert (again["stored"], again["duplicates"]) == (0, 4)
    after = [
        e
        for e in events(kilde_server, source="shop-orders")
        if e["properties"]["order_id"].startswith(prefix)
    ]
    assert len(after) == 4


def test_a_nordic_export_with_a_mapping_file(kilde_server: Server, tmp_path: Path) -> None:
    prefix = f"N{uuid.uuid4().hex[:6]}"
    raw = (SAMPLES / "orders-nordic.csv").read_bytes().replace(b"N-5", prefix.encode())
    file = tmp_path / "ordre.csv"
    file.write_bytes(raw)
    code, summary, run = kilde_import(
        kilde_server,
        "transactions",
        file,
        "--source",
        "shop-orders",
        "--map",
        str(SAMPLES / "orders-nordic.mapping.yaml"),
    )
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 2
    assert summary["details"]["delimiter"].startswith("semicolon")
    found = {
        e["properties"]["order_id"]: e
        for e in events(kilde_server, source="shop-orders", event="Order Completed")
        if e["properties"]["order_id"].startswith(prefix)
    }
    first, second = found[f"{prefix}01"], found[f"{prefix}02"]
    assert first["properties"]["revenue"] == 1299.0  # "1 299,00" with a no-break space
    assert second["properties"]["revenue"] == 12490.5
    # 02.10.2026 14:30 in Oslo (summer time, UTC+2) is 12:30 UTC.
    assert first["timestamp"].startswith("2026-10-02T12:30:00")


def test_dry_run_shows_the_rows_as_stored_and_writes_nothing(
    kilde_server: Server, tmp_path: Path
) -> None:
    prefix = f"d{uuid.uuid4().hex[:8]}"
    file = orders_file(tmp_path, prefix)
    code, _, run = kilde_import(
        kilde_server,
        "transactions",
        file,
        "--source",
        "shop-orders",
        "--dry-run",
        "--preview",
        "1",
        json=False,
    )
    assert code == 0, run.stderr
    out = run.stdout
    assert "dry run, nothing written" in out
    assert "order_id (detected)" in out and "total (detected)" in out
    assert '"event": "Order Completed"' in out and f'"order_id": "{prefix}-01"' in out
    assert "would be stored 4" in out
    stored = [
        e
        for e in events(kilde_server, source="shop-orders")
        if e["properties"]["order_id"].startswith(prefix)
    ]
    assert stored == []


def test_broken_rows_are_rejected_one_by_one_with_line_column_and_reason(
    kilde_server: Server, tmp_path: Path
) -> None:
    p = f"b{uuid.uuid4().hex[:8]}"
    file = write(
        tmp_path / "orders.csv",
        "order_id,customer_id,email,order_date,total,currency\n"
        f"{p}-1,cust-1,one@example.com,2026-09-01,100.00,NOK\n"
        f"{p}-2,cust-2,two@example.com,31/09/2026,100.00,NOK\n"
        f"{p}-3,cust-3,three@example.com,2026-09-03,a hundred,NOK\n"
        f"{p}-4,,,2026-09-04,100.00,NOK\n"
        f"{p}-5,cust-5,five@example.com,2026-09-05,100.00,KRONER\n"
        f"{p}-6,cust-6,six@example.com,2026-09-06,250.00,NOK\n"
        f"{p}-1,cust-1,one@example.com,2026-09-01,120.00,NOK\n",
    )
    rejects = tmp_path / "rejected.csv"
    code, summary, run = kilde_import(
        kilde_server, "transactions", file, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert code == 0, run.stderr  # some rows were imported
    assert summary is not None
    assert (summary["rows_read"], summary["stored"], summary["rejected"]) == (7, 2, 5)
    with rejects.open() as handle:
        rows = {int(r["line"]): r for r in csv.DictReader(handle)}
    assert {n: (r["column"], r["error"]) for n, r in rows.items()} == {
        3: ("order_date", "invalid_date"),
        4: ("total", "invalid_amount"),
        5: ("", "missing_identifier"),
        6: ("currency", "invalid_currency"),
        8: ("total", "duplicate_order"),
    }
    assert "line 2" in rows[8]["reason"] and rows[8]["fix"]
    # Reasons and fixes name columns, never the values of the rows.
    text = rejects.read_text() + run.stdout + run.stderr
    for value in ("two@example.com", "31/09/2026", "a hundred", "KRONER", "120.00"):
        assert value not in text
    letters = [
        letter
        for letter in dead_letters(kilde_server, "shop-orders")
        if letter["reason"] and letter["channel"] == "import"
    ]
    detail = get(
        f"{kilde_server.url}/api/bad-events/{letters[0]['id']}", headers=kilde_server.admin
    ).json()
    assert detail["channel"] == "import"
    mine = [
        letter
        for letter in letters
        if p
        in get(f"{kilde_server.url}/api/bad-events/{letter['id']}", headers=kilde_server.admin).text
    ]
    assert len(mine) == 5

    # Running the same file again neither stores nor dead-letters anything twice.
    code, again, _ = kilde_import(
        kilde_server, "transactions", file, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert again is not None and (again["stored"], again["duplicates"]) == (0, 2)
    assert again["rejected"] == 5
    letters_after = [
        letter
        for letter in dead_letters(kilde_server, "shop-orders")
        if p
        in get(f"{kilde_server.url}/api/bad-events/{letter['id']}", headers=kilde_server.admin).text
    ]
    assert len(letters_after) == 5


def test_a_file_of_which_nothing_can_be_imported_exits_non_zero(
    kilde_server: Server, tmp_path: Path
) -> None:
    file = write(
        tmp_path / "orders.csv",
        "order_id,customer_id,order_date,total,currency\n"
        "x-1,,2026-09-01,100,NOK\n"
        "x-2,c-2,yesterday,100,NOK\n",
    )
    code, summary, run = kilde_import(kilde_server, "transactions", file, "-s", "shop-orders")
    assert code == 1
    assert summary is not None and summary["stored"] == 0 and summary["rejected"] == 2
    assert "no row could be imported" in run.stderr


def test_a_refund_the_plan_does_not_know_waits_in_the_dead_letter_until_replayed(
    own_server: Server, tmp_path: Path
) -> None:
    plan = own_server.plan_path.read_text()
    start = plan.index("  - name: Order Refunded")
    end = plan.index("  # Support tickets")
    own_server.plan_path.write_text(plan[:start] + plan[end:])
    post(f"{own_server.url}/api/plan/reload", headers=own_server.admin).raise_for_status()
    file = orders_file(tmp_path, "r")
    rejects = tmp_path / "rejects.csv"
    code, summary, _ = kilde_import(
        own_server, "transactions", file, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert code == 0
    assert summary is not None and (summary["stored"], summary["rejected"]) == (3, 1)
    rejected = list(csv.DictReader(rejects.open()))
    assert [(r["line"], r["error"]) for r in rejected] == [("6", "off_plan")]
    assert "not in the collection plan" in rejected[0]["reason"]

    _, again, _ = kilde_import(own_server, "transactions", file, "-s", "shop-orders")
    assert again is not None and again["reasons"] == {"already_dead_lettered": 1}
    assert len(dead_letters(own_server, "shop-orders")) == 1

    own_server.plan_path.write_text(plan)
    own_server.kilde("bad-events", "replay", "--source", "shop-orders")
    assert [e["event"] for e in events(own_server, event="Order Refunded")] == ["Order Refunded"]


def test_without_a_server_the_import_runs_in_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {
        **os.environ,
        "KILDE_DATA": str(data),
        "KILDE_PLAN": str(Path(__file__).parent.parent / "src/kilde/demo/kilde.yaml"),
    }
    file = orders_file(tmp_path, "p")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kilde.cli",
            "import",
            "transactions",
            str(file),
            "-s",
            "shop-orders",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "stored 4" in result.stdout
    server = start_server(data)
    try:
        assert len(events(server, source="shop-orders")) == 4
        runs = get(f"{server.url}/api/imports", headers=server.admin).json()["imports"]
        assert [(r["kind"], r["status"], r["stored"]) for r in runs] == [
            ("transactions", "done", 4)
        ]
    finally:
        server.stop()
