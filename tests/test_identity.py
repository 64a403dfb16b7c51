"""Identity resolution and profiles through the real server on loopback."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, APP_KEY, BACKEND_KEY, WEB_KEY, Server, start_server

BROKER_KEY = "demo-databroker-write-key"
# A busy 2-core machine can take seconds to answer; no test here measures time.
TIMEOUT = 60.0


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def send(server: Server, key: str, *messages: dict[str, Any]) -> None:
    batch = [{"messageId": uid("m"), **m} for m in messages]
    response = httpx.post(
        f"{server.url}/v1/batch", json={"batch": batch}, auth=(key, ""), timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body["rejected"], body["rejected"]


def lookup(server: Server, **ids: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{server.url}/api/profiles/lookup", json=ids, headers=server.admin, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    profiles: list[dict[str, Any]] = response.json()["profiles"]
    return profiles


def until(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll until `check` returns something truthy (the engine works in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def profile(server: Server, profile_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{server.url}/api/profiles/{profile_id}", headers=server.admin, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def timeline(server: Server, profile_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/profiles/{profile_id}/events",
        params={"limit": 1000},
        headers=server.admin,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def conflicts(server: Server, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/merge-conflicts", params=params, headers=server.admin, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["conflicts"]
    return found


def ids_of(found: dict[str, Any]) -> set[tuple[str, str]]:
    return {(i["type"], i["value"]) for i in found["identities"]}


def test_browse_signup_buy_and_support_on_another_device_is_one_profile(
    kilde_server: Server,
) -> None:
    laptop, phone, user = uid("laptop"), uid("phone"), uid("user")
    email = f"{uid('ingrid')}@example.com"
    send(
        kilde_server,
        WEB_KEY,
        {"type": "page", "anonymousId": laptop, "name": "Home", "properties": {"path": "/"}},
        {
            "type": "track",
            "anonymousId": laptop,
            "event": "Product Viewed",
            "properties": {"product_id": "p-ten-0", "category": "tents", "price": 3490},
        },
        {
            "type": "identify",
            "anonymousId": laptop,
            "userId": user,
            "traits": {"email": email, "first_name": "Ingrid", "city": "Bergen"},
        },
        {"type": "track", "userId": user, "anonymousId": laptop, "event": "Signed Up"},
    )
    send(
        kilde_server,
        BACKEND_KEY,
        {
            "type": "track",
            "userId": user,
            "event": "Order Completed",
            "properties": {"order_id": uid("o"), "revenue": 3490.0, "currency": "NOK"},
        },
    )
    # Support, weeks later, on her phone: she gives the same email, typed differently.
    send(
        kilde_server,
        APP_KEY,
        {"type": "identify", "anonymousId": phone, "traits": {"email": f"  {email.upper()} "}},
        {"type": "screen", "anonymousId": phone, "name": "Support"},
    )

    def merged() -> list[dict[str, Any]] | None:
        found = lookup(kilde_server, anonymous_id=phone)
        if found and found[0]["events"] == 7:
            return found
        return None

    found = until(merged, "the phone to join the profile")
    assert len(found) == 1
    pid = found[0]["profile_id"]
    for ids in ({"email": email}, {"user_id": user}, {"anonymous_id": laptop}):
        assert [p["profile_id"] for p in lookup(kilde_server, **ids)] == [pid]
    shown = profile(kilde_server, pid)
    assert {("anonymous_id", laptop), ("anonymous_id", phone), ("user_id", user)} <= ids_of(shown)
    assert ("email", email.lower()) in ids_of(shown)
    assert shown["traits"]["first_name"]["value"] == "Ingrid"
    assert shown["traits"]["first_name"]["source"] == "web"
    assert shown["traits"]["first_name"]["tier"] == "person"
    computed = shown["computed"]
    assert computed["orders"] == 1
    assert computed["total_revenue"] == pytest.approx(3490.0)
    assert computed["average_order_value"] == pytest.approx(3490.0)
    assert computed["page_views"] == 1 and computed["screen_views"] == 1
    assert computed["favourite_categories"] == ["tents"]
    assert computed["channels"] == ["app", "backend", "web"]
    events = timeline(kilde_server, pid)
    assert len(events) == 7
    assert {e["source"] for e in events} == {"web", "backend", "app"}
    times = [e["timestamp"] for e in events]
    assert times == sorted(times, reverse=True)


def test_a_kiosk_device_and_junk_values_merge_nobody(kilde_server: Server) -> None:
    kiosk = uid("kiosk")
    people = [uid("user") for _ in range(5)]
    for user in people:
        send(
            kilde_server,
            WEB_KEY,
            {"type": "page", "anonymousId": kiosk, "name": "Home"},
            {"type": "identify", "anonymousId": kiosk, "userId": user},
        )
    # Junk: two strangers who both typed test@test.com, and clients that sent "null" ids.
    a, b = uid("anon"), uid("anon")
    send(
        kilde_server,
        WEB_KEY,
        {"type": "identify", "anonymousId": a, "traits": {"email": "test@test.com"}},
        {"type": "identify", "anonymousId": b, "traits": {"email": "Test@Test.com"}},
        {"type": "identify", "anonymousId": a, "userId": "null"},
        {"type": "identify", "anonymousId": b, "userId": "undefined"},
        {"type": "identify", "anonymousId": a, "traits": {"phone": "0000000000"}},
        {"type": "identify", "anonymousId": b, "traits": {"phone": "0000000000"}},
    )

    def settled() -> bool:
        profiles = [lookup(kilde_server, user_id=u) for u in people]
        kiosk_found = lookup(kilde_server, anonymous_id=kiosk)
        return (
            all(len(p) == 1 for p in profiles)
            and len(kiosk_found) == 1
            and bool(lookup(kilde_server, anonymous_id=b))
        )

    until(settled, "the kiosk users' profiles")
    ids = {lookup(kilde_server, user_id=u)[0]["profile_id"] for u in people}
    assert len(ids) == 5, "five people on one kiosk stay five profiles"
    kiosk_profile = lookup(kilde_server, anonymous_id=kiosk)[0]
    assert kiosk_profile["profile_id"] not in ids
    assert kiosk_profile["shared"] is True
    for pid in ids:
        assert kiosk not in {v for _, v in ids_of(profile(kilde_server, pid))}
    shared = [
        c for c in conflicts(kilde_server, reason="shared_identifier") if c["id_value"] == kiosk
    ]
    assert shared and "5 different" in shared[0]["detail"]
    pa, pb = lookup(kilde_server, anonymous_id=a), lookup(kilde_server, anonymous_id=b)
    assert pa[0]["profile_id"] != pb[0]["profile_id"]
    assert ("email", "test@test.com") not in ids_of(profile(kilde_server, pa[0]["profile_id"]))
    response = httpx.post(
        f"{kilde_server.url}/api/profiles/lookup",
        json={"email": "test@test.com"},
        headers=kilde_server.admin,
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_identifier"
    assert "test@test.com" not in response.text
    status = orjson.loads(kilde_server.kilde("identity", "status", "--json").stdout)
    dropped = {(d["field"], d["reason"]) for d in status["dropped"]}
    assert {("userId", "junk"), ("traits.email", "junk"), ("traits.phone", "junk")} <= dropped
    assert "test@test.com" not in str(status)


def test_a_family_laptop_keeps_two_people_apart_and_records_why(kilde_server: Server) -> None:
    laptop, mum, son = uid("laptop"), uid("mum"), uid("son")
    send(
        kilde_server,
        WEB_KEY,
        {
            "type": "identify",
            "anonymousId": laptop,
            "userId": mum,
            "timestamp": "2026-03-01T10:00:00Z",
        },
        {
            "type": "identify",
            "anonymousId": laptop,
            "userId": son,
            "timestamp": "2026-03-02T10:00:00Z",
        },
    )
    until(lambda: lookup(kilde_server, user_id=son), "the son's profile")
    mum_p = lookup(kilde_server, user_id=mum)[0]["profile_id"]
    son_p = lookup(kilde_server, user_id=son)[0]["profile_id"]
    assert mum_p != son_p
    assert [p["profile_id"] for p in lookup(kilde_server, anonymous_id=laptop)] == [mum_p]
    refused = conflicts(kilde_server, profile_id=son_p)
    assert [c["reason"] for c in refused] == ["limit_exceeded"]
    assert refused[0]["id_value"] == laptop
    assert "2 user_id identifiers (limit 1)" in refused[0]["detail"]
    shown = profile(kilde_server, mum_p)
    assert shown["conflicts"][0]["reason"] == "limit_exceeded"


def test_aliases_circular_and_to_another_known_person_are_refused(kilde_server: Server) -> None:
    anon, old, new = uid("anon"), uid("old"), uid("new")
    a_user, b_user, b_anon = uid("ann"), uid("bob"), uid("bob-anon")
    send(
        kilde_server,
        WEB_KEY,
        {"type": "page", "anonymousId": anon, "timestamp": "2026-03-01T10:00:00Z"},
        {"type": "alias", "previousId": anon, "userId": old, "timestamp": "2026-03-01T10:01:00Z"},
        {"type": "alias", "previousId": old, "userId": old, "timestamp": "2026-03-01T10:02:00Z"},
        # Bob is a known person with his own device; an alias points Bob's device at Ann.
        {
            "type": "identify",
            "anonymousId": b_anon,
            "userId": b_user,
            "timestamp": "2026-03-01T11:00:00Z",
        },
        {"type": "identify", "userId": a_user, "timestamp": "2026-03-01T11:30:00Z"},
        {
            "type": "alias",
            "previousId": b_anon,
            "userId": a_user,
            "timestamp": "2026-03-01T12:00:00Z",
        },
        # A ring: new -> old and old -> new
        {"type": "identify", "userId": new, "timestamp": "2026-03-01T13:00:00Z"},
        {"type": "alias", "previousId": new, "userId": old, "timestamp": "2026-03-01T13:01:00Z"},
        {"type": "alias", "previousId": old, "userId": new, "timestamp": "2026-03-01T13:02:00Z"},
    )
    until(lambda: lookup(kilde_server, user_id=new), "the alias profiles")
    old_p = lookup(kilde_server, user_id=old)[0]["profile_id"]
    assert [p["profile_id"] for p in lookup(kilde_server, anonymous_id=anon)] == [old_p]
    bob = lookup(kilde_server, user_id=b_user)[0]["profile_id"]
    ann = lookup(kilde_server, user_id=a_user)[0]["profile_id"]
    assert bob != ann
    assert [p["profile_id"] for p in lookup(kilde_server, anonymous_id=b_anon)] == [bob]
    reasons = {(c["reason"], c["id_value"]) for c in conflicts(kilde_server, limit=1000)}
    assert ("alias_to_other_person", b_anon) in reasons
    assert ("circular_alias", old) in reasons  # old -> old
    assert ("circular_alias", old) in reasons or ("circular_alias", new) in reasons
    assert lookup(kilde_server, user_id=new)[0]["profile_id"] != old_p  # one user id each


def test_traits_follow_precedence_person_over_company_over_broker(kilde_server: Server) -> None:
    user = uid("user")
    send(
        kilde_server,
        WEB_KEY,
        {
            "type": "identify",
            "userId": user,
            "traits": {"city": "Bergen", "first_name": "Nora"},
            "timestamp": "2026-01-01T10:00:00Z",
        },
        {
            "type": "identify",
            "userId": user,
            "traits": {"first_name": "Nora Marie"},
            "timestamp": "2026-02-01T10:00:00Z",
        },
    )
    send(
        kilde_server,
        BACKEND_KEY,
        {
            "type": "identify",
            "userId": user,
            "traits": {"city": "Oslo", "last_name": "Berg"},
            "timestamp": "2026-03-01T10:00:00Z",
        },
    )

    send(
        kilde_server,
        BROKER_KEY,
        {
            "type": "identify",
            "userId": user,
            "traits": {"city": "Tromsø"},
            "timestamp": "2026-04-01T10:00:00Z",
        },
    )

    def ready() -> dict[str, Any] | None:
        found = lookup(kilde_server, user_id=user)
        if not found:
            return None
        shown = profile(kilde_server, found[0]["profile_id"])
        city = shown["traits"].get("city", {})
        return shown if "last_name" in shown["traits"] and city["candidates"] == 3 else None

    shown = until(ready, "the backend's and the broker's traits")
    traits = shown["traits"]
    assert traits["city"]["value"] == "Bergen"  # what she told us beats the newer record
    assert traits["city"]["candidates"] == 3
    assert traits["first_name"]["value"] == "Nora Marie"  # newer wins within a tier
    assert traits["last_name"] == {
        **traits["last_name"],
        "value": "Berg",
        "source": "backend",
        "tier": "company",
    }


def test_unmerge_splits_a_wrong_merge_for_good(own_server: Server) -> None:
    shared_email = "the.hansens@example.com"
    dad, daughter = uid("dad"), uid("daughter")
    send(
        own_server,
        WEB_KEY,
        {"type": "identify", "anonymousId": dad, "traits": {"email": shared_email}},
        {"type": "page", "anonymousId": dad, "name": "Home"},
        {"type": "identify", "anonymousId": daughter, "traits": {"email": shared_email}},
        {"type": "page", "anonymousId": daughter, "name": "Home"},
    )

    def one_profile() -> list[dict[str, Any]] | None:
        found = lookup(own_server, anonymous_id=daughter)
        return found if found and found[0]["identifiers"] == 4 else None

    merged = until(one_profile, "the family merge")[0]["profile_id"]
    result = own_server.kilde(
        "profile", "unmerge", merged, f"anonymous_id:{daughter}", "--reason", "two people"
    )
    assert "split off into" in result.stdout
    dad_p = lookup(own_server, anonymous_id=dad)[0]["profile_id"]
    daughter_p = lookup(own_server, anonymous_id=daughter)[0]["profile_id"]
    assert dad_p == merged and daughter_p != merged
    assert [c["reason"] for c in conflicts(own_server, profile_id=daughter_p)] == ["unmerged"]
    # A new event of the daughter's does not re-merge, and neither does a full rebuild.
    send(
        own_server,
        WEB_KEY,
        {"type": "identify", "anonymousId": daughter, "traits": {"email": shared_email}},
    )
    own_server.kilde("profiles", "rebuild")
    assert lookup(own_server, anonymous_id=daughter)[0]["profile_id"] == daughter_p
    assert lookup(own_server, anonymous_id=dad)[0]["profile_id"] == dad_p
    bad = httpx.post(
        f"{own_server.url}/api/profiles/{dad_p}/unmerge",
        json={"identifiers": ["not-an-identifier"]},
        headers=own_server.admin,
        timeout=TIMEOUT,
    )
    assert bad.status_code == 400 and bad.json()["fix"]
    alone = httpx.post(
        f"{own_server.url}/api/profiles/{daughter_p}/unmerge",
        json={"identifiers": [f"anonymous_id:{dad}"]},
        headers=own_server.admin,
        timeout=TIMEOUT,
    )
    assert alone.status_code == 409 and alone.json()["error"] == "cannot_unmerge"


def test_merged_away_profile_ids_redirect(kilde_server: Server) -> None:
    first, second, user = uid("first"), uid("second"), uid("user")
    send(
        kilde_server,
        WEB_KEY,
        {"type": "page", "anonymousId": second, "timestamp": "2026-04-02T10:00:00Z"},
        {"type": "page", "anonymousId": first, "timestamp": "2026-04-01T10:00:00Z"},
    )
    until(lambda: lookup(kilde_server, anonymous_id=first), "the first device")
    until(lambda: lookup(kilde_server, anonymous_id=second), "the second device")
    old_second = lookup(kilde_server, anonymous_id=second)[0]["profile_id"]
    old_first = lookup(kilde_server, anonymous_id=first)[0]["profile_id"]
    send(
        kilde_server,
        WEB_KEY,
        {"type": "identify", "anonymousId": second, "userId": user},
        {"type": "identify", "anonymousId": first, "userId": user},
    )
    until(
        lambda: lookup(kilde_server, anonymous_id=second)[0]["profile_id"] == old_first,
        "the merge",
    )
    # The earliest identifier anchors the merged profile, so its id stays; the other redirects.
    moved = profile(kilde_server, old_second)
    assert moved["profile_id"] == old_first
    assert moved["redirected_from"] == old_second
    missing = httpx.get(
        f"{kilde_server.url}/api/profiles/p_doesnotexist",
        headers=kilde_server.admin,
        timeout=TIMEOUT,
    )
    assert missing.status_code == 404 and missing.json()["fix"]


def test_profile_show_cli_and_no_personal_data_in_the_log(kilde_server: Server) -> None:
    user = uid("user")
    email = f"{uid('astrid')}@example.com"
    send(
        kilde_server,
        WEB_KEY,
        {
            "type": "identify",
            "userId": user,
            "traits": {"email": email, "first_name": "Astrid", "last_name": "Lund"},
        },
    )
    until(lambda: lookup(kilde_server, email=email), "the profile")
    # The GET form works too (discouraged: personal data in URLs), and is not logged.
    response = httpx.get(
        f"{kilde_server.url}/api/profiles",
        params={"email": email},
        headers=kilde_server.admin,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200 and response.json()["count"] == 1
    result = kilde_server.kilde("profile", "show", email)
    out = result.stdout
    assert "Astrid Lund" in out
    assert "Identities" in out and "Traits" in out and "Timeline" in out
    assert "person" in out  # the tier of the traits
    found = kilde_server.kilde("profile", "search", email.split("@")[0], "--json")
    assert [p["email"] for p in orjson.loads(found.stdout)] == [email]
    assert email not in kilde_server.log_text()
    unknown = kilde_server.kilde("profile", "show", f"{uid('nobody')}@example.com", check=False)
    assert unknown.returncode == 1 and "fix:" in unknown.stderr


def test_admin_token_is_required(kilde_server: Server) -> None:
    for method, path in (("GET", "/api/merge-conflicts"), ("POST", "/api/profiles/lookup")):
        response = httpx.request(
            method, f"{kilde_server.url}{path}", json={"email": "x@y.no"}, timeout=TIMEOUT
        )
        assert response.status_code == 401
    wrong = httpx.post(
        f"{kilde_server.url}/api/profiles/lookup",
        json={},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=TIMEOUT,
    )
    assert wrong.status_code == 400 and wrong.json()["error"] == "missing_identifier"


def test_demo_identity_accuracy_against_truth(own_server: Server) -> None:
    own_server.kilde("demo", "--customers", "150", "--days", "60")
    result = own_server.kilde("identity", "report", "--json")
    report = orjson.loads(result.stdout)
    assert report["people"] == 150
    assert report["precision"] >= 0.95, report
    assert report["recall"] >= 0.85, report
    assert report["profiles_mixed"] <= 15, report
    readable = own_server.kilde("identity", "report")
    assert "precision" in readable.stdout and "recall" in readable.stdout


def test_a_form_signup_links_the_browsing_cookie_the_order_and_the_phone(
    kilde_server: Server,
) -> None:
    """The hosted signup form carries the browsing cookie; the order system sends the email in
    context.traits (Segment's convention for server calls); support runs on the phone app."""
    cookie, phone, user = uid("cookie"), uid("phone"), uid("user")
    email = f"{uid('sara')}@example.com"
    send(kilde_server, WEB_KEY, {"type": "page", "anonymousId": cookie, "name": "Home"})
    browser = httpx.Client(
        base_url=kilde_server.url, cookies={"kilde_aid": cookie}, timeout=TIMEOUT
    )
    page = browser.get("/f/newsletter")
    assert page.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    signed_up = browser.post(
        "/f/newsletter", data={"csrf": token.group(1), "email": email, "first_name": "Sara"}
    )
    assert signed_up.status_code == 200
    send(
        kilde_server,
        BACKEND_KEY,
        {
            "type": "track",
            "userId": user,
            "event": "Order Completed",
            "properties": {"order_id": uid("o"), "revenue": 990.0, "currency": "NOK"},
            "context": {"traits": {"email": email}},
        },
    )
    send(
        kilde_server,
        APP_KEY,
        {"type": "identify", "anonymousId": phone, "traits": {"email": email}},
        {"type": "screen", "anonymousId": phone, "name": "Support chat"},
    )

    def joined() -> list[dict[str, Any]] | None:
        found = lookup(kilde_server, user_id=user)
        if found and lookup(kilde_server, anonymous_id=phone) == found:
            return found if lookup(kilde_server, anonymous_id=cookie) == found else None
        return None

    pid = until(joined, "cookie, order and phone on one profile")[0]["profile_id"]
    shown = profile(kilde_server, pid)
    assert shown["traits"]["first_name"]["source"] == "forms"
    assert shown["consents"]["marketing_email"]["state"] == "denied"  # the unticked box
    events = timeline(kilde_server, pid)
    kinds = {(e["source"], e["type"], e["event"]) for e in events}
    assert ("web", "page", "Home") in kinds
    assert ("backend", "track", "Order Completed") in kinds
    assert ("app", "screen", "Support chat") in kinds
    assert any(source == "forms" for source, _, _ in kinds)


def test_status_says_how_many_events_identity_resolution_has_not_read_yet(
    tmp_path: Path,
) -> None:
    # Background resolution off, so the events wait until a refresh reads them.
    server = start_server(tmp_path / "data", KILDE_IDENTITY_BACKGROUND="0")
    try:
        user = uid("lag")
        send(
            server,
            WEB_KEY,
            *(
                {"type": "page", "userId": user, "name": f"Page {n}", "messageId": f"{user}-{n}"}
                for n in range(5)
            ),
        )

        def status() -> dict[str, Any]:
            response = httpx.get(
                f"{server.url}/api/identity/status", headers=server.admin, timeout=TIMEOUT
            )
            assert response.status_code == 200, response.text
            result: dict[str, Any] = response.json()
            return result

        assert status()["unread_events"] == 5
        assert lookup(server, user_id=user) == []
        refreshed = httpx.post(
            f"{server.url}/api/profiles/refresh", headers=server.admin, timeout=TIMEOUT
        )
        assert refreshed.json() == {"up_to_date": True}
        assert status()["unread_events"] == 0
        assert len(lookup(server, user_id=user)) == 1
        printed = " ".join(server.kilde("identity", "status").stdout.split())  # Rich wraps
        assert "1 profiles, 1 identifiers" in printed
        assert "0 events not read yet" in printed
    finally:
        server.stop()
