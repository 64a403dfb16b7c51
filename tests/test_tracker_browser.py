"""k.js in a real headless Chromium on a test shop served from another port.

What a website owner notices: the visitor gets a first-party cookie, page views (also single-page
navigation) arrive with campaign and device context, signing in ties the earlier anonymous visit
to the person, events made while the collector is down arrive once it is back, and the script
itself is small and cached.
"""

from __future__ import annotations

import gzip
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, BrowserContext, Page, Route

from kilde.collect.tracker import snippet
from tests.conftest import DEMO_PLAN, WEB_KEY, Server, start_server
from tests.site import SITE, Site, chromium, events, relay, serve_site, wait_for

YEAR = 365 * 24 * 3600


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()
    yield ctx
    ctx.close()


def ready(page: Page) -> str:
    """Wait until k.js is set up; return the visitor's anonymous id."""
    page.wait_for_function("window.kilde && window.kilde.live === true")
    anonymous_id: str = page.evaluate("new Promise(r => kilde.ready(() => r(kilde.anonymousId())))")
    return anonymous_id


def arrived(server: Server, count: int, **params: str) -> list[dict[str, Any]]:
    return wait_for(
        lambda: (found := events(server, **params)) and len(found) >= count and found,
        what=f"{count} events for {params}",
    )


def visit(context: BrowserContext, site: Site, server: Server) -> tuple[Page, str]:
    """Open the shop's home page and wait for its page view: (the page, the visitor's id)."""
    page = context.new_page()
    page.goto(site.page("/"))
    anonymous_id = ready(page)
    arrived(server, 1, anonymous_id=anonymous_id)
    return page, anonymous_id


def dead_letters_of(server: Server, anonymous_id: str) -> list[str]:
    """The web source's dead letters of this visitor, each as the text of its detail."""
    letters = httpx.get(
        f"{server.url}/api/bad-events",
        params={"source": "web", "limit": "1000"},
        headers=server.admin,
    ).json()["dead_letters"]
    details = [
        httpx.get(f"{server.url}/api/bad-events/{d['id']}", headers=server.admin).text
        for d in letters
    ]
    return [text for text in details if anonymous_id in text]


LANDING = (
    "/?utm_source=newsletter&utm_medium=email&utm_campaign=autumn&utm_term=tent"
    "&utm_content=hero&gclid=g-1&fbclid=fb-1"
)


def test_visit_gets_a_cookie_and_page_views_arrive_with_spa_navigation_and_campaign(
    kilde_server: Server, browser: Browser
) -> None:
    context = browser.new_context(
        locale="nb-NO",
        timezone_id="Europe/Oslo",
        viewport={"width": 1280, "height": 800},
        device_scale_factor=2,
    )
    with serve_site(kilde_server.url) as site:
        page = context.new_page()
        page.goto(site.page(LANDING), referer="https://search.example/?q=tent")
        anonymous_id = ready(page)

        cookie = next(c for c in context.cookies() if c["name"] == "kilde_aid")
        assert cookie["value"] == anonymous_id
        assert cookie["sameSite"] == "Lax"
        assert cookie["secure"] is False  # plain http here; Secure on https
        assert YEAR - 3600 < cookie["expires"] - time.time() <= YEAR + 60
        assert page.evaluate("localStorage.getItem('kilde_aid')") == anonymous_id

        page.click("#spa-tent")  # History API navigation, no page load
        page.click("#view-tent")
        stored = arrived(kilde_server, 3, anonymous_id=anonymous_id)
    context.close()

    pages = [e for e in stored if e["type"] == "page"]
    assert [e["page_url"].removeprefix(site.url) for e in pages] == [LANDING, "/products/tent"]
    assert pages[0]["properties"]["referrer"] == "https://search.example/?q=tent"
    assert pages[1]["properties"]["referrer"] == pages[0]["page_url"]  # SPA: previous address
    assert pages[1]["properties"]["title"] == "Tent - Fjord & Fell"
    first = pages[0]["context"]
    assert first["campaign"] == {
        "source": "newsletter",
        "medium": "email",
        "name": "autumn",
        "term": "tent",
        "content": "hero",
        "gclid": "g-1",
        "fbclid": "fb-1",
    }
    assert first["screen"] == {"width": 1280, "height": 800, "density": 2}
    assert first["locale"] == "nb-NO" and first["timezone"] == "Europe/Oslo"
    assert first["library"]["name"] == "kilde.js"
    track = next(e for e in stored if e["type"] == "track")
    assert track["event"] == "Product Viewed"
    assert track["properties"]["product_id"] == "tent-2p"
    assert track["plan_status"] == "ok"
    assert pages[0]["browser"] == "HeadlessChrome" or pages[0]["browser"]


def admin_get(server: Server, path: str, **params: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}{path}", params=params, headers=server.admin, timeout=60)
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


def profile_of(server: Server, **ids: str) -> dict[str, Any]:
    """The one profile holding `ids`, once identity resolution has processed what is stored."""
    refreshed = httpx.post(f"{server.url}/api/profiles/refresh", headers=server.admin, timeout=90)
    assert refreshed.status_code == 200, refreshed.text
    found = httpx.post(
        f"{server.url}/api/profiles/lookup", json=ids, headers=server.admin, timeout=60
    ).json()["profiles"]
    assert len(found) == 1, found
    return admin_get(server, f"/api/profiles/{found[0]['profile_id']}")


def test_identify_after_browsing_ties_the_anonymous_visit_to_the_user(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page = context.new_page()
        page.goto(site.page("/"))
        anonymous_id = ready(page)
        page.click("#spa-tent")
        arrived(kilde_server, 2, anonymous_id=anonymous_id)

        page.evaluate("kilde.identify('browser-user-1', {email: 'ingrid@example.com'})")
        with page.expect_navigation():
            page.click("#about")  # a full page load: the ids come from the cookie and storage
        assert ready(page) == anonymous_id
        stored = arrived(kilde_server, 4, anonymous_id=anonymous_id)

    before, identify, after = stored[:2], stored[2], stored[3]
    assert [e["user_id"] for e in before] == [None, None]
    assert identify["type"] == "identify"
    assert identify["user_id"] == "browser-user-1"
    assert identify["traits"] == {"email": "ingrid@example.com"}
    assert after["type"] == "page" and after["page_path"] == "/about.html"
    assert after["user_id"] == "browser-user-1"
    # Everything the visitor did, before and after signing in, shares one anonymous id.
    assert {e["anonymous_id"] for e in stored} == {anonymous_id}

    # The person's profile holds the page views made before signing in.
    profile = profile_of(kilde_server, user_id="browser-user-1")
    assert {"type": "anonymous_id", "value": anonymous_id} in [
        {"type": i["type"], "value": i["value"]} for i in profile["identities"]
    ]
    timeline = admin_get(
        kilde_server, f"/api/profiles/{profile['profile_id']}/events", limit="1000"
    )["events"]
    assert {e["message_id"] for e in stored} <= {e["message_id"] for e in timeline}
    anonymous_views = [e for e in timeline if e["type"] == "page" and e["user_id"] is None]
    assert len(anonymous_views) == 2


def test_reset_on_sign_out_starts_a_new_anonymous_id(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page = context.new_page()
        page.goto(site.page("/"))
        first = ready(page)
        page.evaluate("kilde.identify('browser-user-2'); kilde.reset()")
        second = page.evaluate("kilde.anonymousId()")
        page.evaluate("kilde.page()")
        stored = arrived(kilde_server, 1, anonymous_id=second)
    assert second != first
    assert next(c["value"] for c in context.cookies() if c["name"] == "kilde_aid") == second
    assert stored[0]["user_id"] is None


def test_the_collectors_cookie_outlives_a_lost_script_cookie(
    kilde_server: Server, context: BrowserContext
) -> None:
    """Safari drops script-set cookies after 7 days; the HTTP cookie set by /v1/cookie stays."""
    with serve_site(kilde_server.url) as site:
        context.add_cookies(
            [
                {
                    "name": "kilde_aid",
                    "value": "server-kept-visitor-1",
                    "domain": "127.0.0.1",
                    "path": "/",
                    "httpOnly": True,  # invisible to scripts: only the collector can read it
                    "sameSite": "Lax",
                }
            ]
        )
        page = context.new_page()
        page.goto(site.page("/"))
        assert ready(page) == "server-kept-visitor-1"
        assert page.evaluate("localStorage.getItem('kilde_aid')") == "server-kept-visitor-1"
        stored = arrived(kilde_server, 1, anonymous_id="server-kept-visitor-1")
    assert stored[0]["type"] == "page"


def test_events_made_while_the_collector_is_down_arrive_when_it_is_back(
    context: BrowserContext, tmp_path: Path
) -> None:
    plan = tmp_path / "kilde.yaml"
    shutil.copy(DEMO_PLAN, plan)
    server = start_server(tmp_path / "data", plan)
    port = int(server.url.rsplit(":", 1)[1])

    def queued() -> int:
        length: int = page.evaluate(
            "JSON.parse(localStorage.getItem('kilde_queue') || '[]').length"
        )
        return length

    try:
        with relay(server.url) as (collector, wire), serve_site(collector) as site:
            page, anonymous_id = visit(context, site, server)

            server.stop()
            page.click("#spa-tent")
            page.click("#view-tent")
            # Kept in localStorage while the collector cannot be reached.
            wait_for(lambda: queued() >= 2, what="the offline queue")
            # A second attempt shows k.js has seen the first fail (and now keeps the queue for
            # later instead of handing it to sendBeacon when the page is left).
            wait_for(lambda: wire.failed >= 2, what="a retry of a send that failed")
            # The visitor goes on to another page while the collector is still down: the
            # queue survives the page load (k.js comes from the browser's cache).
            with page.expect_navigation():
                page.click("#about")
            ready(page)
            wait_for(lambda: queued() >= 3, what="the offline queue on the next page")
            server = start_server(tmp_path / "data", plan, port=port)
            stored = wait_for(
                lambda: (
                    (found := events(server, anonymous_id=anonymous_id))
                    and len(found) >= 4
                    and found
                ),
                timeout=90,
                what="the queued events after the restart",
            )
            wait_for(lambda: queued() == 0, what="the queue to empty")
    finally:
        server.stop()
    assert [(e["type"], e["event"] or e["page_path"]) for e in stored] == [
        ("page", "/"),
        ("page", "/products/tent"),
        ("track", "Product Viewed"),
        ("page", "/about.html"),
    ]


def test_two_tabs_offline_keep_each_others_queued_events(
    kilde_server: Server, context: BrowserContext
) -> None:
    def stored_queue(page: Page) -> list[str]:
        """What waits in the shared localStorage queue: product ids, or the message type."""
        names: list[str] = page.evaluate(
            "JSON.parse(localStorage.getItem('kilde_queue') || '[]')"
            ".map(m => (m.properties && m.properties.product_id) || m.type)"
        )
        return names

    with relay(kilde_server.url) as (collector, wire), serve_site(collector) as site:
        first = context.new_page()
        first.goto(site.page("/"))
        anonymous_id = ready(first)
        second = context.new_page()
        second.goto(site.page("/about.html"))
        assert ready(second) == anonymous_id  # one visitor, two tabs
        arrived(kilde_server, 2, anonymous_id=anonymous_id)

        wire.down = True  # the visitor's connection drops
        track = "kilde.track('Product Viewed', {product_id: '%s'})"
        first.evaluate(track % "tab-1-a")
        wait_for(lambda: "tab-1-a" in stored_queue(first), what="the first tab's event")
        second.evaluate(track % "tab-2")
        wait_for(lambda: "tab-2" in stored_queue(second), what="the second tab's event")
        wait_for(lambda: wire.failed >= 2, what="both tabs to see the collector down")
        first.evaluate(track % "tab-1-b")
        # Each tab wrote the shared queue last once; neither wiped out the other's event.
        wait_for(
            lambda: sorted(stored_queue(first)) == ["tab-1-a", "tab-1-b", "tab-2"],
            what="all three events in the shared queue",
        )
        second.close()  # the second tab goes away before the connection is back

        wire.down = False
        first.evaluate("window.dispatchEvent(new Event('online'))")
        # The first tab sends its own two; the next page sends what the closed tab left.
        arrived(kilde_server, 4, anonymous_id=anonymous_id)
        first.goto(site.page("/"))
        stored = arrived(kilde_server, 6, anonymous_id=anonymous_id)
        wait_for(lambda: stored_queue(first) == [], what="the queue to empty")
    viewed = sorted(e["properties"]["product_id"] for e in stored if e["type"] == "track")
    assert viewed == ["tab-1-a", "tab-1-b", "tab-2"]


def test_a_track_call_without_a_name_is_kept_as_a_dead_letter_not_stored_as_undefined(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page = context.new_page()
        warnings: list[str] = []
        page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
        page.goto(site.page("/"))
        anonymous_id = ready(page)
        page.evaluate("kilde.track(); kilde.track('Signed In')")
        stored = arrived(kilde_server, 2, anonymous_id=anonymous_id)
        wait_for(
            lambda: page.evaluate("localStorage.getItem('kilde_queue')") == "[]",
            what="the queue to empty",
        )
    assert [e["event"] for e in stored if e["type"] == "track"] == ["Signed In"]
    assert any("kilde.track needs an event name" in text for text in warnings)
    (letter,) = dead_letters_of(kilde_server, anonymous_id)
    assert "a track message needs an event name" in letter and "missing_event" in letter


def test_events_are_batched_and_retried_with_backoff_until_the_collector_takes_them(
    kilde_server: Server, context: BrowserContext
) -> None:
    with relay(kilde_server.url) as (collector, wire), serve_site(collector) as site:
        page, anonymous_id = visit(context, site, kilde_server)
        wire.busy = 2  # the next two sends meet an overloaded collector (503)
        page.evaluate(
            "kilde.track('Product Viewed', {product_id: 'a'});"
            "kilde.track('Product Viewed', {product_id: 'b'});"
            "kilde.track('Product Viewed', {product_id: 'c'})"
        )
        stored = arrived(kilde_server, 4, anonymous_id=anonymous_id)
        wait_for(
            lambda: page.evaluate("localStorage.getItem('kilde_queue')") == "[]",
            what="the queue to empty",
        )
    sent = [[m["messageId"] for m in batch] for batch in wire.batches()]
    # The page view went alone; the three events made at once went in one request (a batch),
    # refused twice and sent again with the same messages, then stored once each.
    assert len(sent) == 4 and len(sent[0]) == 1
    assert len(sent[1]) == 3 and sent[1] == sent[2] == sent[3]
    tracked = [e for e in stored if e["type"] == "track"]
    assert sorted(e["properties"]["product_id"] for e in tracked) == ["a", "b", "c"]
    assert sorted(e["message_id"] for e in tracked) == sorted(sent[1])


def test_without_automatic_page_views_only_the_sites_own_calls_are_sent(
    kilde_server: Server, context: BrowserContext
) -> None:
    """The snippet of `kilde snippet --no-auto-page`: the site calls kilde.page() itself."""
    with (
        relay(kilde_server.url) as (collector, wire),
        serve_site(collector, auto_page=False) as site,
    ):
        page = context.new_page()
        page.goto(site.page("/"))
        anonymous_id = ready(page)
        page.click("#spa-tent")  # a History API navigation: no automatic page view either
        page.evaluate("kilde.page('Tent', {section: 'tents'})")
        stored = arrived(kilde_server, 1, anonymous_id=anonymous_id)
        time.sleep(1)
    sent = [(m["type"], m.get("name")) for batch in wire.batches() for m in batch]
    assert sent == [("page", "Tent")]
    assert stored[0]["page_path"] == "/products/tent"
    assert stored[0]["properties"]["section"] == "tents"


def test_script_is_small_cached_versioned_and_cross_origin(kilde_server: Server) -> None:
    plain = httpx.get(f"{kilde_server.url}/k.js")
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("text/javascript")
    version = plain.headers["x-kilde-version"]
    assert f'"{version}"' in plain.text  # the script knows its version
    assert plain.headers["cache-control"] == "public, max-age=3600"

    with httpx.Client(headers={"Accept-Encoding": "gzip"}) as client:
        answer = client.send(client.build_request("GET", f"{kilde_server.url}/k.js"), stream=True)
        zipped = b"".join(answer.iter_raw())  # the bytes on the wire
        answer.close()
    assert answer.headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped) == plain.content
    assert len(zipped) < 6 * 1024, f"k.js is {len(zipped)} bytes gzipped"

    versioned = httpx.get(f"{kilde_server.url}/k.js", params={"v": version})
    assert versioned.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert f"/k.js?v={version}" in snippet(kilde_server.url, WEB_KEY)
    again = httpx.get(f"{kilde_server.url}/k.js", headers={"If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_settings_and_cookie_endpoints_answer_browsers_from_other_origins(
    kilde_server: Server,
) -> None:
    origin = "http://127.0.0.1:1"
    settings = httpx.get(
        f"{kilde_server.url}/v1/settings", params={"writeKey": WEB_KEY}, headers={"Origin": origin}
    )
    assert settings.status_code == 200
    assert settings.headers["access-control-allow-origin"] == "*"
    assert "set-cookie" not in settings.headers
    body = settings.json()
    assert body["purposes"]["advertising"] == {"consent": True, "sale": True}
    assert body["cookie"] == ["analytics"]
    assert body["events"]["track:Order Completed"] == ["order_fulfilment", "analytics"]
    unknown = httpx.get(f"{kilde_server.url}/v1/settings", params={"writeKey": "not-a-key-123"})
    assert unknown.status_code == 401 and unknown.json()["success"] is False
    assert "not-a-key-123" not in unknown.text

    made = httpx.post(
        f"{kilde_server.url}/v1/cookie",
        content=b'{"writeKey": "%s", "anonymousId": "browser-made-id-1"}' % WEB_KEY.encode(),
        headers={"Origin": origin, "Content-Type": "text/plain"},
    )
    assert made.status_code == 200
    assert made.json()["anonymousId"] == "browser-made-id-1"
    assert made.headers["access-control-allow-origin"] == origin
    assert made.headers["access-control-allow-credentials"] == "true"
    assert made.headers["cache-control"] == "no-store"
    set_cookie = made.headers["set-cookie"].lower()
    for part in ("kilde_aid=browser-made-id-1", "max-age=31536000", "path=/", "samesite=lax"):
        assert part in set_cookie
    assert "secure" not in set_cookie and "httponly" not in set_cookie

    # The cookie the browser already holds is the one that lasted: it wins.
    kept = httpx.post(
        f"{kilde_server.url}/v1/cookie",
        json={"writeKey": WEB_KEY, "anonymousId": "fresh-id-after-itp"},
        headers={"Cookie": "kilde_aid=durable-visitor-1"},
    )
    assert kept.json()["anonymousId"] == "durable-visitor-1"
    # An id that is not ours is replaced, not echoed.
    odd = httpx.post(
        f"{kilde_server.url}/v1/cookie", json={"writeKey": WEB_KEY, "anonymousId": "<script>"}
    )
    assert odd.status_code == 200 and "<script>" not in odd.text
    forgotten = httpx.post(
        f"{kilde_server.url}/v1/cookie", json={"writeKey": WEB_KEY, "forget": True}
    )
    assert 'kilde_aid=""' in forgotten.headers["set-cookie"]
    assert "max-age=0" in forgotten.headers["set-cookie"].lower()

    for bad, status in ((b"not json", 400), (b'{"writeKey": "nope-nope-1"}', 401)):
        answer = httpx.post(f"{kilde_server.url}/v1/cookie", content=bad)
        assert answer.status_code == status
        assert answer.json()["success"] is False and answer.json()["fix"]


def test_cookie_is_secure_behind_an_https_proxy(own_server: Server) -> None:
    own_server.stop()
    server = start_server(own_server.data_dir, own_server.plan_path, KILDE_TRUST_PROXY="1")
    try:
        answer = httpx.post(
            f"{server.url}/v1/cookie",
            json={"writeKey": WEB_KEY},
            headers={"X-Forwarded-Proto": "https"},
        )
    finally:
        server.stop()
    assert "; secure" in answer.headers["set-cookie"].lower()


def test_snippet_command_prints_the_snippet_for_a_source(kilde_server: Server) -> None:
    printed = kilde_server.kilde("snippet", "--source", "web").stdout
    # Without --collector it points at the running server, with the plan's write key.
    assert f'"{kilde_server.url}","{WEB_KEY}"' in printed
    assert printed.strip() == snippet(kilde_server.url, WEB_KEY)
    public = kilde_server.kilde("snippet", "--source", "web", "--collector", "https://c.example/")
    assert '"https://c.example","demo-web-write-key"' in public.stdout
    missing = kilde_server.kilde("snippet", "--source", "nope", check=False)
    assert missing.returncode == 1
    assert "no source 'nope'" in missing.stderr and "fix:" in missing.stderr


def test_local_storage_keeps_the_visitor_when_the_cookie_is_gone_and_back_is_a_page_view(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page = context.new_page()
        page.goto(site.page("/"))
        anonymous_id = ready(page)
        page.click("#spa-tent")
        page.go_back()  # popstate: a page view of "/" again
        arrived(kilde_server, 3, anonymous_id=anonymous_id)
        context.clear_cookies()
        page.reload()
        assert ready(page) == anonymous_id  # from the localStorage copy
        assert next(c for c in context.cookies() if c["name"] == "kilde_aid")["value"] == (
            anonymous_id
        )
        page.evaluate("kilde.alias('browser-user-3')")
        stored = arrived(kilde_server, 5, anonymous_id=anonymous_id)
    assert [e["page_path"] for e in stored if e["type"] == "page"] == [
        "/",
        "/products/tent",
        "/",
        "/",
    ]
    alias = next(e for e in stored if e["type"] == "alias")
    assert alias["user_id"] == "browser-user-3" and alias["previous_id"] == anonymous_id


def test_events_made_just_before_leaving_are_sent_with_send_beacon(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page, anonymous_id = visit(context, site, kilde_server)
        # Leave for another site at once: no later page of this site can send it.
        page.evaluate("kilde.track('Signed In'); location.href = 'about:blank'")
        page.wait_for_url("about:blank")
        stored = arrived(kilde_server, 2, anonymous_id=anonymous_id)
    assert stored[-1]["event"] == "Signed In"
    assert stored[-1]["context"]["transport"] == "beacon"  # sent by navigator.sendBeacon
    assert "transport" not in stored[0]["context"]  # the page view went by fetch


def test_an_oversized_event_goes_to_the_dead_letter_and_does_not_block_the_others(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page, anonymous_id = visit(context, site, kilde_server)
        # 70 KB of text: over the browsers' 64 KB limit for requests that outlive the page,
        # and over the collector's 32 KB per event.
        page.evaluate(
            "kilde.track('Product Viewed', {product_id: 'big', note: 'x'.repeat(70000)});"
            "kilde.track('Signed In')"
        )
        stored = arrived(kilde_server, 2, anonymous_id=anonymous_id)
        wait_for(
            lambda: page.evaluate("localStorage.getItem('kilde_queue')") == "[]",
            what="the queue to empty",
        )
    assert [e["event"] for e in stored if e["type"] == "track"] == ["Signed In"]
    assert any("big" in letter for letter in dead_letters_of(kilde_server, anonymous_id))


def test_events_are_sent_with_send_beacon_when_the_page_is_hidden(
    kilde_server: Server, context: BrowserContext
) -> None:
    with serve_site(kilde_server.url) as site:
        page, anonymous_id = visit(context, site, kilde_server)
        # The visitor switches to another tab: the page is hidden but not left. (Headless pages
        # stay visible, so the hiding is emulated; k.js's own listener does the rest.)
        page.evaluate(
            "kilde.track('Signed In');"
            "Object.defineProperty(document, 'visibilityState', {get: () => 'hidden'});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        stored = arrived(kilde_server, 2, anonymous_id=anonymous_id)
        assert page.evaluate("localStorage.getItem('kilde_queue')") == "[]"
    assert stored[-1]["event"] == "Signed In"
    assert stored[-1]["context"]["transport"] == "beacon"


def test_tracking_works_when_local_storage_is_blocked(
    kilde_server: Server, browser: Browser
) -> None:
    context = browser.new_context()
    context.add_init_script(
        "Object.defineProperty(window, 'localStorage', {get() {"
        " throw new DOMException('blocked', 'SecurityError') }})"
    )
    try:
        with serve_site(kilde_server.url) as site:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(site.page("/"))
            anonymous_id = ready(page)
            page.click("#view-tent")
            stored = arrived(kilde_server, 2, anonymous_id=anonymous_id)
            cookie = next(c for c in context.cookies() if c["name"] == "kilde_aid")
    finally:
        context.close()
    assert cookie["value"] == anonymous_id
    assert {e["type"] for e in stored} == {"page", "track"}
    assert errors == []


@pytest.mark.parametrize("signal", ["navigator", "header"])
def test_global_privacy_control_is_recorded_on_the_visitors_profile(
    kilde_server: Server, browser: Browser, signal: str
) -> None:
    if signal == "navigator":
        context = browser.new_context()
        context.add_init_script(
            "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"
        )
    else:
        context = browser.new_context(extra_http_headers={"Sec-GPC": "1"})
    user = f"gpc-{signal}-{uuid.uuid4().hex[:8]}"
    try:
        with serve_site(kilde_server.url) as site:
            page = context.new_page()
            page.goto(site.page("/"))
            anonymous_id = ready(page)
            page.evaluate(f"kilde.identify('{user}')")
            stored = arrived(kilde_server, 2, anonymous_id=anonymous_id)
    finally:
        context.close()
    assert all(e["context"].get("gpc") is True for e in stored)
    profile = profile_of(kilde_server, user_id=user)
    # The demo plan's sale-or-sharing purpose is advertising: GPC is a denial of it.
    assert profile["consents"]["advertising"]["state"] == "denied"
    status = httpx.post(
        f"{kilde_server.url}/api/privacy/do-not-sell/status",
        json={"user_id": user},
        headers=kilde_server.admin,
    ).json()
    assert status["do_not_sell"] is True and status["evidence"] == "gpc"


def test_the_cookie_is_secure_on_an_https_site(kilde_server: Server, browser: Browser) -> None:
    """An https shop (Playwright answers for it; its collector requests go to the real Kilde)."""
    shop, collector = "https://www.fjordfell.example", "https://collect.fjordfell.example"
    context = browser.new_context()
    head = snippet(collector, WEB_KEY)
    html = (SITE / "index.html").read_text().replace("<!--KILDE-SNIPPET-->", head)
    context.route(f"{shop}/**", lambda route: route.fulfill(body=html, content_type="text/html"))

    def to_kilde(route: Route) -> None:
        answer = route.fetch(url=route.request.url.replace(collector, kilde_server.url))
        route.fulfill(response=answer)

    context.route(f"{collector}/**", to_kilde)
    try:
        page = context.new_page()
        page.goto(f"{shop}/")
        anonymous_id = ready(page)
        cookie = next(
            c
            for c in context.cookies(shop)
            if c["name"] == "kilde_aid" and c["domain"].endswith("www.fjordfell.example")
        )
    finally:
        context.close()
    assert cookie["value"] == anonymous_id
    assert cookie["secure"] is True and cookie["sameSite"] == "Lax"
    assert YEAR - 3600 < cookie["expires"] - time.time() <= YEAR + 60


def test_the_plan_sets_the_cookie_domain_or_turns_the_server_cookie_off(
    own_server: Server, browser: Browser
) -> None:
    def with_web(**web: Any) -> Server:
        plan = yaml.safe_load(own_server.plan_path.read_text())
        plan["web"] = {**plan["web"], **web}
        own_server.plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        return start_server(own_server.data_dir, own_server.plan_path)

    own_server.stop()
    server = with_web(cookie_domain="fjordfell.example")
    try:
        shared = httpx.post(f"{server.url}/v1/cookie", json={"writeKey": WEB_KEY})
    finally:
        server.stop()
    # www.fjordfell.example and collect.fjordfell.example share it.
    assert "domain=fjordfell.example" in shared.headers["set-cookie"].lower()

    server = with_web(server_cookie=False, cookie_domain=None)
    context = browser.new_context()
    try:
        refused = httpx.post(f"{server.url}/v1/cookie", json={"writeKey": WEB_KEY})
        with relay(server.url) as (collector, wire), serve_site(collector) as site:
            _, anonymous_id = visit(context, site, server)
            cookie = next(c for c in context.cookies() if c["name"] == "kilde_aid")
    finally:
        context.close()
        server.stop()
    assert refused.status_code == 404 and refused.json()["error"] == "server_cookie_off"
    assert "set-cookie" not in refused.headers
    assert "/v1/cookie" not in wire.paths()  # k.js does not ask for it
    assert cookie["value"] == anonymous_id  # the script's own cookie is still there
