"""The consent gate at collection, consent recorded by the admin, do-not-sell from GPC and the
admin API, and the check at the moment of use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import DEMO_PLAN, Server, start_server
from tests.privacy_support import (
    SAMPLES,
    Person,
    api,
    broker_csv,
    events,
    privacy,
    refresh_profiles,
    send,
    send_like_kjs,
    submit_form,
)


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[Server]:
    """The demo plan with the consent gate at `enforce`: no recorded grant, no storage."""
    plan = tmp_path / "kilde.yaml"
    text = DEMO_PLAN.read_text()
    assert "consent_gate: refusals" in text
    plan.write_text(text.replace("consent_gate: refusals", "consent_gate: enforce"))
    server = start_server(tmp_path / "data", plan)
    yield server
    server.stop()


def opened(person: Person) -> dict[str, Any]:
    """An Email Opened record: its only purpose, marketing_email, rests on consent."""
    return {
        "type": "track",
        "event": "Email Opened",
        "userId": person.user_id,
        "properties": {
            "campaign_id": "c1",
            "recipient": uuid.uuid4().hex[:16],
            "machine_open": False,
        },
    }


def withheld(server: Server) -> dict[tuple[str, str], int]:
    gate = api(server, "GET", "/api/privacy/gate").json()
    return {(r["purpose"], r["kind"]): r["records"] for r in gate["withheld_by_purpose"]}


def test_enforce_stores_consent_based_data_only_with_a_grant(strict_server: Server) -> None:
    p = Person()
    answer = send(
        strict_server,
        {
            "type": "identify",
            "userId": p.user_id,
            "anonymousId": p.anonymous_id,
            "traits": {"email": p.email, "newsletter": True, "household_size": 4},
        },
        opened(p),
    )
    assert answer["stored"] == 1 and not answer["rejected"]  # withheld is not an error
    (identify,) = events(strict_server, user_id=p.user_id)
    assert identify["traits"] == {"email": p.email}  # the consent-only traits are left out
    assert withheld(strict_server) == {
        ("marketing_email", "event"): 1,
        ("marketing_email", "trait"): 1,
        ("advertising", "trait"): 1,
    }

    # the banner's grant counts from the next record on, even within the same batch
    send_like_kjs(
        strict_server,
        {
            "type": "track",
            "event": "Consent Updated",
            "anonymousId": p.anonymous_id,
            "userId": p.user_id,
            "properties": {"purposes": {"marketing_email": True}, "banner_version": "v2"},
        },
        opened(p),
    )
    assert len(events(strict_server, event="Email Opened", user_id=p.user_id)) == 1
    # a grant under the cookie id counts for the account on another device too
    assert send(strict_server, opened(p))["stored"] == 1

    # withdrawn by letter, recorded by the admin: from now on not stored again
    strict_server.kilde(
        "privacy", "consent", p.email, "--deny", "marketing_email", "--evidence", "letter 12"
    )
    assert send(strict_server, opened(p))["stored"] == 0
    state = privacy(strict_server, "consent/state", {"email": p.email})
    assert state["current"]["marketing_email"]["state"] == "withdrawn"
    assert state["current"]["marketing_email"]["evidence"] == "letter 12"
    assert state["current"]["marketing_email"]["channel"] == "admin"
    assert withheld(strict_server)[("marketing_email", "event")] == 2

    status = orjson.loads(strict_server.kilde("privacy", "status", "--json").stdout)
    assert status["mode"] == "enforce"


def test_bought_data_carries_the_brokers_consent_until_the_person_refuses(
    strict_server: Server, tmp_path: Path
) -> None:
    p = Person()
    mapping = ["-m", str(SAMPLES / "broker.mapping.yaml")]
    strict_server.kilde(
        "import", "broker", str(broker_csv(tmp_path / "a.csv", p)), "-s", "databroker", *mapping
    )
    (bought,) = [e for e in events(strict_server, source="databroker")]
    assert bought["traits"]["household_size"] == 3
    refresh_profiles(strict_server)
    # refusing advertising (here: through the admin API) keeps the next file's traits out
    send(strict_server, {"type": "identify", "userId": p.user_id, "traits": {"email": p.email}})
    refresh_profiles(strict_server)
    privacy(strict_server, "consent", {"email": p.email, "purposes": {"advertising": False}})
    second = tmp_path / "b.csv"
    second.write_text(f"email,household_size,interests,income_band\n{p.email},5,golf,low\n")
    strict_server.kilde("import", "broker", str(second), "-s", "databroker", *mapping)
    newest = max(events(strict_server, source="databroker"), key=lambda e: e["received_at"])
    assert "household_size" not in newest["traits"] and newest["traits"]["email"] == p.email
    assert withheld(strict_server)[("advertising", "trait")] == 3  # the three broker traits


def test_an_opt_out_sent_before_the_person_is_known_holds_for_the_file_that_brings_them(
    strict_server: Server, tmp_path: Path
) -> None:
    p = Person()  # never seen: no profile, no user id, no anonymous id
    opted = privacy(strict_server, "do-not-sell", {"email": p.email, "evidence": "letter 31"})
    assert opted["do_not_sell"] is True
    status = privacy(strict_server, "do-not-sell/status", {"email": p.email})
    assert status["do_not_sell"] is True and status["evidence"] == "letter 31"
    # A data broker's file brings the person later: the opt-out holds for it.
    mapping = ["-m", str(SAMPLES / "broker.mapping.yaml")]
    strict_server.kilde(
        "import", "broker", str(broker_csv(tmp_path / "a.csv", p)), "-s", "databroker", *mapping
    )
    (bought,) = events(strict_server, source="databroker")
    assert bought["traits"]["email"] == p.email and "household_size" not in bought["traits"]
    assert withheld(strict_server)[("advertising", "trait")] == 3  # the three broker traits


def test_gpc_and_the_admin_set_do_not_sell_and_uses_are_checked(kilde_server: Server) -> None:
    shopper, caller, banner = Person(), Person(), Person()
    # the browser API: kilde.consent({advertising: false}) sends this from the banner
    send_like_kjs(
        kilde_server,
        {
            "type": "track",
            "event": "Consent Updated",
            "anonymousId": banner.anonymous_id,
            "userId": banner.user_id,
            "properties": {"purposes": {"advertising": False}, "banner_version": "b-9"},
        },
        {"type": "identify", "userId": banner.user_id, "traits": {"email": banner.email}},
    )
    send_like_kjs(
        kilde_server,
        {
            "type": "identify",
            "anonymousId": shopper.anonymous_id,
            "userId": shopper.user_id,
            "traits": {"email": shopper.email},
            "context": {"gpc": True},
        },
    )
    send(
        kilde_server,
        {"type": "identify", "userId": caller.user_id, "traits": {"email": caller.email}},
    )
    refresh_profiles(kilde_server)
    by_gpc = privacy(kilde_server, "do-not-sell/status", {"email": shopper.email})
    assert by_gpc["do_not_sell"] is True and by_gpc["evidence"] == "gpc"
    assert (
        privacy(kilde_server, "do-not-sell/status", {"email": caller.email})["do_not_sell"] is False
    )
    by_banner = privacy(kilde_server, "do-not-sell/status", {"email": banner.email})
    assert by_banner["do_not_sell"] is True and by_banner["evidence"] == "b-9"

    result = kilde_server.kilde("privacy", "do-not-sell", caller.email, "--evidence", "phone call")
    assert "do not sell or share: yes" in result.stdout
    flagged = privacy(kilde_server, "do-not-sell/status", {"email": caller.email})
    assert flagged["do_not_sell"] is True and flagged["channel"] == "admin"

    for person in (shopper, caller):
        checked = privacy(kilde_server, "check", {"email": person.email, "purpose": "advertising"})
        (verdict,) = checked["profiles"].values()
        assert verdict["allowed"] is False
        assert "opted out of sale or sharing" in verdict["reasons"]
        analytics = privacy(kilde_server, "check", {"email": person.email, "purpose": "analytics"})
        assert all(v["allowed"] for v in analytics["profiles"].values())

    kilde_server.kilde("privacy", "do-not-sell", caller.email, "--undo")
    assert (
        privacy(kilde_server, "do-not-sell/status", {"email": caller.email})["do_not_sell"] is False
    )


def test_refusals_mode_keeps_out_only_what_was_refused(kilde_server: Server) -> None:
    unknown, refused = Person(), Person()
    assert send(kilde_server, opened(unknown))["stored"] == 1
    send_like_kjs(
        kilde_server,
        {
            "type": "track",
            "event": "Consent Updated",
            "userId": refused.user_id,
            "properties": {"purposes": {"marketing_email": False}},
        },
    )
    assert send(kilde_server, opened(refused))["stored"] == 0
    bad = api(
        kilde_server,
        "POST",
        "/api/privacy/consent",
        json={"email": refused.email, "purposes": {"no_such_purpose": True}},
    )
    assert bad.status_code == 400 and bad.json()["error"] == "unknown_purpose"


def test_consent_kept_in_the_crm_arrives_with_an_import(
    strict_server: Server, tmp_path: Path
) -> None:
    yes, no = Person(), Person()
    mapping = tmp_path / "crm.mapping.yaml"
    mapping.write_text(
        "kind: contacts\ntraits: {newsletter: Newsletter}\n"
        "consents: {marketing_email: Newsletter}\nignore: [Lead score]\n"
    )

    def crm(name: str, *rows: tuple[Person, str]) -> Path:
        path = tmp_path / name
        lines = ["Contact ID,E-mail,Town,Newsletter"]
        lines += [f"crm-{p.tag},{p.email},Bergen,{answer}" for p, answer in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    def imported(path: Path) -> dict[str, Any]:
        result = strict_server.kilde(
            "import", "contacts", str(path), "-s", "crm", "-m", str(mapping), "--json"
        )
        summary: dict[str, Any] = orjson.loads(result.stdout)
        return summary

    assert imported(crm("march.csv", (yes, "yes"), (no, "no")))["stored"] == 2
    granted = privacy(strict_server, "consent/state", {"email": yes.email})
    assert granted["current"]["marketing_email"]["state"] == "granted"
    assert granted["current"]["marketing_email"]["channel"] == "import"
    assert granted["current"]["marketing_email"]["evidence"] == "import:march.csv:2"
    refused = privacy(strict_server, "consent/state", {"email": no.email})
    assert refused["current"]["marketing_email"]["state"] == "denied"
    # the gate takes the row's own choice: the newsletter trait is kept only with the grant
    traits = {e["traits"]["email"]: e["traits"] for e in events(strict_server, source="crm")}
    assert traits[yes.email]["newsletter"] is True
    assert "newsletter" not in traits[no.email]

    # the same export again adds nothing to the ledger; next month's change is a withdrawal
    imported(crm("march.csv", (yes, "yes"), (no, "no")))
    assert privacy(strict_server, "consent/state", {"email": yes.email})["count"] == 1
    imported(crm("april.csv", (yes, "no")))
    later = privacy(strict_server, "consent/state", {"email": yes.email})
    assert [(r["state"], r["evidence"]) for r in later["records"]] == [
        ("granted", "import:march.csv:2"),
        ("withdrawn", "import:april.csv:2"),
    ]

    # a purpose the plan does not have, or a kind that records no consent, is refused whole
    mapping.write_text("kind: contacts\nconsents: {newsletters: Newsletter}\n")
    bad = strict_server.kilde(
        "import",
        "contacts",
        str(crm("may.csv", (yes, "yes"))),
        "-s",
        "crm",
        "-m",
        str(mapping),
        check=False,
    )
    assert bad.returncode != 0 and "consents.newsletters: the plan has no such purpose" in (
        bad.stdout + bad.stderr
    )


def test_a_forms_unticked_sharing_box_sets_do_not_sell(tmp_path: Path) -> None:
    plan = tmp_path / "kilde.yaml"
    text = DEMO_PLAN.read_text()
    box = (
        "      - purpose: marketing_email\n"
        "        label: Also send me offers for groups by email.\n"
    )
    assert box in text
    sharing = "      - purpose: advertising\n        label: Show me offers on other sites.\n"
    plan.write_text(text.replace(box, box + sharing))
    server = start_server(tmp_path / "data", plan)
    try:
        declined, accepted = Person(), Person()
        for person, ticked in ((declined, {}), (accepted, {"consent.advertising": "yes"})):
            answer = submit_form(
                server,
                "b2b-lead",
                {"name": "Ingrid", "email": person.email, "company": "Skolen", "size": "1-10"}
                | ticked,
                visitor=person.anonymous_id,
            )
            assert answer.status_code == 200, answer.text
        refresh_profiles(server)
        flagged = privacy(server, "do-not-sell/status", {"email": declined.email})
        assert flagged["do_not_sell"] is True
        assert (flagged["channel"], flagged["evidence"]) == ("form", "form:b2b-lead")
        allowed = privacy(server, "do-not-sell/status", {"email": accepted.email})
        assert allowed["do_not_sell"] is False
        (verdict,) = privacy(server, "check", {"email": declined.email, "purpose": "advertising"})[
            "profiles"
        ].values()
        assert verdict["allowed"] is False
    finally:
        server.stop()


def test_an_opt_out_sent_before_the_person_is_known_holds_when_they_sign_up_on_the_web(
    own_server: Server,
) -> None:
    p = Person()  # never seen; refuses marketing email by letter before signing up
    privacy(own_server, "consent", {"email": p.email, "purposes": {"marketing_email": False}})
    # Signing up on the website names the email address once; later records only the ids.
    signed_up = send(
        own_server,
        {
            "type": "identify",
            "userId": p.user_id,
            "anonymousId": p.anonymous_id,
            "traits": {"email": p.email},
        },
    )
    assert signed_up["stored"] == 1
    assert send(own_server, opened(p))["stored"] == 0
    assert withheld(own_server)[("marketing_email", "event")] == 1
    refresh_profiles(own_server)
    checked = privacy(own_server, "check", {"email": p.email, "purpose": "marketing_email"})
    (verdict,) = checked["profiles"].values()
    assert verdict["allowed"] is False

    # After a restart the gate reads the refusal back through the profile's email address.
    own_server.stop()
    again = start_server(own_server.data_dir, own_server.plan_path)
    try:
        cookie_only = {**opened(p), "userId": None, "anonymousId": p.anonymous_id}
        assert send(again, opened(p), cookie_only)["stored"] == 0
        assert withheld(again)[("marketing_email", "event")] == 3
    finally:
        again.stop()
