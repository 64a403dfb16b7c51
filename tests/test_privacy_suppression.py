"""Suppression: after an erasure (or `kilde privacy suppress`), nothing of the person gets in
again through any channel, and every record kept out is counted per source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import BACKEND_KEY, Server
from tests.privacy_support import (
    SAMPLES,
    Person,
    api,
    broker_csv,
    contacts_csv,
    events,
    privacy,
    scan,
    send,
    send_like_kjs,
    submit_form,
)

BROKER_TERMS = ["-m", str(SAMPLES / "broker.mapping.yaml")]


def import_json(server: Server, kind: str, file: Path, *args: str) -> dict[str, Any]:
    result = server.kilde("import", kind, str(file), *args, "--json")
    summary: dict[str, Any] = orjson.loads(result.stdout)
    return summary


def test_an_erased_person_is_kept_out_of_every_channel(own_server: Server, tmp_path: Path) -> None:
    person, newcomer, bought = Person(), Person(), Person()
    send(
        own_server,
        {
            "type": "identify",
            "userId": person.user_id,
            "anonymousId": person.anonymous_id,
            "traits": {"email": person.email, "phone": person.phone},
        },
    )
    mail = api(
        own_server,
        "POST",
        f"/api/email/campaigns/out-{person.tag}/render",
        json={
            "html": "<p>Hei</p>",
            "recipients": [{"user_id": person.user_id}],
            "base_url": own_server.url,
        },
    ).json()["mails"][0]["html"]
    pixel = re.search(r'src="([^"]+/e/o/[^"]+)"', mail)
    assert pixel is not None
    assert privacy(own_server, "erase", {"email": person.email})["status"] == "erased"

    # 1. the HTTP API (a server SDK, write key as Basic auth)
    answer = httpx.post(
        f"{own_server.url}/v1/track",
        json={"userId": person.user_id, "event": "Signed In", "properties": {}},
        auth=(BACKEND_KEY, ""),
    )
    assert answer.status_code == 200 and answer.json()["stored"] == 0
    # 2. k.js: the browser's cookie id, write key in the body
    assert (
        send_like_kjs(own_server, {"type": "page", "anonymousId": person.anonymous_id})["stored"]
        == 0
    )
    # 3. a hosted form, filled in on another device
    assert submit_form(own_server, "newsletter", {"email": person.email.upper()}).status_code == 200
    # 4. company records: a CRM export with them and a newcomer
    crm = contacts_csv(tmp_path / "crm.csv", person, newcomer)
    summary = import_json(
        own_server, "contacts", crm, "-s", "crm", "-m", str(SAMPLES / "crm.mapping.yaml")
    )
    assert summary["stored"] == 1
    # 5. bought data
    broker = broker_csv(tmp_path / "broker.csv", person, bought)
    summary = import_json(own_server, "broker", broker, "-s", "databroker", *BROKER_TERMS)
    assert summary["stored"] == 1
    # 6. the open pixel of a mail sent before the erasure
    assert httpx.get(pixel.group(1).replace("&amp;", "&")).status_code == 200

    assert events(own_server, user_id=person.user_id) == []
    assert events(own_server, anonymous_id=person.anonymous_id) == []
    for source in ("forms", "crm", "databroker", "email", "web", "backend"):
        stored = orjson.dumps(events(own_server, source=source)).decode().lower()
        assert person.email.lower() not in stored, source
        assert person.user_id not in stored, source
    crm_events = orjson.dumps(events(own_server, source="crm")).decode()
    assert newcomer.email in crm_events  # the others in the same file are imported
    assert bought.email in orjson.dumps(events(own_server, source="databroker")).decode()
    assert scan(own_server.data_dir, person.needles()) == []

    status = orjson.loads(own_server.kilde("privacy", "status", "--json").stdout)
    kept_out = {row["source"]: row["records"] for row in status["suppressed_by_source"]}
    assert kept_out == {
        "backend": 1,
        "web": 1,
        "forms": kept_out["forms"],
        "crm": 1,
        "databroker": 1,
        "email": 1,
    }
    assert kept_out["forms"] >= 2  # the identify and the Form Submitted of one submission
    listing = api(own_server, "GET", "/api/privacy/suppression").json()
    assert listing["dropped"] == sum(kept_out.values())
    assert sum(e["hits"] for e in listing["list"]) == listing["dropped"]
    assert person.email.lower() not in orjson.dumps(listing).decode().lower()


def test_suppress_without_erasing_and_take_off_the_list(own_server: Server) -> None:
    person = Person()
    send(
        own_server,
        {"type": "identify", "userId": person.user_id, "traits": {"email": person.email}},
    )
    api(own_server, "POST", "/api/profiles/refresh")
    result = own_server.kilde("privacy", "suppress", person.email)
    assert "suppressed" in result.stdout
    assert len(events(own_server, user_id=person.user_id)) == 1  # what is held stays
    dropped = send(own_server, {"type": "track", "userId": person.user_id, "event": "Signed In"})
    assert dropped["stored"] == 0
    own_server.kilde("privacy", "suppress", person.email, "--remove")
    kept = send(own_server, {"type": "track", "userId": person.user_id, "event": "Signed In"})
    assert kept["stored"] == 1
    assert len(events(own_server, user_id=person.user_id)) == 2


def test_broken_records_of_an_erased_person_are_not_kept_as_dead_letters(
    own_server: Server, tmp_path: Path
) -> None:
    """Dropped at the door means not stored as a dead letter either, even a body that is not
    JSON and so is otherwise kept whole."""
    person, newcomer = Person(), Person()
    send(
        own_server,
        {
            "type": "identify",
            "userId": person.user_id,
            "traits": {"email": person.email, "phone": person.phone},
        },
    )
    assert privacy(own_server, "erase", {"email": person.email})["status"] == "erased"
    letters = api(own_server, "GET", "/api/bad-events", params={"status": "all"}).json()["total"]
    refused = send(  # the plan refuses it: no order id
        own_server,
        {
            "type": "track",
            "userId": person.user_id,
            "event": "Order Completed",
            "properties": {"revenue": 10},
        },
    )
    assert refused["stored"] == 0 and not refused["rejected"]
    for body in (  # cut off mid-way: by email and phone, and by user id
        f'{{"type": "identify", "traits": {{"email": "{person.email}", "phone": "{person.phone}"',
        f'{{"type": "track", "event": "Signed In", "userId": "{person.user_id}", "prop',
    ):
        cut = httpx.post(
            f"{own_server.url}/v1/identify",
            content=body.encode(),
            auth=(BACKEND_KEY, ""),
            headers={"Content-Type": "application/json"},
        )
        assert cut.status_code == 400 and person.email not in cut.text
    # a CRM row that cannot be imported (not yes/no) is a dead letter, but not theirs
    crm = tmp_path / "crm.csv"
    crm.write_text(
        "Contact ID,E-mail,Town,Newsletter\n"
        f"crm-{person.tag},{person.email},Bergen,maybe\n"
        f"crm-{newcomer.tag},{newcomer.email},Bergen,maybe\n"
    )
    mapping = ["-m", str(SAMPLES / "crm.mapping.yaml")]
    own_server.kilde("import", "contacts", str(crm), "-s", "crm", *mapping, check=False)
    assert scan(own_server.data_dir, person.needles()) == []
    assert scan(own_server.data_dir, [newcomer.email.lower().encode()])
    after = api(own_server, "GET", "/api/bad-events", params={"status": "all"}).json()["total"]
    assert after == letters + 1  # the newcomer's row
    gate = api(own_server, "GET", "/api/privacy/gate").json()
    assert {"source": "backend", "channel": "http", "records": 3} in gate["suppressed_by_source"]
    assert {"source": "crm", "channel": "import", "records": 1} in gate["suppressed_by_source"]
    # someone else's broken body is still kept, as always
    other = httpx.post(
        f"{own_server.url}/v1/identify",
        content=b'{"type": "identify", "userId": "someone-else", "tra',
        auth=(BACKEND_KEY, ""),
        headers={"Content-Type": "application/json"},
    )
    assert other.status_code == 400
    kept = api(own_server, "GET", "/api/bad-events", params={"status": "all"}).json()["total"]
    assert kept == letters + 2
