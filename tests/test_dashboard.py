"""The dashboard in Chromium against a real server with the demo shop in it.

One server per module: `kilde demo --customers 100` through the CLI, users made with
`kilde users add`. Screenshots go to test-artifacts/dashboard/; with KILDE_DOC_SCREENSHOTS=1 the
ones the docs show are renewed in docs/images/ (a plain test run leaves the tracked files alone).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ADMIN_TOKEN, DEMO_PLAN, WEB_KEY, Server, start_server
from tests.dashboard_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DOC_IMAGES,
    PASSWORDS,
    add_user,
    login,
    screenshot_path,
)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")

PAGES = [
    ("/", "Overview"),
    ("/live", "Live events"),
    ("/profiles", "Profiles"),
    ("/segments", "Segments"),
    ("/insights", "Insights"),
    ("/insights?tab=clv", "Insights"),
    ("/insights?tab=churn", "Insights"),
    ("/insights?tab=preferences", "Insights"),
    ("/insights?tab=funnel", "Insights"),
    ("/insights?tab=retention", "Insights"),
    ("/insights?tab=attribution", "Insights"),
    ("/insights?tab=campaigns", "Insights"),
    ("/insights?tab=surveys", "Insights"),
    ("/quality", "Data quality & plan"),
    ("/privacy", "Privacy"),
    ("/users", "Users"),
]
DESTINATION = """
destinations:
  - name: google-winback
    kind: google_customer_match
    purpose: advertising
    segments: [high-value-at-risk]
"""
DOCS_SHOTS = {"overview", "insights", "segments-saved", "profile", "quality", "overview-phone"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("dashboard")
    plan = base / "kilde.yaml"
    shutil.copy(DEMO_PLAN, plan)
    with plan.open("a") as extra:  # an audience list to run from the page
        extra.write(DESTINATION)
    server = start_server(base / "data", plan, KILDE_TRUST_PROXY="1")
    try:
        server.kilde("demo", "--customers", "100", "--days", "60")
        with httpx.Client(base_url=server.url, headers=server.admin, timeout=300) as api:
            assert api.post("/api/profiles/refresh").status_code == 200
            assert api.post("/api/insights/refresh").status_code == 200
        for role, password in PASSWORDS.items():
            add_user(server, role, role, password)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield found
        found.close()


def _logged_in(
    browser: Browser, shop: Server, role: str, width: int = 1280, height: int = 900
) -> Page:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(f"{shop.url}/login")
    page.get_by_label("User name").fill(role)
    page.get_by_label("Password").fill(PASSWORDS[role])
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    return page


def _shot(page: Page, name: str) -> None:
    path = screenshot_path(name)
    page.screenshot(path=str(path), full_page=True)
    if name in DOCS_SHOTS and os.environ.get("KILDE_DOC_SCREENSHOTS") == "1":
        # the docs show the top of the page, a screenful
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOC_IMAGES / f"dashboard-{name}.png"))


@pytest.fixture
def admin(browser: Browser, shop: Server) -> Iterator[Page]:
    page = _logged_in(browser, shop, "admin")
    yield page
    page.context.close()


def _admin_api(shop: Server) -> httpx.Client:
    return httpx.Client(base_url=shop.url, headers=shop.admin, timeout=120)


def _a_customer(shop: Server) -> tuple[str, str]:
    """A demo customer's email and profile id (from the admin API)."""
    with _admin_api(shop) as api:
        found = api.post("/api/profiles/search", json={"query": "@example.com", "limit": 50})
        for profile in found.json()["profiles"]:
            if profile["email"] and profile["orders"]:
                return profile["email"], profile["profile_id"]
    raise AssertionError("no demo customer with an email and an order")


def test_login_then_every_page_renders(admin: Page, shop: Server) -> None:
    problems: list[str] = []
    admin.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    admin.on("pageerror", lambda e: problems.append(str(e)))
    for path, heading in PAGES:
        response = admin.goto(f"{shop.url}{path}")
        assert response is not None and response.status == 200, path
        expect(admin.get_by_role("heading", level=1)).to_have_text(heading)
        expect(admin.locator("#panel-loading")).to_have_count(0, timeout=60_000)
        assert "internal_error" not in admin.content()
        name = path.strip("/").replace("?tab=", "-") or "overview"
        _shot(admin, name)
    assert problems == []
    # The overview's figures are the demo's: profiles, a dead-letter rate, the web source alive.
    admin.goto(shop.url + "/")
    assert int(admin.locator("[data-kpi=profiles]").inner_text().replace("\u202f", "")) > 50
    web = admin.locator("table tr", has=admin.locator("th", has_text=re.compile("^web$")))
    expect(web).to_contain_text("receiving")
    expect(admin.locator("svg.chart").first).to_be_visible()


def test_wrong_password_is_refused(browser: Browser, shop: Server) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{shop.url}/login?next=/profiles")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("wrong")
    assert _axe_violations(page) == []  # the login form and its error, for screen readers too
    assert not [c for c in context.cookies() if c["name"] == "kilde_session"]
    page.goto(f"{shop.url}/profiles")
    assert "/login" in page.url
    context.close()


def test_search_a_profile_by_email_and_open_it(admin: Page, shop: Server) -> None:
    email, profile_id = _a_customer(shop)
    admin.goto(f"{shop.url}/profiles")
    # how far identity resolution is behind collection, as GET /api/identity/status says
    expect(admin.locator("[data-identity=unread_events]")).to_have_text(
        re.compile(r"^[\d\u202f]+$")
    )
    admin.get_by_label("Identifier or text").fill(email.upper())
    admin.get_by_label("Look for").select_option("email")
    admin.get_by_role("button", name="Search").click()
    expect(admin.get_by_role("heading", name="1 profile found")).to_be_visible()
    assert email not in admin.url.lower()  # sent by POST, not in the address
    admin.get_by_role("link", name=profile_id).click()
    expect(admin.get_by_role("heading", level=1)).to_contain_text(profile_id)
    identities = admin.locator("section", has=admin.get_by_role("heading", name="Identities"))
    expect(identities).to_contain_text(email)
    expect(admin.locator("[data-insight=rfm_group]")).not_to_have_text("\u2013")
    with _admin_api(shop) as api:
        held = api.get(f"/api/profiles/{profile_id}").json()
    expect(admin.locator("[data-insight=rfm_group]")).to_have_text(held["computed"]["rfm_group"])
    assert held["computed"].get("clv") is not None
    for key in ("clv", "churn_risk"):  # lifetime value and churn risk, as the API has them
        shown = admin.locator(f"[data-insight={key}]")
        if held["computed"].get(key) is not None:
            expect(shown).to_have_text(re.compile(r"\d"))
        elif key == "churn_risk" and held["computed"].get("churn_basis"):
            # no model for this person: the inactivity rule's verdict
            flagged = held["computed"].get("churn_flag")
            expect(shown).to_have_text("flagged" if flagged else "not flagged")
        else:  # neither covers them (a customer with a single order): nothing made up
            expect(shown).to_have_text("\u2013")
    traits = admin.locator("section", has=admin.get_by_role("heading", name="Traits"))
    name, trait = next(iter(held["traits"].items()))
    row = traits.locator("tbody tr", has=admin.locator("th", has_text=re.compile(f"^{name}$")))
    expect(row).to_contain_text(str(trait["source"]))  # the provenance: where it came from
    consents = admin.locator("section", has=admin.get_by_role("heading", name="Consents"))
    for purpose, consent in held["consents"].items():
        expect(consents.locator("tr", has_text=purpose)).to_contain_text(consent["state"])
    for segment in held["segments"]:
        expect(consents.get_by_role("listitem").filter(has_text=segment)).to_have_count(1)
    preferences = admin.locator("section", has=admin.get_by_role("heading", name="Preferences"))
    shown = [
        value[0] if isinstance(value, list) else value
        for key in ("favourite_categories", "favourite_products", "preferred_channel")
        if (value := held["computed"].get(key))
    ]
    assert shown, "a customer with orders has preferences"
    for value in shown:
        expect(preferences).to_contain_text(str(value))
    expect(admin.locator("#timeline details").first).to_be_visible()
    admin.locator("#timeline details summary").first.click()
    admin.evaluate("window.scrollTo(0, 0)")  # the docs show the profile's top: who, what value
    _shot(admin, "profile")
    assert email not in shop.log_text()


def test_build_preview_and_save_a_segment(admin: Page, shop: Server) -> None:
    admin.goto(f"{shop.url}/segments")
    admin.locator("#c0_kind").select_option("computed")
    admin.locator("#c0_name").fill("orders")
    admin.locator("#c0_op").select_option("gte")
    admin.locator("#c0_value").fill("2")
    admin.get_by_role("button", name="Preview count and sample").click()
    count = admin.locator("[data-preview-count]")
    expect(count).to_be_visible()
    previewed = int(count.get_attribute("data-preview-count") or "-1")
    with _admin_api(shop) as api:
        expected = api.post(
            "/api/segments/preview", json={"rule": {"all": [{"computed": "orders", "gte": 2}]}}
        ).json()["count"]
    assert previewed == expected > 0
    expect(admin.locator("#preview table tbody tr").first).to_be_visible()  # the sample
    assert _axe_violations(admin) == []  # the preview put in place by htmx
    name = f"Repeat buyers {uuid.uuid4().hex[:6]}"
    admin.get_by_label("Segment name").fill(name)
    admin.get_by_role("button", name="Save segment").click()
    expect(admin.get_by_role("heading", level=1)).to_have_text(name)
    expect(admin.locator("[data-members]")).to_have_attribute("data-members", str(expected))
    _shot(admin, "segments-saved")
    with _admin_api(shop) as api:
        segments = api.get("/api/segments").json()["segments"]
    assert any(s["name"] == name and s["members"] == expected for s in segments)


def test_replay_dead_letters_after_fixing_the_plan(admin: Page, shop: Server) -> None:
    with _admin_api(shop) as api:
        pending = api.get("/api/bad-events", params={"limit": 1000}).json()
    wishlist = [d for d in pending["dead_letters"] if "Wishlist Added" in d["reason"]]
    assert wishlist, "the demo sends events the plan does not know"
    admin.goto(f"{shop.url}/quality")
    group = admin.locator("tr[data-reason-group]", has_text="Wishlist Added")
    expect(group).to_contain_text(str(len(wishlist)))
    # Teach the plan the event, then replay that group from the page.
    text = shop.plan_path.read_text()
    shop.plan_path.write_text(
        text.replace(
            "\nevents:\n", "\nevents:\n  - name: Wishlist Added\n    purposes: [analytics]\n", 1
        )
    )
    group.get_by_role("button", name=re.compile("^Replay")).click()
    expect(admin.locator("[data-result=replay]")).to_contain_text(
        f"Replayed {len(wishlist)}: {len(wishlist)} events stored"
    )
    expect(admin.locator("tr[data-reason-group]", has_text="Wishlist Added")).to_have_count(0)
    _shot(admin, "quality")
    with _admin_api(shop) as api:
        stored = api.get("/api/events", params={"event": "Wishlist Added", "limit": 1000}).json()
    assert stored["count"] == len(wishlist)


def test_export_a_person_from_the_privacy_page(admin: Page, shop: Server) -> None:
    email, _ = _a_customer(shop)
    admin.goto(f"{shop.url}/privacy")
    form = admin.locator("form", has=admin.get_by_role("button", name="Export"))
    form.get_by_label("Person (email").fill(email)
    form.get_by_label("I have verified").check()
    admin.once("dialog", lambda dialog: dialog.accept())
    with admin.expect_download() as download:
        form.get_by_role("button", name="Export").click()
    data = Path(download.value.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        everything = b"".join(archive.read(n) for n in names)
    assert len(names) > 3
    assert email.encode() in everything
    admin.goto(f"{shop.url}/privacy")
    audit = admin.locator("section", has=admin.get_by_role("heading", name=re.compile("Audit")))
    expect(audit.locator("tr", has_text="user:admin").first).to_be_visible()
    expect(audit).to_contain_text("POST /privacy")


def test_live_events_show_a_new_event(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "analyst")
    page.goto(f"{shop.url}/live?type=track")
    marker = f"p-live-{uuid.uuid4().hex[:8]}"
    sent = httpx.post(
        f"{shop.url}/v1/track",
        auth=(WEB_KEY, ""),
        json={
            "anonymousId": str(uuid.uuid4()),
            "event": "Product Viewed",
            "properties": {"product_id": marker, "category": "tents"},
        },
        timeout=30,
    )
    assert sent.status_code == 200, sent.text
    arrived = page.locator("#events details", has_text=marker)
    expect(arrived).to_have_count(1, timeout=20_000)
    arrived.locator("summary").click()
    expect(arrived.locator("pre").first).to_contain_text(marker)
    _shot(page, "live-analyst")
    page.context.close()


def test_viewer_sees_aggregates_only(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "viewer")
    nav = page.get_by_role("navigation", name="Dashboard")
    expect(nav.get_by_role("link", name="Profiles")).to_have_count(0)
    expect(nav.get_by_role("link", name="Privacy")).to_have_count(0)
    for path in ("/profiles", "/privacy", "/users"):
        response = page.goto(f"{shop.url}{path}")
        assert response is not None and response.status == 403, path
        expect(page.get_by_role("heading", level=1)).to_have_text("Not for your role")
    _, profile_id = _a_customer(shop)
    response = page.goto(f"{shop.url}/profiles/{profile_id}")
    assert response is not None and response.status == 403
    page.goto(f"{shop.url}/live")
    expect(page.locator("#events details").first).to_be_visible()
    html = page.content()
    assert "cust-" not in html and "@example.com" not in html  # no ids, no payloads
    page.goto(f"{shop.url}/quality")
    expect(page.get_by_role("button", name=re.compile("Replay"))).to_have_count(0)
    expect(page.get_by_role("button", name="Show payload")).to_have_count(0)
    page.goto(f"{shop.url}/segments")
    page.get_by_role("button", name="Preview count and sample").click()
    expect(page.locator("[data-preview-count]")).to_be_visible()
    expect(page.locator("#preview table")).to_have_count(0)  # a count, not who
    expect(page.get_by_role("button", name="Save segment")).to_have_count(0)
    # Hand-made posts with the viewer's valid CSRF token change nothing either.
    csrf = page.locator("body").get_attribute("data-csrf") or ""
    with _admin_api(shop) as api:
        pending = api.get("/api/bad-events").json()["total"]
        segments = len(api.get("/api/segments").json()["segments"])
    for path, form in (
        ("/quality", {"action": "replay"}),
        (
            "/segments",
            {
                "action": "save",
                "name": "Viewer's own",
                "c0_kind": "computed",
                "c0_name": "orders",
                "c0_op": "gte",
                "c0_value": "1",
            },
        ),
        ("/segments/high-value-at-risk", {}),
        ("/privacy", {"action": "new_request", "kind": "access", "law": "gdpr"}),
    ):
        answer = page.request.post(
            f"{shop.url}{path}", form={"csrf_token": csrf, **form}, headers={"Origin": shop.url}
        )
        assert answer.status == 403, path
    with _admin_api(shop) as api:
        assert api.get("/api/bad-events").json()["total"] == pending
        assert len(api.get("/api/segments").json()["segments"]) == segments
    page.goto(f"{shop.url}/segments/high-value-at-risk")  # how many, over time; not who
    expect(page.get_by_role("heading", name="Membership over time")).to_be_visible()
    expect(page.locator("a[href^='/profiles/']")).to_have_count(0)
    page.goto(f"{shop.url}/insights?tab=clv")
    expect(page.locator("a[href^='/profiles/']")).to_have_count(0)
    _shot(page, "viewer-overview")
    page.context.close()


def test_analyst_cannot_export_or_erase(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "analyst")
    page.goto(f"{shop.url}/privacy")
    expect(page.get_by_role("button", name="Export")).to_have_count(0)
    expect(page.get_by_role("button", name="Erase")).to_have_count(0)
    # A hand-made form post with the analyst's valid CSRF token is still refused.
    email, _ = _a_customer(shop)
    csrf = page.locator("body").get_attribute("data-csrf")
    answer = page.request.post(
        f"{shop.url}/privacy",
        form={"csrf_token": csrf or "", "action": "export", "identifier": email, "confirm": "yes"},
        headers={"Origin": shop.url},
    )
    assert answer.status == 200
    assert "does not allow personal-data export" in answer.text()
    assert "application/zip" not in answer.headers.get("content-type", "")
    erase = page.request.post(
        f"{shop.url}/privacy",
        form={
            "csrf_token": csrf or "",
            "action": "erase",
            "identifier": email,
            "confirm": "yes",
            "typed": "ERASE",
        },
        headers={"Origin": shop.url},
    )
    assert "does not allow personal-data export or erasure" in erase.text()
    with _admin_api(shop) as api:  # the person is still there
        found = api.post("/api/profiles/lookup", json={"email": email})
    assert found.status_code == 200 and found.json()["profiles"]
    # The same on the admin API with the analyst's session.
    refused = page.request.post(
        f"{shop.url}/api/privacy/erase",
        data={"email": email},
        headers={"X-CSRF-Token": csrf or "", "Origin": shop.url},
    )
    assert refused.status == 403 and refused.json()["error"] == "forbidden_for_role"
    page.context.close()


def test_phone_layout(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "admin", width=390, height=844)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400  # nothing wider than the phone's screen
    _shot(page, "overview-phone")
    page.context.close()


def test_keyboard_reaches_the_content(admin: Page, shop: Server) -> None:
    admin.goto(f"{shop.url}/")
    admin.keyboard.press("Tab")
    skip = admin.locator(":focus")
    expect(skip).to_have_text("Skip to content")
    admin.keyboard.press("Enter")
    assert admin.evaluate("document.activeElement.id") == "main"
    for field in admin.locator("input:not([type=hidden]), select, textarea").all():
        assert field.evaluate("e => e.labels.length > 0 || !!e.getAttribute('aria-label')")


def test_admin_token_still_works_everywhere(shop: Server) -> None:
    with httpx.Client(base_url=shop.url, timeout=60) as client:
        for path in ("/api/users", "/api/events", "/api/overview", "/api/me"):
            answer = client.get(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert answer.status_code == 200, path
        assert client.get("/api/users").status_code == 401


def test_upload_an_import_with_progress(admin: Page, shop: Server) -> None:
    sample = Path(__file__).resolve().parent.parent / "docs" / "samples" / "orders.csv"
    admin.goto(f"{shop.url}/quality#imports")
    admin.set_input_files("#upload-file", str(sample))
    admin.get_by_label("Kind").select_option("transactions")
    admin.get_by_label("Source", exact=True).select_option("shop-orders")
    admin.get_by_role("button", name="Upload and import").click()
    status = admin.locator("[data-status]")
    expect(status).to_have_text(re.compile(r"^Import \w+: [1-9]\d* stored"), timeout=60_000)
    expect(admin.locator("#import-runs")).to_contain_text("orders.csv")
    assert admin.locator("progress").evaluate("p => p.value === p.max")
    with _admin_api(shop) as api:
        runs = api.get("/api/imports").json()["imports"]
    assert any(r["file_name"] == "orders.csv" and r["stored"] for r in runs)


def test_the_questions_of_the_issue_by_clicking(admin: Page, shop: Server) -> None:
    """Best customers, who is about to leave, where buyers come from: a few clicks each."""
    with _admin_api(shop) as api:
        groups = {
            g["rfm_group"]: g["customers"] for g in api.get("/api/insights/rfm").json()["groups"]
        }
    best = next(name for name in ("Champions", "Loyal") if groups.get(name))
    admin.goto(f"{shop.url}/insights")
    admin.get_by_role("link", name=best, exact=True).click()
    count = admin.locator("[data-preview-count]")
    expect(count).to_have_attribute("data-preview-count", str(groups[best]))
    expect(admin.locator("#preview tbody tr").first).to_contain_text(best)
    admin.goto(f"{shop.url}/insights?tab=churn")
    admin.get_by_role("link", name="Who is flagged").click()
    expect(admin.locator("[data-preview-count]")).to_be_visible()
    admin.goto(f"{shop.url}/insights?tab=attribution")
    channels = admin.locator(
        "section", has=admin.get_by_role("heading", name="Where buyers come from")
    )
    expect(channels.locator("tbody tr").first).not_to_contain_text("No conversion yet")
    admin.get_by_label("Model").select_option("first_touch")
    admin.get_by_role("button", name="Show").click()
    expect(admin).to_have_url(re.compile("model=first_touch"))
    # What do we hold on this person: the menu, a search, the profile.
    email, _ = _a_customer(shop)
    admin.get_by_role("navigation", name="Dashboard").get_by_role("link", name="Profiles").click()
    admin.get_by_label("Identifier or text").fill(email)
    admin.get_by_role("button", name="Search").click()
    admin.locator("a[href^='/profiles/p_']").first.click()
    for heading in ("Identities", "Consents", "Traits", "Preferences", "Timeline"):
        expect(admin.get_by_role("heading", name=re.compile(f"^{heading}"))).to_be_visible()
    identities = admin.locator("section", has=admin.get_by_role("heading", name="Identities"))
    expect(identities).to_contain_text(email)


def test_run_a_destination_from_the_page(admin: Page, shop: Server) -> None:
    with _admin_api(shop) as api:
        members = api.get("/api/segments/high-value-at-risk").json()["members"]
    admin.goto(f"{shop.url}/quality#destinations")
    row = admin.locator("#destinations tbody tr", has_text="google-winback")
    expect(row).to_contain_text("advertising")
    row.get_by_role("button", name="Run now").click()
    notice = admin.locator("[data-result=destination]")
    expect(notice).to_contain_text("Ran google-winback")
    # The sync's own report: the segment's members, minus those without advertising consent.
    expect(notice).to_contain_text(f"high-value-at-risk members {members}")
    expect(notice).to_contain_text("excluded no consent")


# -- the audit of the issue's items: accessibility, offline, layouts, every figure, bad input --

LAPTOP, PHONE = 1280, 390


def _axe_violations(page: Page) -> list[str]:
    """axe-core's findings on the page as it is now (the copy shipped with the test package)."""
    results = Axe().run(page).response
    # The contrast rule ran (it is the one the issue names), not only the structural ones.
    assert any(rule["id"] == "color-contrast" for rule in results["passes"])
    return [
        f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes'][:3]]}"
        for v in results["violations"]
    ]


@pytest.mark.parametrize(
    ("role", "width"), [("admin", LAPTOP), ("admin", PHONE), ("viewer", PHONE)]
)
def test_every_page_is_accessible_offline_and_fits_the_screen(
    browser: Browser, shop: Server, role: str, width: int
) -> None:
    """axe-core finds nothing (labels, landmarks, contrast, keyboard reach of scrolling boxes),
    nothing is wider than the screen, and the browser asks nothing of any other host."""
    page = _logged_in(browser, shop, role, width=width, height=900)
    elsewhere: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith((shop.url, "data:")) else elsewhere.append(r.url),
    )
    _, profile_id = _a_customer(shop)
    paths = [p for p, _ in PAGES] + ["/segments/high-value-at-risk"]
    if role == "admin":
        paths.append(f"/profiles/{profile_id}")
    found: dict[str, list[str]] = {}
    for path in paths:
        response = page.goto(f"{shop.url}{path}")
        assert response is not None, path
        if role == "viewer" and path in ("/profiles", "/privacy", "/users"):
            assert response.status == 403, path
        else:
            assert response.status == 200, path
        expect(page.locator("#panel-loading")).to_have_count(0, timeout=60_000)
        if page.evaluate("document.documentElement.scrollWidth") > width:
            found[path] = ["wider than the screen"]
        problems = _axe_violations(page)
        if problems:
            found.setdefault(path, []).extend(problems)
    assert found == {}
    assert elsewhere == []
    page.context.close()


def test_a_wide_table_on_a_phone_is_reachable_by_keyboard(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "admin", width=PHONE, height=800)
    page.goto(f"{shop.url}/privacy")
    audit = page.locator("section", has=page.get_by_role("heading", name=re.compile("Audit")))
    expect(audit).to_have_attribute("tabindex", "0")
    audit.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    # the hidden columns come into view (the browser may scroll smoothly: wait for it)
    page.wait_for_function("e => e.scrollLeft > 0", arg=audit.element_handle(), timeout=10_000)
    page.context.close()


def test_overview_shows_the_apis_figures(admin: Page, shop: Server) -> None:
    with _admin_api(shop) as api:
        figures = api.get("/api/overview").json()
        plan = api.get("/api/plan").json()
    admin.goto(shop.url + "/")
    profiles = figures["profiles"]
    kpi = admin.locator("[data-kpi=identified]")
    expect(kpi).to_have_text(f"{profiles['identified_share'] * 100:.1f}\u202f%")
    rate = figures["dead_letters"]["rate"]
    expect(admin.locator("[data-kpi=dead-letter-rate]")).to_have_text(f"{rate * 100:.2f}\u202f%")
    assert 0 < rate < 1 and 0 < profiles["active"] <= profiles["profiles"]
    for heading, series in (
        ("Events per day by source", figures["by_source"]["series"]),
        ("Events per day by channel", figures["by_channel"]["series"]),
    ):
        card = admin.locator("section", has=admin.get_by_role("heading", name=heading))
        expect(card.locator("svg.chart")).to_be_visible()
        for key in series:  # every source / channel has its colour in the legend
            expect(card.locator(".legend li", has_text=key)).to_have_count(1)
    assert {"web", "backend"} <= set(figures["by_source"]["series"])
    assert len(figures["by_channel"]["series"]) > 1  # not all "direct"
    sources = admin.locator("section", has=admin.get_by_role("heading", name="Sources"))
    expect(sources.locator("tbody tr")).to_have_count(len(plan["sources"]))
    consent = admin.locator("section", has=admin.get_by_role("heading", name="Consent per purpose"))
    for row in figures["consent"]:
        expect(consent.locator("tbody tr", has_text=row["purpose"])).to_contain_text(
            f"{row['rate'] * 100:.1f}\u202f%"
        )
    assert {"marketing_email"} <= {row["purpose"] for row in figures["consent"]}


def test_live_events_filter_by_source(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "analyst")
    page.goto(f"{shop.url}/live")
    page.get_by_label("Source").select_option("backend")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"source=backend"))
    badges = page.locator("#events details summary .badge:not(.warn)")
    expect(badges.first).to_be_visible()
    assert set(badges.all_inner_texts()) == {"backend"}
    page.get_by_label("Event name").fill("Order Completed")
    page.get_by_role("button", name="Filter").click()
    names = page.locator("#events details summary .name").all_inner_texts()
    assert names and set(names) == {"Order Completed"}
    page.context.close()


def _a_campaign_with_opens(shop: Server) -> str:
    """A rendered campaign; one recipient's mail app opens it, the other's privacy proxy."""
    campaign = f"dash-{uuid.uuid4().hex[:6]}"
    html = '<html><body><p><a href="https://shop.example/sale">Sale</a></p></body></html>'
    with _admin_api(shop) as api:
        rendered = api.post(
            f"/api/email/campaigns/{campaign}/render",
            json={
                "html": html,
                "recipients": [{"user_id": f"mail-{i}-{campaign}"} for i in (1, 2)],
                "base_url": shop.url,
            },
        )
    assert rendered.status_code == 200, rendered.text
    pixels = [
        re.search(r'src="([^"]*/e/o/[^"]*)"', m["html"]).group(1)  # type: ignore[union-attr]
        for m in rendered.json()["mails"]
    ]
    iphone = (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Mobile/15E148"
    )
    assert httpx.get(pixels[0], headers={"User-Agent": iphone}).status_code == 200
    assert httpx.get(pixels[1], headers={"User-Agent": "Mozilla/5.0"}).status_code == 200  # MPP
    return campaign


def test_every_insights_tab_shows_its_figures(browser: Browser, shop: Server) -> None:
    campaign = _a_campaign_with_opens(shop)
    page = _logged_in(browser, shop, "viewer")  # aggregates: every tab is for viewers too

    def tab(name: str) -> None:
        page.goto(f"{shop.url}/insights?tab={name}")
        expect(page.locator("#panel-loading")).to_have_count(0, timeout=60_000)

    tab("rfm")
    grid = page.locator("section", has=page.get_by_role("heading", name=re.compile("Recency")))
    expect(grid.locator("svg.chart rect.heat")).to_have_count(25)  # 5 x 5
    tab("clv")
    expect(page.get_by_role("img", name=re.compile("Lifetime value"))).to_be_visible()
    expect(page.get_by_role("heading", name="Most valuable customers")).to_have_count(0)
    tab("funnel")
    steps = page.locator("table tbody tr")
    expect(steps).to_have_count(4)
    expect(steps.first).to_contain_text("Product Viewed")
    assert int(steps.first.locator("td").first.inner_text().replace("\u202f", "")) > 0
    tab("retention")
    expect(page.locator("svg.chart rect.heat").first).to_be_visible()
    tab("attribution")
    expect(page.locator("table tbody tr").first).not_to_contain_text("No conversion yet")
    tab("campaigns")
    row = page.locator("tbody tr", has=page.locator("th", has_text=campaign))
    cells = row.locator("td")
    expect(cells.nth(0)).to_have_text("2")  # sent
    expect(cells.nth(1)).to_have_text("1")  # human opens
    expect(cells.nth(2)).to_have_text("1")  # machine opens
    tab("surveys")
    expect(page.get_by_role("heading", name="NPS over time")).to_be_visible()
    expect(page.get_by_role("heading", name="Support sentiment over time")).to_be_visible()
    expect(page.locator("svg.chart").first).to_be_visible()
    page.context.close()


def test_segment_membership_over_time(admin: Page, shop: Server) -> None:
    admin.goto(f"{shop.url}/segments/high-value-at-risk")
    history = admin.locator("section", has=admin.get_by_role("heading", name="Membership over"))
    before = history.locator("tbody tr").count()
    admin.get_by_role("button", name="Refresh now").click()
    expect(admin.get_by_role("status")).to_contain_text("Refreshed:")
    expect(history.locator("tbody tr")).to_have_count(before + 1)
    expect(history.locator("svg.chart")).to_be_visible()


def test_the_plan_and_the_art_30_register(browser: Browser, shop: Server) -> None:
    page = _logged_in(browser, shop, "viewer")
    page.goto(f"{shop.url}/quality#register")
    with _admin_api(shop) as api:
        plan = api.get("/api/plan").json()
    section = page.locator("#register")
    expect(section.get_by_role("heading", level=2)).to_contain_text("Art. 30")
    for purpose in plan["purposes"]:  # one activity per purpose, with its legal basis
        activity = section.get_by_role("heading", name=re.compile(f"^{purpose['id']}: "))
        expect(activity).to_be_visible()
        basis = activity.locator("xpath=following-sibling::dl[1]")
        expect(basis).to_contain_text(purpose["legal_basis"])
    plan_card = page.locator("#plan")
    for source in plan["sources"]:
        expect(plan_card).to_contain_text(source["name"])
    for heading in ("Sources", "Purposes", "Events", "Traits"):
        expect(plan_card.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    page.context.close()


def test_bad_form_input_answers_a_page_not_a_failure(shop: Server) -> None:
    client = login(shop, "admin", PASSWORDS["admin"])
    token = client.get("/api/me").json()["csrf_token"]
    rule = {"c0_kind": "computed", "c0_name": "orders", "c0_op": "gte", "c0_value": "2"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/segments", {**rule, "action": "save", "name": "n" * 500}, "name: String should"),
        ("/segments", {"rule_text": "{all: [", "action": "preview"}, "neither JSON nor YAML"),
        ("/segments", {**rule, "c0_value": "many", "c0_kind": "event"}, "whole number"),
        (
            "/privacy",
            {"action": "new_request", "kind": "access", "law": "gdpr", "note": "x" * 900},
            "note:",
        ),
        ("/privacy", {"action": "erase", "identifier": "a@example.com", "confirm": "yes"}, "ERASE"),
        ("/profiles", {"q": "not-an-email", "kind": "email"}, "not a valid email"),
        ("/quality", {"action": "destination", "destination": "nope"}, "no destination"),
    ]
    for path, form, expected in cases:
        answer = client.post(path, data={**form, "csrf_token": token})
        assert answer.status_code in (200, 400, 404), (path, answer.status_code)
        assert expected in answer.text.replace("&#39;", "'"), (path, form)
        assert "Something went wrong" not in answer.text
    for path in (
        "/live?after=garbage&type=nope",
        "/live/feed?after=WyJ4IiwxXQ==",
        "/insights?tab=funnel&now=1&step=Nope&within=forever",
        "/insights?tab=retention&now=1&period=century",
        "/segments?kind=trait&name=email&op=gte&value=x",
    ):
        assert client.get(path).status_code == 200, path
    for path in ("/segments/no-such-segment", "/profiles/p_00000000000000000000"):
        assert client.get(path).status_code == 404, path
    bad = client.get("/api/overview", params={"days": 0})
    assert bad.status_code == 400 and bad.json()["success"] is False and bad.json()["fix"]
    assert "a@example.com" not in shop.log_text()


def test_privacy_requests_with_deadlines_and_an_erasure(admin: Page, shop: Server) -> None:
    email = f"erase-me-{uuid.uuid4().hex[:6]}@example.org"
    sent = httpx.post(
        f"{shop.url}/v1/identify",
        auth=(WEB_KEY, ""),
        json={"userId": f"u-{email}", "traits": {"email": email}},
        timeout=30,
    )
    assert sent.status_code == 200, sent.text
    admin.goto(f"{shop.url}/privacy")
    note = f"asked by mail {uuid.uuid4().hex[:6]}"
    admin.get_by_label("Kind").select_option("erasure")
    admin.get_by_label("Law").select_option("gdpr")
    admin.get_by_label("Who (email").fill(email)
    admin.get_by_label("Note").fill(note)
    admin.get_by_role("button", name="Log request").click()
    expect(admin.get_by_role("status")).to_contain_text("logged; due")
    row = admin.locator("tbody tr", has_text=note)
    due = (date.today() + timedelta(days=30)).isoformat()  # GDPR: a month
    expect(row).to_contain_text(due)
    expect(row).to_contain_text("days left")
    request_id = row.locator("th code").inner_text()
    # An erasure waits for the requester's identity to be verified (the tracker says so).
    row.get_by_label("Verification").select_option("verified")
    row.get_by_role("button", name="Save").click()
    expect(admin.get_by_role("status")).to_contain_text("Request updated")
    expect(admin.locator("tbody tr", has_text=note)).to_contain_text("verified")
    form = admin.locator("form", has=admin.get_by_role("button", name="Erase"))
    form.get_by_label("Person (email").fill(email)
    form.get_by_label("Request id").fill(request_id)
    form.get_by_label("I have verified").check()
    form.get_by_label("Type ERASE").fill("ERASE")
    admin.once("dialog", lambda dialog: dialog.dismiss())  # "cannot be undone": not now
    form.get_by_role("button", name="Erase").click()
    with _admin_api(shop) as api:
        assert api.post("/api/profiles/lookup", json={"email": email}).json()["profiles"]
    admin.once("dialog", lambda dialog: dialog.accept())
    form.get_by_role("button", name="Erase").click()
    expect(admin.get_by_role("status")).to_contain_text("Erased", timeout=120_000)
    with _admin_api(shop) as api:
        gone = api.post("/api/profiles/lookup", json={"email": email})
        done = api.get(f"/api/privacy/requests/{request_id}").json()
    assert gone.status_code == 404 or not gone.json()["profiles"]
    assert done["state"] == "done"
    admin.goto(f"{shop.url}/privacy?show=all")
    expect(admin.locator("tbody tr", has_text=note)).to_contain_text("done")
    assert email not in shop.log_text()
