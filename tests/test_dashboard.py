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
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ADMIN_TOKEN, DEMO_PLAN, WEB_KEY, Server, start_server
from tests.dashboard_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DOC_IMAGES,
    PASSWORDS,
    add_user,
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
    assert not [c for c in context.cookies() if c["name"] == "kilde_session"]
    page.goto(f"{shop.url}/profiles")
    assert "/login" in page.url
    context.close()


def test_search_a_profile_by_email_and_open_it(admin: Page, shop: Server) -> None:
    email, profile_id = _a_customer(shop)
    admin.goto(f"{shop.url}/profiles")
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
    expect(admin.locator("#timeline details").first).to_be_visible()
    admin.locator("#timeline details summary").first.click()
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
