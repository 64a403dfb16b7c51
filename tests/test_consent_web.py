"""Consent on the website and in the consent ledger.

With a plan whose analytics purpose needs consent, k.js in a real Chromium sets no cookie,
stores nothing and sends nothing until the documented banner is accepted; Global Privacy Control
opts the visitor out of the plan's sale-or-sharing purpose and is recorded; every choice lands
in the append-only ledger. Segment-style consent signals over HTTP are recorded too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, BrowserContext, Page, Request

from tests.conftest import DEMO_PLAN, WEB_KEY, Server, start_server
from tests.site import chromium, events, ledger, relay, serve_site, wait_for

GPC_SCRIPT = "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"


def consent_plan(path: Path, **web: Any) -> Path:
    """The demo plan with analytics on the basis of consent and an advertising event."""
    plan = yaml.safe_load(DEMO_PLAN.read_text())
    for purpose in plan["purposes"]:
        if purpose["id"] == "analytics":
            purpose["legal_basis"] = "consent"
    plan["events"].append({"name": "Ad Audience Joined", "purposes": ["advertising"]})
    plan["web"] = {**plan.get("web", {}), **web}
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def consent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("consent")
    server = start_server(base / "data", consent_plan(base / "kilde.yaml"))
    yield server
    server.stop()


class Watched:
    """A page and every request it made to the collector."""

    def __init__(self, context: BrowserContext, kilde_url: str) -> None:
        self.context = context
        self.page = context.new_page()
        self.requests: list[str] = []

        def seen(request: Request) -> None:
            if request.url.startswith(kilde_url):
                self.requests.append(request.url.removeprefix(kilde_url).split("?")[0])

        self.page.on("request", seen)

    def stored_anything(self) -> bool:
        return bool(self.context.cookies()) or self.page.evaluate("localStorage.length") > 0


def ready(page: Page) -> None:
    """Wait until k.js is set up (its settings read, the visitor's id settled)."""
    page.wait_for_function("window.kilde && window.kilde.live === true")
    page.evaluate("new Promise(r => kilde.ready(r))")


def test_nothing_is_stored_or_sent_before_the_banner_is_accepted(
    consent_server: Server, browser: Browser
) -> None:
    context = browser.new_context()
    with (
        relay(consent_server.url) as (collector, wire),
        serve_site(collector, banner=True) as site,
    ):
        watched = Watched(context, collector)
        page = watched.page
        page.goto(site.page("/"))
        ready(page)
        assert page.is_visible("#consent-banner")
        page.click("#spa-tent")
        page.click("#view-tent")
        time.sleep(2)  # give k.js every chance to misbehave
        # On the wire (the relay sees keepalive fetches and beacons, which Playwright does not):
        # the script and its settings, nothing else.
        assert wire.paths() == ["/k.js", "/v1/settings"]
        assert watched.requests == ["/k.js", "/v1/settings"]
        assert context.cookies() == []
        assert page.evaluate("localStorage.length") == 0
        assert not watched.stored_anything()

        page.click("#consent-accept")  # analytics yes; the ads box stays unticked
        assert page.is_hidden("#consent-banner")
        anonymous_id = wait_for(lambda: page.evaluate("kilde.anonymousId()"), what="an id")
        cookie = wait_for(
            lambda: next((c for c in context.cookies() if c["name"] == "kilde_aid"), None),
            what="the cookie after consent",
        )
        assert cookie["value"] == anonymous_id
        # What waited for the choice arrives now: two page views, the event, the choice.
        stored = wait_for(
            lambda: (
                (found := events(consent_server, anonymous_id=anonymous_id))
                and len(found) >= 4
                and found
            ),
            what="the events held until consent",
        )
        # The banner stays away on the next page: the choice is remembered.
        with page.expect_navigation():
            page.click("#about")
        ready(page)
        assert page.evaluate("kilde.consent()") == {"analytics": True, "advertising": False}
    context.close()

    kinds = sorted((e["type"], e["event"] or e["page_path"] or "") for e in stored[:4])
    assert kinds == [
        ("page", "/"),
        ("page", "/products/tent"),
        ("track", "Consent Updated"),
        ("track", "Product Viewed"),
    ]
    records = ledger(consent_server, anonymous_id=anonymous_id)
    assert records["current"] == {"analytics": "granted", "advertising": "denied"}
    assert {r["evidence"] for r in records["records"]} == {"banner-2026-11"}
    assert all(r["source"] == "web" and r["channel"] == "http" for r in records["records"])
    assert all(r["ip"] == "127.0.0.0" for r in records["records"])  # truncated by the plan


def test_declining_stores_only_the_choice_and_sends_only_the_choice(
    consent_server: Server, browser: Browser
) -> None:
    context = browser.new_context()
    with (
        relay(consent_server.url) as (collector, wire),
        serve_site(collector, banner=True) as site,
    ):
        watched = Watched(context, collector)
        page = watched.page
        page.goto(site.page("/"))
        ready(page)
        page.click("#view-tent")
        page.click("#consent-decline")
        visitor = page.evaluate("kilde.anonymousId()")
        wait_for(lambda: events(consent_server, anonymous_id=visitor), what="the choice")
        page.click("#spa-tent")
        page.click("#view-tent")
        time.sleep(2)
        assert context.cookies() == []
        keys = page.evaluate("Object.keys(localStorage)")
        assert keys == ["kilde_consent"]
        with page.expect_navigation():
            page.click("#about")  # leaving the page sends nothing either (no beacon)
        ready(page)
        time.sleep(1)
    context.close()
    # Only the choice went over the wire.
    sent = [(m["type"], m.get("event")) for batch in wire.batches() for m in batch]
    assert sent == [("track", "Consent Updated")]
    stored = events(consent_server, anonymous_id=visitor)
    assert [(e["type"], e["event"]) for e in stored] == [("track", "Consent Updated")]
    assert ledger(consent_server, anonymous_id=visitor)["current"] == {
        "analytics": "denied",
        "advertising": "denied",
    }


def test_an_event_for_a_purpose_without_consent_is_sent_only_once_that_purpose_is_granted(
    consent_server: Server, browser: Browser
) -> None:
    context = browser.new_context()
    with (
        relay(consent_server.url) as (collector, wire),
        serve_site(collector, banner=True) as site,
    ):
        page = context.new_page()
        page.goto(site.page("/"))
        ready(page)
        page.click("#consent-accept")  # analytics yes, advertising left unticked
        visitor = wait_for(lambda: page.evaluate("kilde.anonymousId()"), what="an id")
        page.click("#join-ads")  # serves advertising only: not sent
        page.click("#view-tent")
        wait_for(
            lambda: any(
                e["event"] == "Product Viewed" for e in events(consent_server, anonymous_id=visitor)
            ),
            what="the product view",
        )
        # Later, on the site's privacy settings page, the visitor allows advertising.
        page.evaluate("kilde.consent({advertising: true}, {version: 'settings-page-1'})")
        page.click("#join-ads")
        stored = wait_for(
            lambda: (
                (found := events(consent_server, anonymous_id=visitor))
                and any(e["event"] == "Ad Audience Joined" for e in found)
                and found
            ),
            what="the advertising event",
        )
    context.close()
    sent = [m.get("event") or m["type"] for batch in wire.batches() for m in batch]
    assert sent.count("Ad Audience Joined") == 1  # the click before the grant never left
    choices = [at for at, name in enumerate(sent) if name == "Consent Updated"]
    assert len(choices) == 2 and sent.index("Ad Audience Joined") > choices[1]
    assert [e["event"] for e in stored].count("Ad Audience Joined") == 1
    advertising = [
        (r["state"], r["evidence"])
        for r in ledger(consent_server, anonymous_id=visitor)["records"]
        if r["purpose"] == "advertising"
    ]
    assert advertising == [("denied", "banner-2026-11"), ("granted", "settings-page-1")]


@pytest.mark.parametrize("cookie_answer", ["settled", "on its way"])
def test_withdrawing_consent_deletes_the_cookie_and_is_recorded(
    consent_server: Server, browser: Browser, cookie_answer: str
) -> None:
    """Withdrawn after the id settled, or while the collector's cookie answer is on its way
    (then the grant and the withdrawal still land in the order the visitor made them)."""
    context = browser.new_context()
    with (
        relay(consent_server.url) as (collector, wire),
        serve_site(collector, banner=True) as site,
    ):
        page = context.new_page()
        page.goto(site.page("/"))
        ready(page)
        if cookie_answer == "on its way":
            wire.cookie_gate.clear()
        page.click("#consent-accept")
        visitor = wait_for(lambda: page.evaluate("kilde.anonymousId()"), what="an id")
        wait_for(lambda: context.cookies(), what="the cookie")
        if cookie_answer == "settled":
            wait_for(lambda: "Consent Updated" in str(wire.batches()), what="the grant")
        else:
            wait_for(lambda: "/v1/cookie" in wire.paths(), what="the cookie request")
        page.evaluate("kilde.consent({analytics: false}, {version: 'settings-page-1'})")
        wire.cookie_gate.set()
        wait_for(
            lambda: (
                ledger(consent_server, anonymous_id=visitor)["current"].get("analytics")
                == "withdrawn"
            ),
            what="the withdrawal",
        )
        wait_for(lambda: not [c for c in context.cookies() if c["name"] == "kilde_aid"], what="x")
        assert page.evaluate("Object.keys(localStorage)") == ["kilde_consent"]
        assert page.evaluate("kilde.anonymousId()") != visitor  # the old id is forgotten
    context.close()
    states = [
        (r["purpose"], r["state"], r["evidence"])
        for r in ledger(consent_server, anonymous_id=visitor)["records"]
    ]
    assert states == [
        ("analytics", "granted", "banner-2026-11"),
        ("advertising", "denied", "banner-2026-11"),
        ("analytics", "withdrawn", "settings-page-1"),
    ]


@pytest.mark.parametrize("signal", ["navigator", "header"])
def test_global_privacy_control_opts_out_of_sharing_and_is_recorded(
    consent_server: Server, browser: Browser, signal: str
) -> None:
    if signal == "navigator":
        context = browser.new_context()
        context.add_init_script(GPC_SCRIPT)
    else:
        context = browser.new_context(extra_http_headers={"Sec-GPC": "1"})
    with (
        relay(consent_server.url) as (collector, wire),
        serve_site(collector, banner=True) as site,
    ):
        page = context.new_page()
        page.goto(site.page("/"))
        ready(page)
        page.check("#consent-ads")  # the visitor ticks "show me your ads" ...
        page.click("#consent-accept")
        visitor = wait_for(lambda: page.evaluate("kilde.anonymousId()"), what="an id")
        # The choice is recorded first (else a later event's GPC signal may be, and the choice
        # repeats the denial: two rows saying the same).
        wait_for(lambda: ledger(consent_server, anonymous_id=visitor)["records"], what="choice")
        page.click("#join-ads")  # ... but an event serving only advertising is not sent
        page.click("#view-tent")
        stored = wait_for(
            lambda: (
                (found := events(consent_server, anonymous_id=visitor))
                and any(e["event"] == "Product Viewed" for e in found)
                and found
            ),
            what="the product view",
        )
    context.close()
    assert "Ad Audience Joined" not in {e["event"] for e in stored}
    sent = {m.get("event") for batch in wire.batches() for m in batch}
    assert "Consent Updated" in sent and "Ad Audience Joined" not in sent  # never left
    assert all(e["context"].get("gpc") is True for e in stored)
    choice = next(e for e in stored if e["event"] == "Consent Updated")
    assert choice["properties"]["purposes"] == {"analytics": True, "advertising": False}
    records = ledger(consent_server, anonymous_id=visitor)
    assert records["current"] == {"analytics": "granted", "advertising": "denied"}
    advertising = [r for r in records["records"] if r["purpose"] == "advertising"]
    assert [(r["state"], r["evidence"]) for r in advertising] == [("denied", "gpc")]


def test_cookieless_page_count_when_the_plan_allows_it(browser: Browser, tmp_path: Path) -> None:
    plan = consent_plan(tmp_path / "kilde.yaml", cookieless_page_count=True)
    server = start_server(tmp_path / "data", plan)
    context = browser.new_context()
    try:
        with serve_site(server.url, banner=True) as site:
            page = context.new_page()
            page.goto(site.page("/?utm_source=secret-campaign"))
            ready(page)
            page.click("#view-tent")
            stored = wait_for(
                lambda: events(server, anonymous_id="cookieless"), what="the cookieless count"
            )
            time.sleep(1)
            assert context.cookies() == []
            assert page.evaluate("localStorage.length") == 0
            everything = events(server)
    finally:
        context.close()
        server.stop()
    assert len(stored) == 1
    assert stored[0]["properties"] == {"path": "/"}  # no query string, no referrer, no id
    assert stored[0]["context"]["cookieless"] is True
    assert "campaign" not in stored[0]["context"]
    assert [e["anonymous_id"] for e in everything] == ["cookieless"]  # the event was held


# -- consent over HTTP (Segment's SDKs, other senders) ------------------------------------------


def send(server: Server, message: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/track", json=message, auth=(WEB_KEY, ""), headers=headers)


def test_segment_category_preferences_are_recorded_when_they_change(kilde_server: Server) -> None:
    visitor = f"seg-{uuid.uuid4()}"

    def viewed(preferences: dict[str, bool]) -> None:
        answer = send(
            kilde_server,
            {
                "anonymousId": visitor,
                "event": "Product Viewed",
                "properties": {"product_id": "p-1"},
                "context": {"consent": {"categoryPreferences": preferences}},
            },
        )
        assert answer.status_code == 200, answer.text

    viewed({"Analytics": True, "Advertising": True})
    viewed({"Analytics": True, "Advertising": True})  # the same again: nothing new
    viewed({"Analytics": True, "Advertising": False})
    records = ledger(kilde_server, anonymous_id=visitor)["records"]
    assert [(r["purpose"], r["state"], r["evidence"]) for r in records] == [
        ("analytics", "granted", "categoryPreferences"),
        ("advertising", "granted", "categoryPreferences"),
        ("advertising", "withdrawn", "categoryPreferences"),
    ]


def test_consent_event_sent_twice_is_recorded_once_and_bad_ones_are_dead_lettered(
    kilde_server: Server,
) -> None:
    visitor = f"twice-{uuid.uuid4()}"
    message = {
        "anonymousId": visitor,
        "messageId": f"choice-{visitor}",
        "event": "Consent Updated",
        "properties": {"purposes": {"marketing_email": True}, "banner_version": "b-1"},
    }
    for _ in range(2):
        assert send(kilde_server, message).status_code == 200
    records = ledger(kilde_server, anonymous_id=visitor)["records"]
    assert [(r["purpose"], r["state"]) for r in records] == [("marketing_email", "granted")]

    for purposes in ({}, {"analytics": "maybe"}, "yes"):
        bad = send(
            kilde_server, {**message, "messageId": None, "properties": {"purposes": purposes}}
        )
        assert bad.status_code == 400
        body = bad.json()
        assert body["error"] == "invalid_consent" and body["dead_letter_id"] and body["fix"]
        assert "maybe" not in body["message"]


def test_gpc_on_a_segment_message_records_the_opt_out(kilde_server: Server) -> None:
    visitor = f"gpc-{uuid.uuid4()}"
    for _ in range(2):
        answer = send(
            kilde_server,
            {
                "anonymousId": visitor,
                "event": "Signed In",
                "context": {"gpc": True},
            },
        )
        assert answer.status_code == 200, answer.text
    records = ledger(kilde_server, anonymous_id=visitor)["records"]
    assert [(r["purpose"], r["state"], r["evidence"]) for r in records] == [
        ("advertising", "denied", "gpc")
    ]


def test_consent_api_needs_the_admin_token_and_a_person(kilde_server: Server) -> None:
    assert httpx.get(f"{kilde_server.url}/api/consent?user_id=x").status_code == 401
    missing = httpx.get(f"{kilde_server.url}/api/consent", headers=kilde_server.admin)
    assert missing.status_code == 400 and missing.json()["fix"]
