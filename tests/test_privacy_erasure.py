"""Erasure: a person is gone from every table and from the bytes of every file, stays out, and
erasing is safe under load and idempotent."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson

from kilde.activate import hashing
from tests.conftest import BACKEND_KEY, DEMO_PLAN, Server, run_kilde, start_server
from tests.privacy_support import (
    SAMPLES,
    Person,
    api,
    contacts_csv,
    events,
    mid,
    privacy,
    refresh_profiles,
    scan,
    send,
    send_like_kjs,
    send_unparseable,
    submit_form,
    until,
)
from tests.test_activation import SECRET, Receiver


def lookup(server: Server, email: str) -> list[dict[str, Any]]:
    answer = api(server, "POST", "/api/profiles/lookup", json={"email": email})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["profiles"]
    return found


def leave_traces(server: Server, person: Person, tmp_path: Path) -> None:
    """Data of the person through every channel Kilde has, and in every kind of table."""
    send(
        server,
        {
            "type": "identify",
            "userId": person.user_id,
            "anonymousId": person.anonymous_id,
            "traits": {"email": person.email, "phone": person.phone, "name": "Ingrid Test"},
        },
        {
            "type": "track",
            "userId": person.user_id,
            "event": "Order Completed",
            "properties": {"order_id": f"o-{person.tag}", "revenue": 990, "currency": "NOK"},
        },
    )
    send_like_kjs(
        server,
        {"type": "page", "anonymousId": person.anonymous_id, "properties": {"path": "/jakker"}},
        {
            "type": "track",
            "event": "Consent Updated",
            "anonymousId": person.anonymous_id,
            "properties": {"purposes": {"marketing_email": True}, "banner_version": "v3"},
        },
    )
    # a record the plan refuses: a dead letter that carries the email
    rejected = send(
        server,
        {
            "type": "track",
            "userId": person.user_id,
            "event": "Order Completed",
            "properties": {"revenue": 10},
            "context": {"traits": {"email": person.email}},
        },
    )
    assert len(rejected["rejected"]) == 1
    send_unparseable(server, person)
    assert (
        submit_form(
            server,
            "newsletter",
            {"email": person.email, "first_name": "Ingrid"},
            visitor=person.anonymous_id,
        ).status_code
        == 200
    )
    crm = contacts_csv(tmp_path / f"crm-{person.tag}.csv", person)
    server.kilde(
        "import", "contacts", str(crm), "-s", "crm", "-m", str(SAMPLES / "crm.mapping.yaml")
    )
    mail = api(
        server,
        "POST",
        f"/api/email/campaigns/erase-{person.tag}/render",
        json={
            "html": '<p>Hei</p><a href="https://fjordfell.example/sale">Sale</a>',
            "recipients": [{"user_id": person.user_id}],
            "base_url": server.url,
        },
    )
    assert mail.status_code == 200, mail.text
    pixel = re.search(r'src="([^"]+/e/o/[^"]+)"', mail.json()["mails"][0]["html"])
    assert pixel is not None
    assert httpx.get(pixel.group(1).replace("&amp;", "&")).status_code == 200
    until(lambda: events(server, event="Email Opened", user_id=person.user_id), "the open")


def test_erasure_leaves_no_byte_of_the_person_in_any_file(
    own_server: Server, tmp_path: Path
) -> None:
    person, other = Person(), Person()
    leave_traces(own_server, person, tmp_path)
    leave_traces(own_server, other, tmp_path)
    refresh_profiles(own_server)
    assert len(lookup(own_server, person.email)) == 1
    assert scan(own_server.data_dir, person.needles())  # the scan does find what is there

    result = own_server.kilde("privacy", "erase", person.email, "--yes", "--json")
    report = orjson.loads(result.stdout)
    assert report["status"] == "erased" and report["compacted"] is True
    removed = report["removed"]
    for table in (
        "events",
        "dead_letters",
        "consent_ledger",
        "identity_map",
        "profiles",
        "profile_traits",
        "email_campaign_recipients",
    ):
        assert removed.get(table, 0) > 0, (table, removed)

    assert scan(own_server.data_dir, person.needles()) == []
    # nothing of the person through the API either, and the other customer is untouched
    assert lookup(own_server, person.email) == []
    assert events(own_server, user_id=person.user_id) == []
    assert events(own_server, anonymous_id=person.anonymous_id) == []
    assert len(lookup(own_server, other.email)) == 1
    assert len(events(own_server, user_id=other.user_id)) >= 3
    assert scan(own_server.data_dir, [other.email.lower().encode()])

    # the proof: when, how much, by whom; no personal data in it
    listed = api(own_server, "GET", "/api/privacy/erasures").json()["erasures"]
    assert [e["id"] for e in listed] == [report["erasure_id"]]
    audit = api(own_server, "GET", "/api/privacy/audit", params={"action": "erase"}).json()
    assert audit["entries"][0]["action"] == "POST /api/privacy/erase"
    assert person.email.lower() not in (orjson.dumps(listed) + orjson.dumps(audit)).decode().lower()

    # the person stays out: their records are dropped at the door and counted
    again = send(own_server, {"type": "identify", "userId": person.user_id, "traits": {}})
    assert again["stored"] == 0 and not again["rejected"]
    assert events(own_server, user_id=person.user_id) == []
    gate = api(own_server, "GET", "/api/privacy/gate").json()
    assert {"source": "backend", "channel": "http", "records": 1} in gate["suppressed_by_source"]


def test_erasing_again_unknown_people_and_partial_identifiers_get_correct_answers(
    own_server: Server,
) -> None:
    person = Person()
    send(
        own_server,
        {"type": "identify", "userId": person.user_id, "traits": {"email": person.email}},
    )
    # an erasure that answers a request: of the right kind, verified, then closed by it
    asked = privacy(own_server, "requests", {"kind": "erasure", "person": {"email": person.email}})
    access = privacy(own_server, "requests", {"kind": "access"})
    wrong = {"email": person.email, "request_id": access["id"]}
    assert privacy(own_server, "erase", wrong, status=409)["error"] == "wrong_request_kind"
    early = {"email": person.email, "request_id": asked["id"]}
    assert privacy(own_server, "erase", early, status=409)["error"] == "not_verified"
    assert events(own_server, user_id=person.user_id)  # refused: nothing was erased
    privacy(own_server, f"requests/{asked['id']}", {"verification": "verified"})
    first = privacy(own_server, "erase", {"email": person.email, "request_id": asked["id"]})
    assert first["status"] == "erased"
    closed = api(own_server, "GET", f"/api/privacy/requests/{asked['id']}").json()
    assert closed["state"] == "done" and closed["outcome"].startswith("erased")
    again = privacy(own_server, "erase", {"identifier": person.email.upper()})
    assert again["status"] == "already_erased"
    assert again["erasure_id"] == first["erasure_id"]
    by_id = privacy(own_server, "erase", {"user_id": person.user_id})
    assert by_id["status"] == "already_erased"

    stranger = Person()
    unknown = privacy(own_server, "erase", {"email": stranger.email}, status=404)
    assert unknown["error"] == "person_not_found"
    # a part of an email is not an email; a part of an id matches nobody (no prefix search)
    cut = stranger.email[: stranger.email.index("@") + 4]
    partial = privacy(own_server, "erase", {"identifier": cut}, status=400)
    assert partial["error"] == "invalid_identifier"
    prefix = privacy(own_server, "erase", {"identifier": person.user_id[:-3]}, status=404)
    assert prefix["error"] == "person_not_found"
    nothing = privacy(own_server, "erase", {}, status=400)
    assert nothing["error"] == "missing_identifier"
    cli = own_server.kilde("privacy", "erase", stranger.email, "--yes", check=False)
    assert cli.returncode == 1 and "Kilde holds nothing under that identifier" in cli.stderr
    for answer in (unknown, partial, cli.stderr):
        text = orjson.dumps(answer).decode().lower()
        assert stranger.email.lower() not in text and cut.lower() not in text
    assert stranger.email.lower() not in own_server.log_text().lower()


def test_a_shared_device_id_does_not_name_one_person(own_server: Server) -> None:
    tablet = f"anon-tablet-{Person().tag}"
    family = [Person() for _ in range(5)]
    send(
        own_server,
        *(
            {"type": "identify", "userId": p.user_id, "anonymousId": tablet, "traits": {}}
            for p in family
        ),
    )
    refresh_profiles(own_server)
    shared = privacy(own_server, "erase", {"anonymous_id": tablet}, status=409)
    assert shared["error"] == "shared_identifier"
    # one of the family is erased; the others and their shared tablet stay
    privacy(own_server, "erase", {"user_id": family[0].user_id})
    assert events(own_server, user_id=family[0].user_id) == []
    assert len(events(own_server, anonymous_id=tablet)) == 4


def test_erasure_under_concurrent_ingestion(own_server: Server) -> None:
    victim = Person()
    send(
        own_server,
        {
            "type": "identify",
            "userId": victim.user_id,
            "anonymousId": victim.anonymous_id,
            "traits": {"email": victim.email, "phone": victim.phone},
        },
        *(
            {
                "type": "track",
                "userId": victim.user_id,
                "event": "Product Viewed",
                "properties": {"product_id": f"p{i}"},
            }
            for i in range(20)
        ),
    )
    acknowledged: list[str] = []  # ids of other people's events the server acknowledged
    sent_for_victim = 0
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        nonlocal sent_for_victim
        with httpx.Client(base_url=own_server.url, auth=(BACKEND_KEY, ""), timeout=60) as client:
            n = 0
            while not stop.is_set():
                n += 1
                others: list[dict[str, Any]] = [
                    {
                        "type": "track",
                        "messageId": mid(),
                        "userId": f"load-{n % 7}",
                        "event": "Product Viewed",
                        "properties": {"product_id": f"x{n}"},
                    }
                    for _ in range(8)
                ]
                mine: list[dict[str, Any]] = [
                    {
                        "type": "track",
                        "messageId": mid(),
                        "userId": victim.user_id,
                        "event": "Product Viewed",
                        "properties": {"product_id": f"v{n}"},
                    },
                    {
                        "type": "page",
                        "messageId": mid(),
                        "anonymousId": victim.anonymous_id,
                        "context": {"traits": {"email": victim.email}},
                    },
                ]
                answer = client.post("/v1/batch", json={"batch": others + mine})
                if answer.status_code == 200:
                    acknowledged.extend(str(m["messageId"]) for m in others)
                    sent_for_victim += len(mine)
                elif answer.status_code != 503:  # busy while compacting: the client retries
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        until(lambda: len(acknowledged) > 100, "load before the erasure")
        report = privacy(own_server, "erase", {"email": victim.email})
        assert report["status"] == "erased" and report["compacted"]
        # right after the erasure: nothing of the victim, though the load goes on
        assert events(own_server, user_id=victim.user_id) == []
        count_after = len(acknowledged)
        until(lambda: len(acknowledged) > count_after + 100, "load after the erasure")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures[:3]

    assert events(own_server, user_id=victim.user_id) == []
    assert events(own_server, anonymous_id=victim.anonymous_id) == []
    refresh_profiles(own_server)
    assert lookup(own_server, victim.email) == []
    # every acknowledged record of the others is there (a 2xx means stored)
    stored: set[str] = set()
    for n in range(7):
        cursor = None
        while True:
            params = {
                "user_id": f"load-{n}",
                "limit": 1000,
                **({"cursor": cursor} if cursor else {}),
            }
            page = api(own_server, "GET", "/api/events", params=params).json()
            stored.update(e["message_id"] for e in page["events"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    assert set(acknowledged) <= stored
    # what the victim's devices sent after the door closed was counted, not stored
    gate = api(own_server, "GET", "/api/privacy/gate").json()
    suppressed = sum(row["records"] for row in gate["suppressed_by_source"])
    assert 0 < suppressed <= sent_for_victim
    assert scan(own_server.data_dir, victim.needles()) == []


def test_erase_and_export_work_in_process_without_a_server(tmp_path: Path) -> None:
    plan = tmp_path / "kilde.yaml"
    shutil.copy(DEMO_PLAN, plan)
    server = start_server(tmp_path / "data", plan)
    person = Person()
    try:
        send(
            server,
            {
                "type": "identify",
                "userId": person.user_id,
                "traits": {"email": person.email, "phone": person.phone},
            },
        )
    finally:
        server.stop()
    env = {"KILDE_DATA": str(tmp_path / "data"), "KILDE_PLAN": str(plan)}
    exported = run_kilde(
        "privacy", "export", person.user_id, "-o", str(tmp_path / "out.zip"), env=env
    )
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "out.zip").stat().st_size > 1000
    erased = run_kilde("privacy", "erase", person.phone, "--yes", env=env)
    assert erased.returncode == 0, erased.stderr
    assert "erased" in erased.stdout
    assert scan(tmp_path / "data", person.needles()) == []


class GmailUser(Person):
    """Google's customer lists drop the dots of Gmail addresses before hashing."""

    @property
    def email(self) -> str:
        return f"Ingrid.Test.{self.tag}@Gmail.com"


def test_erasure_reaches_deliveries_and_files_made_for_destinations(tmp_path: Path) -> None:
    """What activation made of the person: webhook deliveries and their log, the partner's
    Parquet file and the ad platform's customer list (hashed) under the data directory."""
    receiver = Receiver()
    plan = tmp_path / "kilde.yaml"
    plan.write_text(
        DEMO_PLAN.read_text()
        + f"""
destinations:
  - name: shop-hook
    kind: webhook
    purpose: order_fulfilment
    url: {receiver.url}
    secret: {SECRET}
    events: [Order Completed]
  - name: google-list
    kind: google_customer_match
    purpose: advertising
    segments: [repeat-buyers-90d]
  - name: partner-feed
    kind: partner_export
    purpose: advertising
    recipient: Nordic Outdoor Media AS
    segments: [repeat-buyers-90d]
    traits: [email, first_name, phone]
    format: parquet
"""
    )
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    person, other = GmailUser(), Person()
    try:
        for p in (person, other):
            send(
                server,
                {
                    "type": "identify",
                    "userId": p.user_id,
                    "traits": {"email": p.email, "phone": p.phone, "first_name": "Ingrid"},
                },
                {
                    "type": "track",
                    "event": "Consent Updated",
                    "userId": p.user_id,
                    "properties": {"purposes": {"advertising": True}},
                },
                *(
                    {
                        "type": "track",
                        "userId": p.user_id,
                        "event": "Order Completed",
                        "properties": {
                            "order_id": f"o{n}-{p.tag}",
                            "revenue": 900,
                            "currency": "NOK",
                        },
                    }
                    for n in range(2)
                ),
            )
        refresh_profiles(server)
        assert (
            api(
                server, "POST", "/api/segments/refresh", json={"segments": ["repeat-buyers-90d"]}
            ).status_code
            == 200
        )
        for name in ("google-list", "partner-feed"):
            synced = orjson.loads(server.kilde("destinations", "run", name, "--json").stdout)
            assert synced["syncs"][0]["added"] == 2, synced

        def delivered() -> bool:
            rows = api(server, "GET", "/api/destinations/shop-hook/deliveries").json()
            return len(rows["deliveries"]) >= 4 and all(
                r["state"] != "pending" for r in rows["deliveries"]
            )

        until(delivered, "the webhook deliveries", timeout=60)
        email = hashing.google_email(person.email)
        phone = hashing.e164(person.phone_e164)
        assert email and phone
        hashed = [hashing.sha256(email).encode(), hashing.sha256(phone).encode()]
        assert scan(server.data_dir / "exports", hashed)  # the customer list holds them

        result = server.kilde("privacy", "erase", person.email, "--yes")
        said = " ".join(result.stdout.split())
        assert (
            "sent before to google-list, partner-feed (Nordic Outdoor Media AS), shop-hook: "
            "ask them to delete it too" in said
        ), said
        report = privacy(server, "erase", {"email": person.email})  # the record of it
        assert [(n["destination"], n["recipient"]) for n in report["notify"]] == [
            ("google-list", None),
            ("partner-feed", "Nordic Outdoor Media AS"),
            ("shop-hook", None),
        ]
        assert report["removed"].get("deliveries", 0) == 2, report["removed"]
        assert report["removed"].get("audience_syncs", 0) >= 1, report["removed"]
        assert scan(server.data_dir, person.needles() + hashed) == []
        # the other customer is still in the files and the delivery history
        assert scan(server.data_dir, [other.email.lower().encode()])
        other_email = hashing.google_email(other.email)
        assert other_email
        assert scan(server.data_dir / "exports", [hashing.sha256(other_email).encode()])
        left = api(server, "GET", "/api/destinations/shop-hook/deliveries").json()["deliveries"]
        assert len(left) == 2
        # consent is checked at the moment of use: a withdrawal takes the other off the list
        privacy(server, "consent", {"email": other.email, "purposes": {"advertising": False}})
        synced = orjson.loads(server.kilde("destinations", "run", "google-list", "--json").stdout)
        (sync,) = synced["syncs"]
        assert (sync["members"], sync["added"], sync["removed"]) == (1, 0, 1), sync
        assert sync["excluded_no_consent"] + sync["excluded_do_not_sell"] == 1
        # sending people to partners is an export of personal data in the audit log
        audit = api(server, "GET", "/api/privacy/audit", params={"action": "destinations"})
        runs = [e for e in audit.json()["entries"] if e["action"].endswith("/run")]
        assert [e["personal_data"] for e in runs] == [True, True, True]
        # and every file made for a destination is in the log, also when the schedule made it
        exports = api(server, "GET", "/api/privacy/audit", params={"action": "EXPORT"}).json()
        made = [
            (e["action"], e["detail"]["rows_added"], e["detail"]["rows_removed"])
            for e in exports["entries"]
        ]
        assert sorted(made) == [
            ("EXPORT google_customer_match google-list", 0, 1),
            ("EXPORT google_customer_match google-list", 2, 0),
            ("EXPORT partner_export partner-feed", 2, 0),
        ]
        assert all(
            e["personal_data"] and e["actor"] == "kilde activation" for e in exports["entries"]
        )
        assert other.email.lower() not in orjson.dumps(exports).decode().lower()
    finally:
        server.stop()
        receiver.close()
