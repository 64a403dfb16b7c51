"""A company's own forms and surveys, declared in its plan, on a real server and in Chromium.

The plan here is the demo plan with another company name and colour, a CSAT survey (scale,
single choice, number range, free text, a conditional question) and a signup form with two
consent boxes. Pages are embedded in an iframe of another site and attacked from one.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser

from tests.conftest import ADMIN_TOKEN, DEMO_PLAN, Server, start_server
from tests.site import chromium
from tests.test_forms import csrf_of, dead_letters, events_of, ledger

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COMPANY = "Tindra Telt AS"
COLOUR = "#8a1c7c"  # rgb(138, 28, 124)

CSAT_SURVEY: dict[str, Any] = {
    "id": "delivery-csat",
    "kind": "survey",
    "source": "forms",
    "title": "How was your delivery?",
    "purposes": ["analytics"],
    "fields": [
        {
            "name": "satisfaction",
            "type": "csat",
            "label": "How satisfied are you?",
            "required": True,
        },
        {
            "name": "channel",
            "type": "select",
            "label": "How did the parcel reach you?",
            "options": ["Home delivery", "Pick-up point", "Store"],
        },
        {
            "name": "nights",
            "type": "number",
            "label": "Nights outdoors a year",
            "min": 0,
            "max": 365,
        },
        {"name": "comment", "type": "textarea", "label": "Anything else?", "max_length": 300},
        {
            "name": "problem",
            "type": "textarea",
            "label": "What went wrong?",
            "show_if": {"field": "satisfaction", "equals": [1, 2]},
        },
    ],
    "privacy_notice": "Your answers help us improve deliveries and are kept for two years.",
    "submit_label": "Send",
}

CLUB_FORM: dict[str, Any] = {
    "id": "club",
    "source": "forms",
    "title": "Join the outdoor club",
    "purposes": ["marketing_email"],
    "fields": [
        {"name": "email", "type": "email", "label": "Email", "required": True, "trait": "email"},
        {"name": "phone", "type": "phone", "label": "Mobile", "trait": "phone"},
    ],
    "consents": [
        {"purpose": "marketing_email", "label": "Send me club news by email."},
        {"purpose": "advertising", "label": "Show me club offers on other sites."},
    ],
    "privacy_notice": "We use your details for the club only. Questions: privacy@tindra.example.",
    "submit_label": "Join",
    "thank_you": "Welcome to the club!",
    "allowed_origins": ["https://tindra.example"],
}


# A number field filling an integer trait: 2.5 passes the form's range but not the trait's type.
HOUSEHOLD_FORM: dict[str, Any] = {
    "id": "household",
    "source": "forms",
    "title": "Tell us about your household",
    "purposes": ["advertising"],
    "fields": [
        {"name": "email", "type": "email", "label": "Email", "required": True, "trait": "email"},
        {
            "name": "people",
            "type": "number",
            "label": "People in your household",
            "min": 1,
            "max": 20,
            "trait": "household_size",
        },
    ],
    "consents": [{"purpose": "advertising", "label": "Show me offers for families."}],
    "privacy_notice": "We use this to choose the offers we show you.",
}


@pytest.fixture(scope="module")
def plan_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("forms-plan")
    plan = yaml.safe_load(DEMO_PLAN.read_text())
    plan["company"]["name"] = COMPANY
    plan["company"]["primary_color"] = COLOUR
    plan["forms"] += [CSAT_SURVEY, CLUB_FORM, HOUSEHOLD_FORM]
    plan_path = base / "kilde.yaml"
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    server = start_server(base / "data", plan_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


class OtherSite:
    """Another website on loopback, at http://localhost:PORT: a different site than 127.0.0.1.

    (Chromium refuses to frame or post to loopback addresses from pages of public sites, so the
    other site runs on loopback too, under the name `localhost`.)
    """

    def __init__(self) -> None:
        self.html = ""
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server calls it by this name
                body = site.html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://localhost:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def other_site() -> Iterator[OtherSite]:
    site = OtherSite()
    yield site
    site.close()


def identifies_with_email(server: Server, address: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events_of(server, type="identify", source="forms")
        if e["traits"].get("email") == address
    ]


def test_company_name_and_colour_come_from_the_plan(plan_server: Server, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{plan_server.url}/f/club")
    assert page.locator(".brand").inner_text() == COMPANY
    assert page.locator(".brand").is_visible()
    assert COMPANY in page.title()
    colour = page.get_by_role("button", name="Join").evaluate(
        "button => getComputedStyle(button).backgroundColor"
    )
    assert colour == "rgb(138, 28, 124)"
    # The privacy notice of the plan is on the page, and every consent box starts unticked.
    assert "privacy@tindra.example" in page.locator(".notice").inner_text()
    assert not page.get_by_label("Send me club news by email.").is_checked()
    assert not page.get_by_label("Show me club offers on other sites.").is_checked()
    page.close()


def test_embedded_in_an_iframe_on_a_phone(
    plan_server: Server, browser: Browser, other_site: OtherSite
) -> None:
    headers = httpx.get(f"{plan_server.url}/f/club").headers
    assert "x-frame-options" not in headers
    assert headers["content-security-policy"] == "frame-ancestors *"

    other_site.html = (
        "<!doctype html><meta name=viewport content='width=device-width, initial-scale=1'>"
        "<title>Tindra shop</title><h1>Our club</h1>"
        f"<iframe src='{plan_server.url}/f/club' title='Join the club'"
        " style='width: 100%; height: 900px; border: 0'></iframe>"
    )
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.goto(other_site.url)
    frame = page.frame_locator("iframe[title='Join the club']")
    frame.get_by_role("textbox", name="Email").fill("iframe.member@example.com")
    # Fits a phone: nothing inside the frame is wider than the screen.
    inner = next(f for f in page.frames if f.url.startswith(plan_server.url))
    assert inner.evaluate("document.documentElement.scrollWidth") <= 360
    frame.get_by_label("Show me club offers on other sites.").check()
    frame.get_by_role("button", name="Join").click()
    assert "Welcome to the club!" in frame.locator("[role=status]").inner_text()
    assert page.url == other_site.url  # the shop page stays; only the frame moved on
    context.close()

    found = identifies_with_email(plan_server, "iframe.member@example.com")
    assert len(found) == 1
    assert sorted(ledger(plan_server, found[0]["anonymous_id"])) == [
        ("advertising", "granted", "form:club"),
        ("marketing_email", "denied", "form:club"),
    ]


def test_a_forged_post_from_another_site_is_refused(
    plan_server: Server, browser: Browser, other_site: OtherSite
) -> None:
    """Another site copies a valid page token and makes a visitor's browser post the form."""
    token = csrf_of(httpx.get(f"{plan_server.url}/f/club").text)
    other_site.html = (
        f"<!doctype html><form method=post action='{plan_server.url}/f/club'>"
        f"<input name=csrf value='{token}'><input name=email value='victim@example.com'>"
        "<input name='consent.advertising' value='yes'></form>"
        "<script>document.forms[0].submit()</script>"
    )
    context = browser.new_context()
    page = context.new_page()
    before = len(dead_letters(plan_server))
    with page.expect_navigation(url=f"{plan_server.url}/f/club") as navigation:
        page.goto(other_site.url)
    response = navigation.value
    assert response is not None and response.status == 403
    assert "Form not accepted" in page.locator("h1").inner_text()
    context.close()

    assert identifies_with_email(plan_server, "victim@example.com") == []
    letters = dead_letters(plan_server)
    assert len(letters) == before + 1
    assert letters[0]["reason"] == "cross-site post from a site not allowed"


def _post(
    server: Server, form: str, data: dict[str, Any], visitor: str | None = None
) -> httpx.Response:
    client = httpx.Client(base_url=server.url, cookies={"kilde_aid": visitor} if visitor else {})
    return client.post(f"/f/{form}", data={"csrf": csrf_of(client.get(f"/f/{form}").text), **data})


def test_csat_survey_validates_choices_and_ranges_and_reports(plan_server: Server) -> None:
    page = httpx.get(f"{plan_server.url}/f/delivery-csat").text
    scale = re.findall(r'name="satisfaction" value="(\d+)"', page)
    assert scale == ["1", "2", "3", "4", "5"]

    wrong = _post(
        plan_server,
        "delivery-csat",
        {"satisfaction": "6", "channel": "Drone", "nights": "400", "comment": "c" * 301},
    )
    assert wrong.status_code == 400
    for message in (
        "Choose a number from 1 to 5.",
        "Choose one of the options shown.",
        "Enter a number of at most 365.",
        "Use at most 300 characters.",
    ):
        assert message in wrong.text
    assert 'value="400"' in wrong.text  # the person's answer is kept to correct it
    assert _post(plan_server, "delivery-csat", {"nights": "-1"}).status_code == 400
    assert "This field is required." in _post(plan_server, "delivery-csat", {}).text

    answers = [
        {"satisfaction": "5", "channel": "Home delivery", "nights": "30"},
        {"satisfaction": "4", "channel": "Pick-up point", "nights": "12,5"},
        # Not asked for a 4 or 5: an answer to the conditional question is not stored.
        {"satisfaction": "4", "problem": "nothing", "comment": "Quick"},
        {"satisfaction": "1", "channel": "Home delivery", "problem": "The box was wet"},
    ]
    for answer in answers:
        assert _post(plan_server, "delivery-csat", answer).status_code == 200
    stored = [
        e["properties"]["answers"]
        for e in events_of(plan_server, event="Survey Answered")
        if e["properties"]["form_id"] == "delivery-csat"
    ]
    assert {"satisfaction": 4, "comment": "Quick"} in stored
    assert {"satisfaction": 1, "channel": "Home delivery", "problem": "The box was wet"} in stored
    assert {"satisfaction": 4, "channel": "Pick-up point", "nights": 12.5} in stored

    results = plan_server.kilde("surveys", "results", "delivery-csat", "--json")
    summary = json.loads(results.stdout)
    assert summary["submissions"] == 4
    csat, channel, nights, comment, problem = summary["questions"]
    assert (csat["csat"], csat["average"]) == (75.0, 3.5)
    assert csat["distribution"] == {"1": 1, "2": 0, "3": 0, "4": 2, "5": 1}
    assert channel["distribution"] == {"Home delivery": 2, "Pick-up point": 1, "Store": 0}
    assert (nights["responses"], nights["average"]) == (2, 21.25)
    assert (comment["responses"], problem["responses"]) == (1, 1)
    shown = plan_server.kilde("surveys", "results", "delivery-csat")
    assert "CSAT 75.0% satisfied, average 3.5" in shown.stdout


def test_each_consent_box_is_its_own_record_and_none_is_assumed(plan_server: Server) -> None:
    answer = _post(
        plan_server,
        "club",
        {"email": "two.boxes@example.com", "phone": "+47 912 34 567", "consent.advertising": "yes"},
    )
    assert answer.status_code == 200
    person = identifies_with_email(plan_server, "two.boxes@example.com")[0]
    assert person["traits"]["phone"] == "+4791234567"
    assert sorted(ledger(plan_server, person["anonymous_id"])) == [
        ("advertising", "granted", "form:club"),
        ("marketing_email", "denied", "form:club"),
    ]
    # A box sent with a value the page never sends ("on", "true") is a tampered post.
    tampered = _post(
        plan_server,
        "club",
        {"email": "tampered.box@example.com", "consent.marketing_email": "on"},
    )
    assert tampered.status_code == 400
    assert identifies_with_email(plan_server, "tampered.box@example.com") == []
    assert "consent box marketing_email has a value" in dead_letters(plan_server)[0]["reason"]


def test_unknown_forms_in_the_cli_and_api_say_what_to_do(plan_server: Server) -> None:
    api = httpx.get(f"{plan_server.url}/api/forms/nope/results", headers=ADMIN)
    assert api.status_code == 404
    assert api.json()["success"] is False
    assert api.json()["error"] == "unknown_form"
    assert "kilde forms list" in api.json()["fix"]
    cli = plan_server.kilde("surveys", "results", "nope", check=False)
    assert cli.returncode != 0
    assert "kilde forms list" in cli.stdout + cli.stderr
    url = plan_server.kilde("forms", "url", "nope", check=False)
    assert url.returncode != 0
    assert "kilde forms list" in url.stdout + url.stderr
    invite = httpx.post(
        f"{plan_server.url}/api/forms/delivery-csat/invites", json={}, headers=ADMIN
    )
    assert invite.status_code == 400
    assert invite.json()["error"] == "missing_recipient"


def test_plan_check_refuses_a_consent_box_without_consent(tmp_path: Path) -> None:
    from tests.conftest import run_kilde

    plan = yaml.safe_load(DEMO_PLAN.read_text())
    plan["forms"].append(
        {
            **CLUB_FORM,
            "consents": [{"purpose": "order_fulfilment", "label": "Deliver my order"}],
        }
    )
    path = tmp_path / "kilde.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    checked = run_kilde("plan", "check", str(path))
    assert checked.returncode != 0
    assert "only purposes whose legal basis is consent get a consent box" in (
        checked.stdout + checked.stderr
    )


def test_the_documented_declaration_is_a_valid_plan(tmp_path: Path) -> None:
    """docs/forms-and-surveys.md's first YAML block, put into the demo plan, passes the check."""
    from tests.conftest import ROOT, run_kilde

    page = (ROOT / "docs" / "forms-and-surveys.md").read_text()
    block = re.search(r"```yaml\n(.*?)\n```", page, re.S)
    assert block
    documented = yaml.safe_load(block.group(1))
    plan = yaml.safe_load(DEMO_PLAN.read_text())
    for section, key in (("sources", "name"), ("events", "name"), ("forms", "id")):
        names = {item[key] for item in documented[section]}
        plan[section] = [i for i in plan[section] if i.get(key) not in names] + documented[section]
    path = tmp_path / "kilde.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    checked = run_kilde("plan", "check", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok")


def test_a_personal_link_answers_once_even_when_sent_twice_at_once(plan_server: Server) -> None:
    made = httpx.post(
        f"{plan_server.url}/api/forms/delivery-csat/invites",
        json={"user_id": "race-user-1"},
        headers=ADMIN,
    )
    url = made.json()["url"]
    token = url.split("t=", 1)[1]
    csrf = csrf_of(httpx.get(url).text)

    def answer(score: int) -> int:
        data = {"csrf": csrf, "t": token, "satisfaction": str(score)}
        return httpx.post(f"{plan_server.url}/f/delivery-csat", data=data, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = sorted(pool.map(answer, [1, 2, 3, 4]))
    assert codes.count(200) == 1, codes
    assert all(code in (400, 409) for code in codes if code != 200)
    answered = [
        e for e in events_of(plan_server, event="Survey Answered") if e["user_id"] == "race-user-1"
    ]
    assert len(answered) == 1


def test_a_script_on_the_company_site_gets_json_answers(plan_server: Server) -> None:
    """The company's own form, sent by its own script with Accept: application/json."""
    headers = {"Origin": "https://tindra.example", "Accept": "application/json"}
    url = f"{plan_server.url}/f/club"
    wrong = httpx.post(url, data={"email": "not-an-address", "phone": "12"}, headers=headers)
    assert wrong.status_code == 400
    body = wrong.json()
    assert (body["success"], body["error"]) == (False, "invalid_fields")
    assert body["fields"] == {
        "email": "Enter an email address like name@example.com.",
        "phone": "Enter a phone number with its country code, like +47 912 34 567.",
    }
    assert "not-an-address" not in wrong.text  # rules, never the typed values
    assert body["fix"]

    tampered = httpx.post(
        url, data={"email": "a@example.com", "consent.advertising": "on"}, headers=headers
    )
    assert tampered.status_code == 400
    assert tampered.json()["error"] == "form_not_accepted"
    unknown = httpx.post(f"{plan_server.url}/f/nope", data={"email": "x"}, headers=headers)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_form")
    foreign = httpx.post(
        url,
        data={"email": "a@example.com"},
        headers={**headers, "Origin": "https://elsewhere.example"},
    )
    assert (foreign.status_code, foreign.json()["error"]) == (403, "form_not_accepted")

    ok = httpx.post(
        url,
        data={"email": "script.member@example.com", "consent.advertising": "yes"},
        headers=headers,
    )
    assert ok.status_code == 200
    assert ok.json() == {"success": True, "message": "Welcome to the club!"}
    person = identifies_with_email(plan_server, "script.member@example.com")[0]
    assert sorted(ledger(plan_server, person["anonymous_id"])) == [
        ("advertising", "granted", "form:club"),
        ("marketing_email", "denied", "form:club"),
    ]


def test_malformed_posts_get_a_page_never_a_server_error(plan_server: Server) -> None:
    client = httpx.Client(base_url=plan_server.url)
    token = csrf_of(client.get("/f/club").text)
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    invite = httpx.post(
        f"{plan_server.url}/api/forms/delivery-csat/invites",
        json={"email": "other.survey@example.com"},
        headers=ADMIN,
    )
    other_survey = invite.json()["url"].split("t=", 1)[1]
    answers = {
        "not utf-8": client.post(
            "/f/club", content=b"csrf=" + token.encode() + b"&email=\xff\xfe", headers=form_type
        ),
        "a file": client.post("/f/club", data={"csrf": token}, files={"cv": ("cv.txt", b"hi")}),
        "JSON": client.post("/f/club", json={"csrf": token, "email": "json@example.com"}),
        "too many fields": client.post(
            "/f/club", content="&".join([f"csrf={token}"] + ["email=x"] * 300), headers=form_type
        ),
        "a bad survey token": client.post(
            "/f/delivery-csat",
            data={
                "csrf": csrf_of(client.get("/f/delivery-csat").text),
                "t": "forged.token",
                "satisfaction": "5",
            },
        ),
        "a link of another survey": client.get(f"/f/club?t={other_survey}"),
    }
    for what, answer in answers.items():
        assert 400 <= answer.status_code < 500, (what, answer.status_code)
        assert "<h1>" in answer.text, what  # a page a person can read
    assert identifies_with_email(plan_server, "json@example.com") == []
    assert plan_server.kilde("forms", "url", "club").stdout.strip() == f"{plan_server.url}/f/club"


def test_plan_check_wants_an_email_field_for_double_opt_in(tmp_path: Path) -> None:
    """Without an address to mail the link to, a double opt-in box could never be confirmed."""
    from tests.conftest import run_kilde

    plan = yaml.safe_load(DEMO_PLAN.read_text())
    phone_only = {**CLUB_FORM, "fields": [CLUB_FORM["fields"][1]]}
    plan["forms"].append(phone_only)
    path = tmp_path / "kilde.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    checked = run_kilde("plan", "check", str(path))
    assert checked.returncode == 1
    assert "the form needs a field of type email" in checked.stdout
    assert "1 problem(s) found" in checked.stdout


def test_a_submission_the_plan_refuses_stores_nothing_but_dead_letters(plan_server: Server) -> None:
    """All or nothing: when one record of a submission does not fit the plan, none is stored."""
    before = len(dead_letters(plan_server))
    visitor = "visitor-half-stored-1"
    refused = _post(
        plan_server,
        "household",
        {"email": "half.stored@example.com", "people": "2.5", "consent.advertising": "yes"},
        visitor=visitor,
    )
    assert refused.status_code == 503
    assert "Your answers were kept" in refused.text
    assert identifies_with_email(plan_server, "half.stored@example.com") == []
    assert not [
        e
        for e in events_of(plan_server, event="Form Submitted")
        if e["properties"]["form_id"] == "household"
    ]
    consents = [
        e
        for e in events_of(plan_server, event="Consent Updated", source="forms")
        if e["properties"].get("banner_version") == "form:household"
    ]
    assert consents == []  # not even the consent that was given
    assert ledger(plan_server, visitor) == []
    letters = dead_letters(plan_server)[: len(dead_letters(plan_server)) - before]
    assert len(letters) == 3  # the identify, the event and the consent, kept to replay
    assert any("household_size" in letter["reason"] for letter in letters)
    assert "2.5" not in refused.text  # the page does not echo what was typed

    stored = _post(
        plan_server,
        "household",
        {"email": "whole.stored@example.com", "people": "3", "consent.advertising": "yes"},
    )
    assert stored.status_code == 200
    person = identifies_with_email(plan_server, "whole.stored@example.com")[0]
    assert person["traits"]["household_size"] == 3
    assert ledger(plan_server, person["anonymous_id"]) == [
        ("advertising", "granted", "form:household")
    ]


def test_a_refused_submission_is_stored_whole_once_the_plan_is_fixed(
    plan_server: Server,
) -> None:
    """Runs last in this module: it changes the plan (household_size becomes a number)."""
    visitor = "visitor-replayed-1"
    refused = _post(
        plan_server,
        "household",
        {"email": "replayed@example.com", "people": "1.5", "consent.advertising": "yes"},
        visitor=visitor,
    )
    assert refused.status_code == 503
    letters = [
        httpx.get(f"{plan_server.url}/api/bad-events/{letter['id']}", headers=ADMIN).json()
        for letter in dead_letters(plan_server)
    ]
    ids = [letter["id"] for letter in letters if visitor in json.dumps(letter.get("payload"))]
    assert len(ids) == 3

    plan = yaml.safe_load(plan_server.plan_path.read_text())
    for trait in plan["traits"]:
        if trait["name"] == "household_size":
            trait["type"] = "number"
    plan_server.plan_path.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    replayed = httpx.post(
        f"{plan_server.url}/api/bad-events/replay", json={"ids": ids}, headers=ADMIN, timeout=60
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replayed"] == 3, replayed.json()

    person = identifies_with_email(plan_server, "replayed@example.com")[0]
    assert person["traits"]["household_size"] == 1.5
    assert person["anonymous_id"] == visitor
    submitted = [
        e for e in events_of(plan_server, event="Form Submitted") if e["anonymous_id"] == visitor
    ]
    assert [e["properties"]["answers"] for e in submitted] == [{}]  # both fields fill traits
    consent = [
        e for e in events_of(plan_server, event="Consent Updated") if e["anonymous_id"] == visitor
    ]
    assert [e["properties"]["purposes"] for e in consent] == [{"advertising": True}]
    # and the choice is in the consent ledger, as it would have been without the detour
    assert ledger(plan_server, visitor) == [("advertising", "granted", "form:household")]
