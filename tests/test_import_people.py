"""Contacts, bought data with its provenance, and social-login claims."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import Server
from tests.import_support import SAMPLES, events, get, kilde_import, post, write

SOCIAL_KEY = "demo-social-login-write-key"


def test_crm_contacts_become_identify_calls_with_typed_traits(
    kilde_server: Server, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    text = (SAMPLES / "crm-contacts.csv").read_text().replace("cust-0000", f"crm{tag}-")
    file = write(tmp_path / "crm.csv", text)
    mapping = SAMPLES / "crm.mapping.yaml"
    code, summary, run = kilde_import(
        kilde_server, "contacts", file, "-s", "crm", "-m", str(mapping)
    )
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 3
    assert summary["ignored_columns"] == []
    assert summary["mapping"]["user_id"] == "Contact ID (detected)"
    [ingrid] = events(kilde_server, source="crm", user_id=f"crm{tag}-01")
    assert ingrid["type"] == "identify"
    assert ingrid["traits"] == {
        "email": "ingrid.hansen0@example.com",
        "first_name": "Ingrid",
        "last_name": "Hansen",
        "phone": "+47 912 34 567",
        "city": "Oslo",
        "country": "NO",
        "created_at": "2025-03-14T00:00:00.000Z",
        "newsletter": True,
    }
    [ola] = events(kilde_server, source="crm", user_id=f"crm{tag}-02")
    assert ola["traits"]["newsletter"] is False and "phone" not in ola["traits"]

    # The same export again stores nothing; a changed row is a new identify call.
    code, again, _ = kilde_import(kilde_server, "contacts", file, "-s", "crm", "-m", str(mapping))
    assert again is not None and (again["stored"], again["duplicates"]) == (0, 3)
    write(tmp_path / "crm.csv", text.replace("Bergen", "Stavanger"))
    code, changed, _ = kilde_import(kilde_server, "contacts", file, "-s", "crm", "-m", str(mapping))
    assert changed is not None and (changed["stored"], changed["duplicates"]) == (1, 2)
    cities = {
        e["traits"]["city"] for e in events(kilde_server, source="crm", user_id=f"crm{tag}-02")
    }
    assert cities == {"Bergen", "Stavanger"}


def test_contacts_without_any_identifier_are_rejected(kilde_server: Server, tmp_path: Path) -> None:
    file = write(tmp_path / "crm.csv", "Town,Country\nOslo,NO\n")
    code, _, run = kilde_import(kilde_server, "contacts", file, "-s", "crm")
    assert code == 1
    assert "no customer id or email column was found" in run.stderr
    assert "columns: {email: <column>}" in run.stderr


def test_broker_rows_keep_their_provenance_and_the_run_records_the_licence(
    kilde_server: Server, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    text = (SAMPLES / "broker-nordic-data.csv").read_text().replace("@example", f"@{tag}.example")
    file = write(tmp_path / "nordic-data.csv", text)
    code, summary, run = kilde_import(
        kilde_server, "broker", file, "-s", "databroker", "-m", str(SAMPLES / "broker.mapping.yaml")
    )
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 3
    mine = [
        e
        for e in events(kilde_server, source="databroker")
        if e["traits"].get("email", "").endswith(f"@{tag}.example.com")
    ]
    assert len(mine) == 3
    person = next(e for e in mine if e["traits"]["email"].startswith("ingrid"))
    assert person["traits"]["household_size"] == 3
    assert person["context"]["provenance"] == {
        "tier": "broker",
        "kind": "broker",
        "file": "nordic-data.csv",
        "line": 2,
        "broker": "Nordic Data AS",
        "acquired_on": "2026-10-01",
        "licence_expires_on": "2030-09-30",
        "purpose": "advertising",
        "lawful_basis": "consent",
        "import_run": summary["run_id"],
    }
    run_row = get(
        f"{kilde_server.url}/api/imports/{summary['run_id']}", headers=kilde_server.admin
    ).json()
    assert run_row["tier"] == "broker" and run_row["broker"] == "Nordic Data AS"
    assert run_row["licence_expires_on"] == "2030-09-30"
    assert run_row["lawful_basis"] == "consent" and run_row["status"] == "done"


def test_bought_data_needs_its_terms_a_running_licence_and_a_broker_source(
    kilde_server: Server, tmp_path: Path
) -> None:
    file = SAMPLES / "broker-nordic-data.csv"
    code, _, run = kilde_import(kilde_server, "broker", file, "-s", "databroker")
    assert code == 1
    assert "missing: --broker, --acquired, --licence-expires, --purpose" in run.stderr

    expired = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    terms = ["--broker", "Acme", "--acquired", "2024-01-01", "--purpose", "advertising"]
    code, _, run = kilde_import(
        kilde_server, "broker", file, "-s", "databroker", *terms, "--licence-expires", expired
    )
    assert code == 1 and f"expired on {expired}" in run.stderr

    code, _, run = kilde_import(
        kilde_server, "broker", file, "-s", "crm", *terms, "--licence-expires", "2030-01-01"
    )
    assert code == 1 and "not broker" in run.stderr
    code, _, run = kilde_import(kilde_server, "contacts", file, "-s", "databroker")
    assert code == 1 and "broker source" in run.stderr

    code, _, run = kilde_import(
        kilde_server,
        "broker",
        file,
        "-s",
        "databroker",
        "--broker",
        "Acme",
        "--acquired",
        "2024-01-01",
        "--purpose",
        "no_such_purpose",
        "--licence-expires",
        "2030-01-01",
    )
    assert code == 1 and "no purpose 'no_such_purpose'" in run.stderr


def test_social_login_claims_become_an_identity_and_traits(kilde_server: Server) -> None:
    sub = str(uuid.uuid4().int)[:21]
    answer = post(
        f"{kilde_server.url}/v1/social-login",
        json={
            "provider": "https://accounts.google.com",
            "claims": {
                "sub": sub,
                "email": "astrid.moen@example.com",
                "email_verified": True,
                "given_name": "Astrid",
                "family_name": "Moen",
                "locale": "nb",
                "nickname": "astro",
            },
        },
        auth=(SOCIAL_KEY, ""),
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["userId"] == f"google:{sub}" and body["externalId"] == f"google:{sub}"
    assert body["left_out"] == ["nickname"]  # the plan declares no such trait
    [person] = events(kilde_server, source="social-login", user_id=f"google:{sub}")
    assert person["traits"] == {
        "email": "astrid.moen@example.com",
        "email_verified": True,
        "first_name": "Astrid",
        "last_name": "Moen",
        "locale": "nb",
    }
    [external] = person["context"]["externalIds"]
    assert (external["type"], external["id"]) == ("google", sub)
    assert person["context"]["provenance"] == {"tier": "first_party", "provider": "google"}

    unverified = post(
        f"{kilde_server.url}/v1/social-login",
        json={
            "provider": "apple",
            "userId": "cust-777",
            "claims": {"sub": "a.1", "email": "x@example.com", "email_verified": False},
        },
        auth=(SOCIAL_KEY, ""),
    ).json()
    assert unverified["userId"] == "cust-777" and "email" in unverified["left_out"]

    missing_sub = post(
        f"{kilde_server.url}/v1/social-login",
        json={"provider": "google", "claims": {"email": "y@example.com"}},
        auth=(SOCIAL_KEY, ""),
    )
    assert missing_sub.status_code == 400
    assert missing_sub.json()["error"] == "invalid_claims"
    assert missing_sub.json()["fix"] and "y@example.com" not in missing_sub.text

    no_key = post(
        f"{kilde_server.url}/v1/social-login",
        json={"provider": "google", "claims": {"sub": "1"}},
    )
    assert no_key.status_code == 401 and no_key.json()["success"] is False


def test_a_file_of_social_logins(kilde_server: Server, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    text = (SAMPLES / "social-logins.jsonl").read_text().replace('"sub": "', f'"sub": "{tag}')
    file = write(tmp_path / "logins.jsonl", text)
    code, summary, run = kilde_import(kilde_server, "social_login", file, "-s", "social-login")
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 2
    [apple] = events(
        kilde_server, source="social-login", user_id=f"apple:{tag}001234.abcdef0123456789.1234"
    )
    assert apple["traits"] == {"email": "x7qk2@privaterelay.appleid.com", "email_verified": True}
