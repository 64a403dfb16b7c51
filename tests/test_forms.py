"""Hosted forms and surveys, driven by a real browser and a real HTTP client.

The server is real (loopback), the store is the real DuckDB file, the browser is Debian's
Chromium through Playwright, and double opt-in mail goes to a real SMTP server (aiosmtpd).
"""

from __future__ import annotations

import base64
import email
import re
import time
import zlib
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from playwright.sync_api import Browser, sync_playwright

from tests.conftest import ADMIN_TOKEN, Server, free_port, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Inbox:
    """An aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(
        self, server: Any, session: Any, envelope: Any
    ) -> str:  # aiosmtpd calls it by this name
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def wait(self, count: int = 1, timeout: float = 10) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@pytest.fixture(scope="module")
def forms_server(
    tmp_path_factory: pytest.TempPathFactory, smtp: tuple[Inbox, int]
) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("forms") / "data",
        KILDE_SMTP_HOST="127.0.0.1",
        KILDE_SMTP_PORT=str(smtp[1]),
        KILDE_MAIL_FROM="hello@fjordfell.example",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def admin(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def events_of(server: Server, **filters: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/events", params={**filters, "limit": 1000}, headers=admin(server)
    )
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def identify_with(server: Server, trait: str, value: str) -> dict[str, Any]:
    found = [
        e
        for e in events_of(server, type="identify", source="forms")
        if e["traits"].get(trait) == value
    ]
    assert len(found) == 1, f"expected one identify with {trait}, found {len(found)}"
    return found[0]


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the form has no CSRF token"
    return match.group(1)


def ledger(server: Server, anonymous_id: str) -> list[tuple[str, str, str]]:
    """Consent ledger rows (purpose, state, evidence) of one visitor, oldest first."""
    response = httpx.get(
        f"{server.url}/api/consent", params={"anonymous_id": anonymous_id}, headers=admin(server)
    )
    response.raise_for_status()
    return [(r["purpose"], r["state"], r["evidence"]) for r in response.json()["records"]]


# -- in a real browser --------------------------------------------------------------------------


@pytest.mark.parametrize("javascript", [True, False], ids=["with-js", "without-js"])
def test_a_person_fills_the_lead_form_sees_errors_then_succeeds(
    forms_server: Server, browser: Browser, javascript: bool, tmp_path: Path
) -> None:
    context = browser.new_context(java_script_enabled=javascript)
    page = context.new_page()
    page.goto(f"{forms_server.url}/f/b2b-lead")
    assert page.title().startswith("Outfitting a team")
    # Labels are tied to inputs: fill by label, as a screen reader user would find them.
    page.get_by_label("Your name").fill("Kari Nordmann")
    page.get_by_label("Work email").fill("kari.at.school")
    page.get_by_label("Phone (with country code)").fill("12")
    page.get_by_role("button", name="Request an offer").click()

    # The server answers with the values kept and errors next to their fields.
    assert page.get_by_label("Your name").input_value() == "Kari Nordmann"
    email_box = page.get_by_label("Work email")
    assert email_box.get_attribute("aria-invalid") == "true"
    assert "e-email" in (email_box.get_attribute("aria-describedby") or "")
    assert "Enter an email address" in page.locator("#e-email").inner_text()
    assert "country code" in page.locator("#e-phone").inner_text()
    assert "required" in page.locator("#e-company").inner_text()
    page.screenshot(path=str(tmp_path / "lead-form-errors.png"))

    address = f"kari.{'js' if javascript else 'nojs'}@school.example"
    email_box.fill(address)
    page.get_by_label("Phone (with country code)").fill("+47 912 34 567")
    page.get_by_label("Organisation").fill("Skolen AS")
    page.get_by_label("How many people?").select_option("11-50")
    page.get_by_role("button", name="Request an offer").click()
    assert "We will be in touch" in page.locator("[role=status]").inner_text()
    context.close()

    profile = identify_with(forms_server, "email", address)
    assert profile["traits"] == {
        "name": "Kari Nordmann",
        "email": address,
        "phone": "+4791234567",
        "company": "Skolen AS",
        "company_size": "11-50",
    }
    submitted = [
        e
        for e in events_of(forms_server, event="Form Submitted")
        if e["anonymous_id"] == profile["anonymous_id"]
    ]
    assert len(submitted) == 1
    assert submitted[0]["properties"]["form_id"] == "b2b-lead"
    # The unticked box is a recorded denial, not silence.
    assert ledger(forms_server, profile["anonymous_id"]) == [
        ("marketing_email", "denied", "form:b2b-lead")
    ]


def test_conditional_question_shows_only_for_detractors(
    forms_server: Server, browser: Browser
) -> None:
    page = browser.new_page()
    page.goto(f"{forms_server.url}/f/nps")
    question = page.locator("[data-field=missing]")
    assert question.is_hidden()
    page.get_by_role("radio", name="3", exact=True).check()
    assert question.is_visible()
    page.get_by_role("radio", name="10").check()
    assert question.is_hidden()
    page.close()


# -- consent and double opt-in ------------------------------------------------------------------


def test_nothing_is_pre_ticked(forms_server: Server) -> None:
    for form in ("newsletter", "b2b-lead"):
        html = httpx.get(f"{forms_server.url}/f/{form}").text
        boxes = re.findall(r'<input type="checkbox"[^>]*name="consent\.[^"]+"[^>]*>', html, re.S)
        assert boxes, f"{form} shows no consent box"
        assert all("checked" not in box for box in boxes)


def test_double_opt_in_consent_is_active_only_after_the_click(
    forms_server: Server, smtp: tuple[Inbox, int], browser: Browser
) -> None:
    inbox, _ = smtp
    before = len(inbox.messages)
    client = httpx.Client(base_url=forms_server.url)
    token = csrf_of(client.get("/f/newsletter").text)
    answer = client.post(
        "/f/newsletter",
        data={
            "csrf": token,
            "email": "Ola.Hiker@Example.com",
            "first_name": "Ola",
            "consent.marketing_email": "yes",
        },
    )
    assert answer.status_code == 200
    assert "confirm" in answer.text
    person = identify_with(forms_server, "email", "Ola.Hiker@example.com")
    assert ledger(forms_server, person["anonymous_id"]) == []  # not before the click

    messages = inbox.wait(before + 1)
    mail = messages[before]
    assert mail["To"] == "Ola.Hiker@example.com"
    body = next(
        part.get_payload(decode=True).decode()
        for part in mail.walk()
        if part.get_content_type() == "text/plain"
    )
    link = re.search(r"http://\S+/f/newsletter/confirm\?t=\S+", body)
    assert link, body
    # No personal data in the link, not even the visitor's id: it names the stored submission.
    # (The readable part of the token is checked: "ola" may turn up in a random signature.)
    payload = token_payload(link.group(0).split("t=", 1)[1])
    assert "ola" not in payload.lower()
    assert "ola.hiker" not in link.group(0).lower()
    assert person["anonymous_id"] not in payload

    # Mail scanners and link previews open links on their own: opening it records nothing.
    opened = client.get(link.group(0))
    assert opened.status_code == 200, opened.text[-700:]
    assert "Yes, confirm" in opened.text
    assert ledger(forms_server, person["anonymous_id"]) == []

    page = browser.new_page()
    page.goto(link.group(0))
    page.get_by_role("button", name="Yes, confirm").click()
    assert "confirmed" in page.locator("[role=status]").inner_text()
    page.go_back()
    page.get_by_role("button", name="Yes, confirm").click()  # a second click records nothing new
    assert "confirmed" in page.locator("[role=status]").inner_text()
    page.close()
    assert ledger(forms_server, person["anonymous_id"]) == [
        ("marketing_email", "granted", "double-opt-in:form:newsletter")
    ]

    forged = client.get(link.group(0)[:-3] + "abc")
    assert forged.status_code == 400
    assert "not valid" in forged.text
    token_of_link = link.group(0).split("t=", 1)[1]
    forged_post = client.post("/f/newsletter/confirm", data={"t": token_of_link[:-3] + "abc"})
    assert forged_post.status_code == 400
    other_form = client.post("/f/b2b-lead/confirm", data={"t": token_of_link})
    assert other_form.status_code == 400


def token_payload(token: str) -> str:
    """The readable part of a signed token (base64 JSON, zlib-compressed when marked by a dot)."""
    compressed = token.startswith(".")
    part = token.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return (zlib.decompress(raw) if compressed else raw).decode()


def test_a_person_erased_before_the_click_cannot_be_confirmed(
    forms_server: Server, smtp: tuple[Inbox, int]
) -> None:
    inbox, _ = smtp
    before = len(inbox.messages)
    client = httpx.Client(base_url=forms_server.url)
    answer = client.post(
        "/f/newsletter",
        data={
            "csrf": csrf_of(client.get("/f/newsletter").text),
            "email": "erased.before.click@example.com",
            "consent.marketing_email": "yes",
        },
    )
    assert answer.status_code == 200
    mail = inbox.wait(before + 1)[before]
    body = next(
        part.get_payload(decode=True).decode()
        for part in mail.walk()
        if part.get_content_type() == "text/plain"
    )
    link = re.search(r"http://\S+/f/newsletter/confirm\?t=(\S+)", body)
    assert link, body
    forms_server.kilde("privacy", "erase", "erased.before.click@example.com", "--yes")

    def confirmations() -> int:
        return sum(
            1
            for e in events_of(forms_server, event="Consent Updated", source="forms")
            if e["properties"].get("banner_version") == "double-opt-in:form:newsletter"
        )

    confirmed_before = confirmations()
    opened = client.get(link.group(0))
    assert opened.status_code == 400
    assert "no longer on record" in opened.text
    pressed = client.post("/f/newsletter/confirm", data={"t": link.group(1)})
    assert pressed.status_code == 400
    assert "no longer on record" in pressed.text
    assert confirmations() == confirmed_before


# -- bad input ----------------------------------------------------------------------------------


def dead_letters(server: Server) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/bad-events", params={"source": "forms"}, headers=admin(server)
    )
    letters: list[dict[str, Any]] = response.json()["dead_letters"]
    return letters


def test_tampered_consent_is_refused_and_kept_as_a_dead_letter(forms_server: Server) -> None:
    client = httpx.Client(base_url=forms_server.url)
    token = csrf_of(client.get("/f/b2b-lead").text)
    before = len(dead_letters(forms_server))
    answer = client.post(
        "/f/b2b-lead",
        data={
            "csrf": token,
            "name": "Mallory",
            "email": "mallory@example.com",
            "company": "X",
            "size": "1-10",
            "consent.advertising": "yes",  # a purpose this form never asks about
        },
    )
    assert answer.status_code == 400
    assert "changed before it was sent" in answer.text
    letters = dead_letters(forms_server)
    assert len(letters) == before + 1
    assert "consent for a purpose this form does not ask: advertising" in letters[0]["reason"]
    assert not [
        e
        for e in events_of(forms_server, type="identify", source="forms")
        if e["traits"].get("email") == "mallory@example.com"
    ]


def test_honeypot_spam_is_thanked_but_only_dead_lettered(forms_server: Server) -> None:
    client = httpx.Client(base_url=forms_server.url)
    token = csrf_of(client.get("/f/newsletter").text)
    answer = client.post(
        "/f/newsletter",
        data={"csrf": token, "email": "bot@spam.example", "website": "http://spam.example"},
    )
    assert answer.status_code == 200
    assert "spam: the hidden honeypot field was filled" in dead_letters(forms_server)[0]["reason"]
    assert not [
        e
        for e in events_of(forms_server, type="identify", source="forms")
        if e["traits"].get("email") == "bot@spam.example"
    ]


def test_forged_csrf_and_foreign_posts_are_refused(forms_server: Server) -> None:
    data = {"email": "eve@example.com", "first_name": "Eve"}
    before = len(dead_letters(forms_server))
    foreign = httpx.post(
        f"{forms_server.url}/f/newsletter", data=data, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    letters = dead_letters(forms_server)
    assert len(letters) == before + 1
    assert letters[0]["reason"] == "post without the page's token from a site not allowed"
    forged = httpx.post(f"{forms_server.url}/f/newsletter", data={**data, "csrf": "abc.def"})
    assert forged.status_code == 403
    assert "expired" in forged.text
    assert 'value="eve@example.com"' not in forged.text  # a forged post is not echoed


def test_overlong_answers_and_unknown_forms(forms_server: Server) -> None:
    client = httpx.Client(base_url=forms_server.url)
    token = csrf_of(client.get("/f/b2b-lead").text)
    answer = client.post(
        "/f/b2b-lead",
        data={
            "csrf": token,
            "name": "N" * 201,
            "email": "n@example.com",
            "company": "C",
            "size": "huge",
        },
    )
    assert answer.status_code == 400
    assert "Use at most 200 characters." in answer.text
    assert "Choose one of the options shown." in answer.text
    with_nul = client.post(
        "/f/b2b-lead",
        data={
            "csrf": csrf_of(client.get("/f/b2b-lead").text),
            "name": "Nina\x00Nul",
            "email": "n@example.com",
            "company": "C",
            "size": "11-50",
        },
    )
    assert with_nul.status_code == 400
    assert "Remove the invisible control characters from this answer." in with_nul.text
    assert httpx.get(f"{forms_server.url}/f/no-such-form").status_code == 404
    assert httpx.post(f"{forms_server.url}/f/no-such-form", data={"a": "b"}).status_code == 404


def test_rate_limit_per_address(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        codes = [
            httpx.post(f"{server.url}/f/newsletter", data={"csrf": "x"}).status_code
            for _ in range(22)
        ]
        letters = dead_letters(server)
    finally:
        server.stop()
    assert codes[:20] == [403] * 20  # refused for the bad token, but counted
    assert codes[20:] == [429, 429]
    # The first refused post shows the flood in the dead letter; the next is not kept.
    assert [letter["reason"] for letter in letters] == [
        "rate limit: more than 20 posts from one address to this form in 10 minutes; "
        "later ones in this window are not kept"
    ]


# -- surveys ------------------------------------------------------------------------------------


def test_personal_survey_link_joins_the_person_and_works_once(forms_server: Server) -> None:
    made = forms_server.kilde("forms", "url", "nps", "--for", "Astrid@Example.com")
    url = made.stdout.strip()
    assert url.startswith(f"{forms_server.url}/f/nps?t=")
    assert "astrid" not in url.lower()

    client = httpx.Client(base_url=forms_server.url)
    page = client.get(url)
    token = url.split("t=", 1)[1]
    answer = client.post(
        "/f/nps",
        data={"csrf": csrf_of(page.text), "t": token, "score": "9", "reason": "Fast delivery"},
    )
    assert answer.status_code == 200, answer.text
    person = identify_with(forms_server, "email", "astrid@example.com")
    survey = [
        e
        for e in events_of(forms_server, event="Survey Answered")
        if e["anonymous_id"] == person["anonymous_id"]
    ]
    assert survey[0]["properties"]["answers"] == {"score": 9, "reason": "Fast delivery"}

    again = client.post("/f/nps", data={"csrf": csrf_of(page.text), "t": token, "score": "2"})
    assert again.status_code == 400
    assert "already been answered" in again.text
    assert client.get(url[:-4] + "AAAA").status_code == 400


def test_nps_results(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        client = httpx.Client(base_url=server.url)
        for score, missing in [
            (10, []),
            (9, []),
            (8, []),
            (3, ["Prices"]),
            (6, ["Prices", "Delivery time"]),
        ]:
            token = csrf_of(client.get("/f/nps").text)
            data: dict[str, Any] = {"csrf": token, "score": str(score)}
            if missing:
                data["missing"] = missing
            assert client.post("/f/nps", data=data).status_code == 200
        result = server.kilde("surveys", "results", "nps", "--json")
        shown = server.kilde("surveys", "results", "nps")
    finally:
        server.stop()
    import json

    summary = json.loads(result.stdout)
    score = summary["questions"][0]
    assert (score["promoters"], score["passives"], score["detractors"]) == (2, 1, 2)
    assert score["nps"] == 0.0
    improve = summary["questions"][2]["distribution"]
    assert improve == {"Delivery time": 1, "Prices": 2, "Product range": 0, "Customer service": 0}
    assert "NPS 0.0: 2 promoters, 1 passives, 2 detractors" in shown.stdout


def test_a_company_form_on_an_allowed_site_posts_without_a_token(own_server: Server) -> None:
    plan = own_server.plan_path.read_text()
    plan = plan.replace(
        "    submit_label: Subscribe\n",
        "    submit_label: Subscribe\n    allowed_origins: [https://fjordfell.example]\n",
    )
    own_server.plan_path.write_text(plan)
    reloaded = httpx.post(f"{own_server.url}/api/plan/reload", headers=admin(own_server))
    assert reloaded.status_code == 200, reloaded.text
    data = {"email": "own-form@example.com", "consent.marketing_email": "yes"}
    ours = httpx.post(
        f"{own_server.url}/f/newsletter", data=data, headers={"Origin": "https://fjordfell.example"}
    )
    assert ours.status_code == 200
    theirs = httpx.post(
        f"{own_server.url}/f/newsletter", data=data, headers={"Origin": "https://other.example"}
    )
    assert theirs.status_code == 403
    assert identify_with(own_server, "email", "own-form@example.com")


def test_oversized_posts_are_refused(forms_server: Server) -> None:
    client = httpx.Client(base_url=forms_server.url)
    token = csrf_of(client.get("/f/b2b-lead").text)
    answer = client.post("/f/b2b-lead", data={"csrf": token, "needs": "x" * 70_000})
    assert answer.status_code == 413
    assert "too long" in answer.text

    def streamed() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield f"csrf={token}&name=N&email=n%40example.com&company=C&size=1-10&needs=".encode()
        for _ in range(100):
            yield b"x" * 10_000

    chunked = client.post(
        "/f/b2b-lead",
        content=streamed(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert chunked.status_code == 413
    assert "too long" in chunked.text


def test_forms_list_and_demo_answers(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        listed = server.kilde("forms", "list", "--json")
        server.kilde("demo", "--customers", "60")
        results = server.kilde("surveys", "results", "nps", "--json")
        submitted = events_of(server, event="Form Submitted")
        identifies = len(events_of(server, type="identify", source="forms"))
    finally:
        server.stop()
    import json

    forms = {f["id"]: f for f in json.loads(listed.stdout)["forms"]}
    assert set(forms) == {"newsletter", "b2b-lead", "nps"}
    assert forms["newsletter"]["url"] == f"{server.url}/f/newsletter"
    assert forms["newsletter"]["consents"] == ["marketing_email"]
    summary = json.loads(results.stdout)
    assert summary["submissions"] > 0
    assert summary["questions"][0]["responses"] == summary["submissions"]
    # The newsletter form got signups too, each a profile with its traits.
    newsletter = [e for e in submitted if e["properties"]["form_id"] == "newsletter"]
    assert newsletter
    assert identifies >= len(newsletter)
