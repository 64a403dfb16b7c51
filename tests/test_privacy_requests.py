"""The request tracker, the audit log and the Art. 30 register."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson

from tests.conftest import ADMIN_TOKEN, DEMO_PLAN, Server, run_kilde
from tests.privacy_support import Person, api, privacy, refresh_profiles, send


def test_requests_run_against_their_legal_deadline(kilde_server: Server, tmp_path: Path) -> None:
    person, someone_else = Person(), Person()
    send(
        kilde_server,
        {"type": "identify", "userId": person.user_id, "traits": {"email": person.email}},
        {
            "type": "identify",
            "userId": someone_else.user_id,
            "traits": {"email": someone_else.email},
        },
    )
    refresh_profiles(kilde_server)
    logged = orjson.loads(
        kilde_server.kilde(
            "privacy", "requests", "add", "--kind", "access", "--person", person.email, "--json"
        ).stdout
    )
    received = datetime.fromisoformat(logged["received_at"])
    assert datetime.fromisoformat(logged["due_at"]) - received == timedelta(days=30)
    assert logged["verification"] == "pending" and logged["state"] == "open"
    assert logged["subject_recorded"] is True and "subject" not in logged
    ccpa = privacy(kilde_server, "requests", {"kind": "erasure", "law": "ccpa"})
    assert ccpa["days_left"] > 44.9

    # not answered before the requester is verified, nor for someone else
    out = tmp_path / "answer.zip"
    early = kilde_server.kilde(
        "privacy", "export", person.email, "--request", logged["id"], "-o", str(out), check=False
    )
    assert early.returncode == 1 and "not been verified" in early.stderr
    kilde_server.kilde(
        "privacy",
        "requests",
        "update",
        logged["id"],
        "--verified",
        "--method",
        "reply from the address",
    )
    other = kilde_server.kilde(
        "privacy",
        "export",
        someone_else.email,
        "--request",
        logged["id"],
        "-o",
        str(out),
        check=False,
    )
    assert other.returncode == 1 and "not the one the request is about" in other.stderr
    kilde_server.kilde("privacy", "export", person.email, "--request", logged["id"], "-o", str(out))
    assert out.stat().st_size > 0
    done = api(kilde_server, "GET", f"/api/privacy/requests/{logged['id']}").json()
    assert done["state"] == "done" and done["outcome"].startswith("exported")
    assert done["closed_at"] is not None and done["days_left"] is None

    # an extension, once; an overdue request stands out
    extended = kilde_server.kilde("privacy", "requests", "update", ccpa["id"], "--extend", "--json")
    assert datetime.fromisoformat(orjson.loads(extended.stdout)["due_at"]) - datetime.fromisoformat(
        ccpa["received_at"]
    ) == timedelta(days=90)
    twice = kilde_server.kilde("privacy", "requests", "update", ccpa["id"], "--extend", check=False)
    assert twice.returncode == 1 and "already extended" in twice.stderr
    late = privacy(
        kilde_server,
        "requests",
        {
            "kind": "correction",
            "received_at": (datetime.now(UTC) - timedelta(days=40)).isoformat(),
            "note": "wrong delivery address",
        },
    )
    overdue = api(kilde_server, "GET", "/api/privacy/requests", params={"overdue": True}).json()
    assert late["id"] in [r["id"] for r in overdue["requests"]]
    listing = kilde_server.kilde("privacy", "requests", "--overdue")
    assert late["id"] in listing.stdout
    closing = kilde_server.kilde(
        "privacy", "requests", "update", late["id"], "--state", "done", check=False
    )
    assert closing.returncode == 1 and "needs its outcome" in closing.stderr

    # the tracker holds no personal data: a hash at most
    everything = api(kilde_server, "GET", "/api/privacy/requests", params={"state": "all"}).text
    assert person.email.lower() not in everything.lower()


def test_every_admin_action_is_audited_without_personal_data(kilde_server: Server) -> None:
    person = Person()
    send(
        kilde_server,
        {"type": "identify", "userId": person.user_id, "traits": {"email": person.email}},
    )
    since = datetime.now(UTC)
    api(kilde_server, "GET", "/api/stats")
    api(kilde_server, "POST", "/api/profiles/lookup", json={"email": person.email})
    api(kilde_server, "GET", "/api/events", params={"user_id": person.user_id})
    mail = api(
        kilde_server,
        "POST",
        f"/api/email/campaigns/audit-{person.tag}/render",
        json={"html": "<p>Hei</p>", "recipients": [{"user_id": person.user_id}]},
    )
    assert mail.status_code == 200, mail.text
    refused = httpx.get(
        f"{kilde_server.url}/api/stats", headers={"Authorization": "Bearer wrong-token"}
    )
    assert refused.status_code == 401
    entries = [
        e
        for e in api(kilde_server, "GET", "/api/privacy/audit", params={"limit": 500}).json()[
            "entries"
        ]
        if datetime.fromisoformat(e["logged_at"]) >= since
    ]
    actions = {(e["action"], e["status"], e["personal_data"]) for e in entries}
    assert ("GET /api/stats", 200, False) in actions
    assert ("POST /api/profiles/lookup", 200, True) in actions
    assert ("GET /api/events", 200, True) in actions
    assert ("POST /api/email/campaigns/{campaign}/render", 200, True) in actions
    assert ("GET /api/stats", 401, False) in actions
    text = orjson.dumps(entries).decode()
    assert person.email.lower() not in text.lower() and person.user_id not in text
    assert ADMIN_TOKEN not in text and "wrong-token" not in text
    assert all(e["actor"].startswith("token:") for e in entries)
    cli = kilde_server.kilde("privacy", "audit", "--personal", "--limit", "20")
    assert "/api/profiles/lookup" in cli.stdout


def test_the_register_is_generated_from_the_plan(tmp_path: Path) -> None:
    env = {"KILDE_PLAN": str(DEMO_PLAN)}
    markdown = run_kilde("plan", "register", env=env)
    assert markdown.returncode == 0, markdown.stderr
    text = markdown.stdout
    assert text.startswith("# Record of processing activities (GDPR Art. 30)")
    assert "**Contact for data protection:** privacy@fjordfell.example\n" in text
    for purpose, basis in (
        ("analytics", "legitimate_interest"),
        ("marketing_email", "consent (double opt-in)"),
        ("advertising", "consent"),
        ("order_fulfilment", "contract"),
    ):
        assert f"## {purpose}" in text
        assert f"| Legal basis | {basis} |" in text
    assert "Order Completed: 5 years" in text
    assert "Signed Up: not limited in the plan: set `retention`" in text  # a gap, named
    assert "trait: household_size (indirectly identifying)" in text
    html = run_kilde(
        "plan", "register", "--format", "html", "-o", str(tmp_path / "r.html"), env=env
    )
    assert html.returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "Fjord &amp; Fell" in page and "<h2>advertising</h2>" in page
    table = run_kilde("plan", "register", "--format", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert [r["purpose"] for r in rows] == [
        "analytics",
        "order_fulfilment",
        "marketing_email",
        "advertising",
        "customer_service",
    ]
    assert rows[0]["controller"] == "Fjord & Fell"
    bad = run_kilde("plan", "register", "--format", "pdf", env=env)
    assert bad.returncode == 1 and "use md, html or csv" in bad.stderr

    # recipients come from the plan's destinations; the safeguards and people are named
    shared = tmp_path / "kilde.yaml"
    shared.write_text(
        DEMO_PLAN.read_text()
        + "\ndestinations:\n  - name: partner-feed\n    kind: partner_export\n"
        "    purpose: advertising\n    recipient: Nordic Outdoor Media AS\n"
        "    segments: [repeat-buyers-90d]\n    traits: [email]\n"
    )
    register = run_kilde("plan", "register", env={"KILDE_PLAN": str(shared)}).stdout
    advertising = register.split("## advertising", 1)[1].split("\n## ", 1)[0]
    assert "| Recipients | Nordic Outdoor Media AS (partner_export) |" in advertising
    assert "| Sale or sharing (CCPA) | yes |" in advertising
    assert "customers with an account, website visitors |" in advertising  # people
    assert "erased people suppressed by salted hash" in advertising  # safeguards
    assert "| Recipients | none outside the company |" in register.split("## advertising")[0]


def test_an_opt_out_request_is_answered_by_do_not_sell_or_suppress(kilde_server: Server) -> None:
    seller, objector = Person(), Person()
    for p in (seller, objector):
        send(kilde_server, {"type": "identify", "userId": p.user_id, "traits": {"email": p.email}})
    refresh_profiles(kilde_server)

    def opt_out(person: Person) -> str:
        body = {"kind": "opt_out", "law": "ccpa", "person": {"email": person.email}}
        logged = privacy(kilde_server, "requests", body)
        privacy(kilde_server, f"requests/{logged['id']}", {"verification": "verified"})
        request_id: str = logged["id"]
        return request_id

    sale = opt_out(seller)
    # another person's request, or one of another kind, is refused before anything changes
    other = kilde_server.kilde(
        "privacy", "do-not-sell", objector.email, "--request", sale, check=False
    )
    assert other.returncode == 1 and "not the one the request is about" in other.stderr
    status = privacy(kilde_server, "do-not-sell/status", {"email": objector.email})
    assert status["do_not_sell"] is False
    kilde_server.kilde("privacy", "do-not-sell", seller.email, "--request", sale)
    done = api(kilde_server, "GET", f"/api/privacy/requests/{sale}").json()
    assert (done["state"], done["outcome"]) == ("done", "opted out of sale or sharing")
    again = kilde_server.kilde(
        "privacy", "do-not-sell", seller.email, "--request", sale, check=False
    )
    assert again.returncode == 1 and "already closed" in again.stderr

    objection = opt_out(objector)
    kilde_server.kilde("privacy", "suppress", objector.email, "--request", objection)
    closed = api(kilde_server, "GET", f"/api/privacy/requests/{objection}").json()
    assert closed["state"] == "done" and closed["outcome"].startswith("suppressed")
    kept_out = send(
        kilde_server, {"type": "track", "userId": objector.user_id, "event": "Signed In"}
    )
    assert kept_out["stored"] == 0
