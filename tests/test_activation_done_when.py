"""The issue's "done when", on the demo shop: a marketer sends "high-value customers at risk"
to a webhook and produces a Customer Match file, and no one without consent is in either.
Who consented is read from the privacy API (the consent ledger per person), not from the
activation code."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from kilde.activate import hashing
from tests.conftest import ADMIN_TOKEN, DEMO_PLAN, start_server
from tests.test_activation import SECRET, Receiver, plan_with, wait_for

SEGMENT = "high-value-at-risk"


@pytest.mark.timeout(900)  # the demo shop, profiles and insights first
def test_at_risk_customers_reach_a_webhook_and_a_customer_match_file_with_consent_only(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    plan = tmp_path / "kilde.yaml"
    plan.write_text(DEMO_PLAN.read_text())
    plan_with(
        plan,
        f"""  - name: at-risk-mail
    kind: webhook
    purpose: marketing_email
    url: {receiver.url}
    secret: {SECRET}
    segments: [{SEGMENT}]
  - name: at-risk-google
    kind: google_customer_match
    purpose: advertising
    segments: [{SEGMENT}]
""",
    )
    # The marketer runs the destinations by hand here (no background delivery), after the
    # customers' choices below are recorded.
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_BACKGROUND="0")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        server.kilde("destinations", "run", "at-risk-mail")  # the webhook exists from now on
        server.kilde("demo", "--customers", "100", "--days", "60")
        with httpx.Client(base_url=server.url, headers=admin, timeout=300) as api:
            assert api.post("/api/profiles/refresh").status_code == 200
            assert api.post("/api/insights/refresh").status_code == 200
            members = [
                m["profile_id"]
                for m in api.get(
                    f"/api/segments/{SEGMENT}/members", params={"limit": 10000}
                ).json()["members"]
            ]
            # The demo shop records no choices: some members say yes (by mail, to customer
            # service), one of them then opts out of sale or sharing.
            for i, profile in enumerate(members):
                purposes = {"marketing_email": i % 2 == 0, "advertising": i % 3 == 0}
                recorded = api.post(
                    "/api/privacy/consent",
                    json={"identifier": profile, "purposes": purposes, "evidence": "letter"},
                )
                assert recorded.status_code == 200, recorded.text
            opted_out = api.post("/api/privacy/do-not-sell", json={"identifier": members[3]})
            assert opted_out.status_code == 200, opted_out.text

            def state(profile: str, purpose: str) -> str | None:
                body = {"identifier": profile}
                current = api.post("/api/privacy/consent/state", json=body).json()["current"]
                found: dict[str, Any] = current.get(purpose) or {}
                return found.get("state")

            # The choices are in the ledger (what the privacy API shows) before the run.
            wait_for(lambda: state(members[-1], "marketing_email") is not None)
            synced = orjson.loads(
                server.kilde("destinations", "run", "at-risk-google", "--json").stdout
            )["syncs"][0]

            def delivered_all() -> dict[str, Any] | None:
                # Run until nothing is pending: a request the small receiver dropped is retried.
                server.kilde("destinations", "run", "at-risk-mail")
                outbox: dict[str, Any] = api.get(
                    "/api/destinations/at-risk-mail/deliveries", params={"limit": 1000}
                ).json()
                pending = any(d["state"] == "pending" for d in outbox["deliveries"])
                return None if pending else outbox

            outbox = wait_for(delivered_all, timeout=120)

            def sells_not(profile: str) -> bool:
                body = {"identifier": profile}
                status = api.post("/api/privacy/do-not-sell/status", json=body).json()
                return not status["do_not_sell"]

            mail_ok = {p for p in members if state(p, "marketing_email") == "granted"}
            ads_ok = {p for p in members if state(p, "advertising") == "granted" and sells_not(p)}
            emails = {
                p: api.get(f"/api/profiles/{p}").json()["traits"].get("email", {}).get("value")
                for p in ads_ok
            }
    finally:
        server.stop()
        receiver.close()

    assert len(members) >= 5  # the demo shop has customers at risk...
    assert mail_ok and len(mail_ok) < len(members)  # ...some of whom allow marketing mail
    assert ads_ok and len(ads_ok) < len(members)

    # The webhook: exactly the members who allow marketing mail entered, nobody else.
    entered = [d["data"] for d in receiver.accepted() if d["data"]["event"] == "Segment Entered"]
    summary = (
        sorted({(d["state"], d["last_error"]) for d in outbox["deliveries"]}, key=str),
        len(outbox["deliveries"]),
        len(members),
        len(entered),
    )
    assert {d["properties"]["profile_id"] for d in entered} == mail_ok, summary

    # The Customer Match file: exactly the members who allow advertising and did not opt out.
    assert synced["members"] == len(members)
    assert synced["added"] == len(ads_ok)
    with open(synced["files"][0], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    expected = {
        hashlib.sha256(str(hashing.google_email(e)).encode()).hexdigest()
        for e in emails.values()
        if e
    }
    assert {r["Email"] for r in rows if r["Email"]} == expected
    assert len(rows) == len(ads_ok)
