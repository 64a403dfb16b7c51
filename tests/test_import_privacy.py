"""Imports meet the privacy module, and the demo imports its company files."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.conftest import Server
from tests.import_support import SAMPLES, events, get, kilde_import, post, write


def test_bought_data_about_a_suppressed_person_is_never_stored(
    kilde_server: Server, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    erased = f"erased.{tag}@example.com"
    kept = f"kept.{tag}@example.com"
    suppressed = post(
        f"{kilde_server.url}/api/privacy/suppress",
        json={"email": erased},
        headers=kilde_server.admin,
    )
    assert suppressed.status_code == 200, suppressed.text
    file = write(
        tmp_path / "bought.csv",
        f"email,household_size,income_band\n{erased},4,high\n{kept},2,low\n",
    )
    code, summary, run = kilde_import(
        kilde_server, "broker", file, "-s", "databroker", "-m", str(SAMPLES / "broker.mapping.yaml")
    )
    assert code == 0, run.stderr
    assert summary is not None
    assert (summary["stored"], summary["suppressed"], summary["rejected"]) == (1, 1, 0)
    emails = [e["traits"].get("email") for e in events(kilde_server, source="databroker")]
    assert kept in emails and erased not in emails
    human = kilde_import(
        kilde_server,
        "broker",
        file,
        "-s",
        "databroker",
        "-m",
        str(SAMPLES / "broker.mapping.yaml"),
        json=False,
    )[2].stdout
    assert "kept out by privacy rules: 1 of people on the suppression list" in human
    assert erased not in human


def test_the_demo_imports_order_history_crm_tickets_and_bought_data(own_server: Server) -> None:
    result = own_server.kilde("demo", "--customers", "20", "--days", "7")
    for name in ("order-history.csv", "crm-export.csv", "helpdesk-export.jsonl"):
        assert f"imported {name}: " in result.stdout
    assert (own_server.data_dir / "demo-imports" / "nordic-data-2026.csv").is_file()
    runs = get(f"{own_server.url}/api/imports", headers=own_server.admin).json()["imports"]
    assert {r["kind"] for r in runs} == {"transactions", "contacts", "interactions", "broker"}
    assert all(r["status"] == "done" and r["rejected"] == 0 for r in runs)
    tickets = events(own_server, source="support")
    assert tickets and all("sentiment_label" in t["properties"] for t in tickets)
    assert events(own_server, source="crm", type="identify")
    bought = events(own_server, source="databroker")
    assert bought and all(b["context"]["provenance"]["tier"] == "broker" for b in bought)


def test_orders_of_a_suppressed_person_are_kept_out_on_the_columnar_path(
    kilde_server: Server, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    erased = f"gone.{tag}@example.com"
    suppressed = post(
        f"{kilde_server.url}/api/privacy/suppress",
        json={"email": erased},
        headers=kilde_server.admin,
    )
    assert suppressed.status_code == 200, suppressed.text
    file = write(
        tmp_path / "orders.csv",
        "order_id,customer_id,email,order_date,total,currency\n"
        f"{tag}-1,c-{tag}-1,{erased},2026-09-01T10:00:00Z,10,NOK\n"
        f"{tag}-2,c-{tag}-2,kept.{tag}@example.com,2026-09-01T10:00:00Z,20,NOK\n"
        # The same person under the customer id only: the same request names them.
        f"{tag}-3,c-{tag}-1,,2026-09-02T10:00:00Z,30,NOK\n",
    )
    code, summary, run = kilde_import(kilde_server, "transactions", file, "-s", "shop-orders")
    assert code == 0, run.stderr
    assert summary is not None and summary["read"] == "columnar"
    assert (summary["stored"], summary["suppressed"], summary["rejected"]) == (1, 2, 0)
    orders = {
        e["properties"]["order_id"]
        for e in events(kilde_server, source="shop-orders")
        if e["properties"].get("order_id", "").startswith(tag)
    }
    assert orders == {f"{tag}-2"}
