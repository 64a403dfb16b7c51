"""Subject access: the export holds every kind of datum the person has, as it was sent in."""

from __future__ import annotations

import csv
import io
import re
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import Server
from tests.privacy_support import (
    SAMPLES,
    Person,
    api,
    broker_csv,
    contacts_csv,
    events,
    privacy,
    refresh_profiles,
    send,
    send_like_kjs,
    send_unparseable,
    submit_form,
    until,
)


def read_zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}


def test_the_export_holds_everything_that_was_sent_in(own_server: Server, tmp_path: Path) -> None:
    p = Person()
    city = f"Tromsø-{p.tag}"
    sent: dict[str, str] = {}  # what -> messageId

    def one(key: str, message: dict[str, Any], *, kjs: bool = False) -> None:
        message = {"messageId": f"{key}-{p.tag}", **message}
        sent[key] = message["messageId"]
        (send_like_kjs if kjs else send)(own_server, message)

    one(
        "identify",
        {
            "type": "identify",
            "userId": p.user_id,
            "anonymousId": p.anonymous_id,
            "traits": {"email": p.email, "phone": p.phone, "name": "Ingrid Test", "city": city},
        },
    )
    one("page", {"type": "page", "anonymousId": p.anonymous_id, "name": "Jackets"}, kjs=True)
    one(
        "consent",
        {
            "type": "track",
            "event": "Consent Updated",
            "anonymousId": p.anonymous_id,
            "properties": {"purposes": {"marketing_email": True}, "banner_version": "banner-7"},
        },
        kjs=True,
    )
    one(
        "order",
        {
            "type": "track",
            "userId": p.user_id,
            "event": "Order Completed",
            "properties": {"order_id": f"o-{p.tag}", "revenue": 1250.5, "currency": "NOK"},
        },
    )
    rejected = send(
        own_server,
        {
            "type": "track",
            "userId": p.user_id,
            "event": "Order Completed",
            "properties": {"revenue": -1, "note": f"broken-{p.tag}"},
        },
    )["rejected"]
    assert len(rejected) == 1
    send_unparseable(own_server, p)
    answer = submit_form(
        own_server,
        "b2b-lead",
        {
            "name": "Ingrid Test",
            "email": p.email,
            "company": "Skolen",
            "size": "11-50",
            "needs": f"Jackets for a class, ref {p.tag}",
        },
        visitor=p.anonymous_id,
    )
    assert answer.status_code == 200, answer.text
    crm = contacts_csv(tmp_path / "crm.csv", p)
    own_server.kilde(
        "import", "contacts", str(crm), "-s", "crm", "-m", str(SAMPLES / "crm.mapping.yaml")
    )
    own_server.kilde(
        "import",
        "broker",
        str(broker_csv(tmp_path / "broker.csv", p)),
        "-s",
        "databroker",
        "-m",
        str(SAMPLES / "broker.mapping.yaml"),
    )
    campaign = f"spring-{p.tag}"
    mail = api(
        own_server,
        "POST",
        f"/api/email/campaigns/{campaign}/render",
        json={
            "html": "<p>Hei</p>",
            "recipients": [{"user_id": p.user_id}],
            "base_url": own_server.url,
        },
    ).json()["mails"][0]["html"]
    pixel = re.search(r'src="([^"]+/e/o/[^"]+)"', mail)
    assert pixel is not None
    httpx.get(pixel.group(1).replace("&amp;", "&"))
    until(lambda: events(own_server, event="Email Opened", user_id=p.user_id), "the open")
    segment = f"city-{p.tag}"
    saved = api(
        own_server,
        "PUT",
        f"/api/segments/{segment}",
        json={"name": "People of one town", "rule": {"trait": "city", "equals": city}},
    )
    assert saved.status_code == 200, saved.text
    refresh_profiles(own_server)
    assert api(own_server, "POST", "/api/insights/refresh").status_code == 200

    target = tmp_path / "export.zip"
    own_server.kilde("privacy", "export", p.email, "-o", str(target))
    files = read_zip(target.read_bytes())
    data = {
        name[:-5]: orjson.loads(content)
        for name, content in files.items()
        if name.endswith(".json")
    }

    # every message sent in, as it was sent
    by_id = {e["message_id"]: e for e in data["events"]}
    for key, message_id in sent.items():
        assert message_id in by_id, key
    assert by_id[sent["identify"]]["traits"]["phone"] == p.phone
    assert by_id[sent["order"]]["properties"]["revenue"] == 1250.5
    assert by_id[sent["page"]]["source"] == "web"
    # the profile, its traits with their sources, the identifiers
    traits = {(t["name"], orjson.dumps(t["value"]).decode()): t["source"] for t in data["traits"]}
    assert traits[("city", f'"{city}"')] == "backend"
    assert ("household_size", "3") in traits
    assert {(i["type"], i["value"]) for i in data["identities"]} >= {
        ("user_id", p.user_id),
        ("anonymous_id", p.anonymous_id),
        ("email", p.email.lower()),
        ("phone", p.phone_e164),
    }
    assert sum(profile["orders"] or 0 for profile in data["profile"]) == 1
    # consents: the banner's grant and the form's unticked box, with their evidence
    choices = [(c["purpose"], c["state"], c["evidence"]) for c in data["consents"]]
    assert ("marketing_email", "granted", "banner-7") in choices
    assert ("marketing_email", "withdrawn", "form:b2b-lead") in choices
    # form answers, imports with provenance, segments, scores, dead letters, email
    answers = [a.get("answers") for a in data["form_answers"]]
    assert {"needs": f"Jackets for a class, ref {p.tag}"} in answers
    sources = {i["source"]: i for i in data["imports"]}
    assert sources["crm"]["traits"]["email"] == p.email
    assert sources["databroker"]["provenance"]["broker"] == "Nordic Data AS"
    assert sources["databroker"]["import_run"]["licence_expires_on"] == "2030-09-30"
    assert [s["segment_id"] for s in data["segments"]] == [segment]
    assert {s["kind"] for s in data["scores"]} == {"computed traits", "insights"}
    reasons = [d["reason"] for d in data["dead_letters"]]
    assert len(reasons) == 2 and reasons[0] == rejected[0]["message"]
    assert f"broken-{p.tag}" in data["dead_letters"][0]["payload"]
    assert p.email in data["dead_letters"][1]["payload"]  # the body that was not even JSON
    assert [e["campaign_id"] for e in data["email"]] == [campaign]

    # every part also as CSV, and a page a person can read
    for name in data:
        if name != "summary":
            rows = list(csv.DictReader(io.StringIO(files[f"{name}.csv"].decode())))
            assert len(rows) == len(data[name]), name
    page = files["index.html"].decode()
    assert "Your data at Fjord &amp; Fell" in page
    assert city in page and "privacy@fjordfell.example" in page
    assert "withdrawn" in page and "form:b2b-lead" in page  # their latest choice
    assert data["summary"]["counts"]["events"] == len(data["events"])

    # the export itself is in the audit log, without the person's data
    audit = api(own_server, "GET", "/api/privacy/audit", params={"action": "export"}).json()
    entry = audit["entries"][0]
    assert entry["personal_data"] is True and entry["detail"]["counts"]["events"] >= 7
    assert p.email.lower() not in orjson.dumps(audit).decode().lower()


def test_export_answers_for_unknown_and_ambiguous_people(own_server: Server) -> None:
    unknown = privacy(own_server, "export", {"email": Person().email}, status=404)
    assert unknown["error"] == "person_not_found"
    twins = Person()
    send(
        own_server,
        {"type": "identify", "userId": twins.tag, "traits": {"email": twins.email}},
        {"type": "page", "anonymousId": twins.tag},
    )
    refresh_profiles(own_server)
    ambiguous = privacy(own_server, "export", {"identifier": twins.tag}, status=409)
    assert ambiguous["error"] == "ambiguous_identifier"
    found = privacy(own_server, "export", {"identifier": f"user_id:{twins.tag}", "format": "json"})
    assert [e["type"] for e in found["sections"]["events"]] == ["identify"]


def test_a_consent_withdrawal_racing_an_export_is_in_it_whole_or_not_at_all(
    own_server: Server,
) -> None:
    p = Person()
    send(own_server, {"type": "identify", "userId": p.user_id, "traits": {"email": p.email}})
    refresh_profiles(own_server)
    stop = threading.Event()
    sent: list[str] = []
    exports: list[dict[str, Any]] = []

    def choose() -> None:  # grant, withdraw, grant, ... as fast as the server takes them
        n = 0
        # 400 choices, and on until three exports raced them (a busy machine slows exports)
        deadline = time.monotonic() + 180
        while not stop.is_set() and (n < 400 or len(exports) < 3) and time.monotonic() < deadline:
            n += 1
            message = {
                "type": "track",
                "event": "Consent Updated",
                "messageId": f"choice-{n}-{p.tag}",
                "userId": p.user_id,
                "properties": {"purposes": {"marketing_email": n % 2 == 1}},
            }
            send(own_server, message)
            sent.append(message["messageId"])

    chooser = threading.Thread(target=choose)
    chooser.start()
    try:
        until(lambda: len(sent) > 3, "the first choices")
        while len(exports) < 12 and chooser.is_alive():
            body = {"email": p.email, "format": "json"}
            exports.append(privacy(own_server, "export", body))
    finally:
        stop.set()
        chooser.join(timeout=60)
    assert len(exports) >= 3
    for found in exports:
        sections = found["sections"]
        # each choice is an event and a ledger row, written together: both or neither
        as_events = {e["message_id"] for e in sections["events"] if e["event"] == "Consent Updated"}
        as_rows = {c["message_id"] for c in sections["consents"]}
        assert as_events == as_rows
        latest = sections["consents"][-1]["state"]
        assert found["summary"]["consent"]["marketing_email"]["state"] == latest
        assert found["summary"]["counts"]["consents"] == len(as_rows)
    counted = [f["summary"]["counts"]["consents"] for f in exports]
    assert counted == sorted(counted)  # later exports see at least what earlier ones saw
