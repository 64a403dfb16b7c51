"""Retention from the plan: expired events and traits are deleted or anonymised, and reported;
the server does it on its own once a day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import DEMO_PLAN, Server, start_server
from tests.privacy_support import Person, api, events, refresh_profiles, send, until


def ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat()


def history(person: Person) -> list[dict[str, Any]]:
    """A page view past its 13 months, a product view within them, an order within its five
    years, a sign-up without a retention, a profile picture past its year and a new one."""
    return [
        {"type": "page", "userId": person.user_id, "name": "Old", "timestamp": ago(420)},
        {
            "type": "track",
            "userId": person.user_id,
            "event": "Product Viewed",
            "properties": {"product_id": "p1"},
            "timestamp": ago(360),
        },
        {
            "type": "track",
            "userId": person.user_id,
            "event": "Order Completed",
            "properties": {"order_id": f"o-{person.tag}", "revenue": 10, "currency": "NOK"},
            "timestamp": ago(1100),
        },
        {"type": "track", "userId": person.user_id, "event": "Signed Up", "timestamp": ago(2200)},
        {
            "type": "identify",
            "userId": person.user_id,
            "traits": {"email": person.email, "picture": "https://img.example/old.jpg"},
            "timestamp": ago(400),
        },
    ]


def test_retain_deletes_what_expired_and_reports_it(own_server: Server) -> None:
    person = Person()
    send(own_server, *history(person))
    refresh_profiles(own_server)

    dry = orjson.loads(own_server.kilde("privacy", "retain", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and dry["action"] == "delete"
    pages = next(e for e in dry["events"] if e["event"] == "page (any)")
    assert pages["retention"] == "13 months" and pages["expired"] == 1
    picture = next(t for t in dry["traits"] if t["trait"] == "picture")
    assert (picture["events"], picture["profiles"]) == (1, 1)
    assert dry["kept_without_retention"] >= 1  # the sign-up: the plan sets no limit
    assert len(events(own_server, user_id=person.user_id)) == 5  # a dry run changes nothing

    text = own_server.kilde("privacy", "retain").stdout
    assert "deleted 1 events and 2 trait values" in text
    left = {
        e["type"] if e["type"] != "track" else e["event"]: e
        for e in events(own_server, user_id=person.user_id)
    }
    assert set(left) == {"Product Viewed", "Order Completed", "Signed Up", "identify"}
    assert left["identify"]["traits"] == {"email": person.email}
    profile = api(own_server, "POST", "/api/profiles/lookup", json={"email": person.email}).json()
    (found,) = profile["profiles"]
    traits = api(own_server, "GET", f"/api/profiles/{found['profile_id']}").json()["traits"]
    assert "picture" not in traits and traits["email"]["value"] == person.email

    again = orjson.loads(own_server.kilde("privacy", "retain", "--json").stdout)
    assert again["expired_events"] == 0 and again["expired_traits"] == 0
    runs = api(own_server, "GET", "/api/privacy/retention").json()["runs"]
    assert [r["trigger"] for r in runs] == ["command", "command", "command"]
    assert [r["dry_run"] for r in runs] == [False, False, True]


def test_the_server_anonymises_on_its_daily_schedule(tmp_path: Path) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text(
        DEMO_PLAN.read_text().replace("retention_action: delete", "retention_action: anonymise")
    )
    server = start_server(
        tmp_path / "data", plan, KILDE_RETENTION_CHECK="1", KILDE_RETENTION_EVERY="2"
    )
    try:
        person = Person()
        send(
            server,
            {
                "type": "page",
                "userId": person.user_id,
                "anonymousId": person.anonymous_id,
                "name": "Old",
                "properties": {"path": "/jakker", "url": "https://fjordfell.example/jakker?e=x"},
                "context": {"traits": {"email": person.email}},
                "timestamp": ago(500),
            },
        )
        runs = until(
            lambda: [
                r
                for r in api(server, "GET", "/api/privacy/retention").json()["runs"]
                if r["trigger"] == "schedule" and r["report"]["expired_events"]
            ],
            "the scheduled retention run",
        )
        assert runs[0]["report"]["action"] == "anonymise"
        (kept,) = [e for e in events(server, type="page") if e["event"] == "Old"]
        assert kept["user_id"] is None and kept["anonymous_id"] is None and kept["ip"] is None
        assert kept["context"] == {"kilde": {"anonymised": True}} and kept["traits"] == {}
        assert kept["properties"] == {"path": "/jakker"}  # what it was stays countable
        assert person.email.lower() not in orjson.dumps(kept).decode().lower()
    finally:
        server.stop()
