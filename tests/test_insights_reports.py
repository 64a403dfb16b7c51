"""Funnels, retention, attribution and email campaign reports on events whose answer is known."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import BACKEND_KEY, WEB_KEY, Server, start_server
from tests.test_email_tracking import APPLE_MAIL_ON_IPHONE, GMAIL_PROXY, TEMPLATE, urls_of


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("reports") / "data", KILDE_INSIGHTS_BACKGROUND="0")
    yield srv
    srv.stop()


def at(days_ago: float, hours: float = 0) -> str:
    moment = datetime.now(UTC) - timedelta(days=days_ago) + timedelta(hours=hours)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def send(server: Server, key: str, *messages: dict[str, Any]) -> None:
    batch = [{"messageId": uuid.uuid4().hex, **m} for m in messages]
    r = httpx.post(f"{server.url}/v1/batch", json={"batch": batch}, auth=(key, ""), timeout=30)
    assert r.status_code == 200 and not r.json()["rejected"], r.text


def track(user: str, event: str, when: str, **props: Any) -> dict[str, Any]:
    return {"type": "track", "event": event, "userId": user, "timestamp": when, "properties": props}


def api(server: Server, method: str, path: str, **kwargs: Any) -> Any:
    r = httpx.request(method, f"{server.url}{path}", headers=server.admin, timeout=180, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def test_funnel_counts_ordered_steps_within_the_window(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    cat = f"cat-{tag}"  # a category only these people touch: the funnel sees only them
    viewed = {"product_id": "p1", "category": cat}
    added = {"product_id": "p1", "category": cat, "quantity": 1}
    u = [f"fun-{tag}-{i}" for i in range(5)]
    send(
        server,
        WEB_KEY,
        # 0: all four steps in order within a day
        track(u[0], "Product Viewed", at(10), **viewed),
        track(u[0], "Product Added", at(10, 1), **added),
        track(u[0], "Checkout Started", at(10, 2), value=10.0),
        # 1: view and add, then stops
        track(u[1], "Product Viewed", at(9), **viewed),
        track(u[1], "Product Added", at(9, 1), **added),
        # 2: added before viewing: order matters, so only step 1
        track(u[2], "Product Added", at(8), **added),
        track(u[2], "Product Viewed", at(8, 1), **viewed),
        # 3: view, then add 20 days later: outside the 7-day window
        track(u[3], "Product Viewed", at(30), **viewed),
        track(u[3], "Product Added", at(10), **added),
        # 4: view only
        track(u[4], "Product Viewed", at(5), **viewed),
    )
    send(
        server,
        BACKEND_KEY,
        track(u[0], "Order Completed", at(10, 3), order_id="o1", revenue=10.0, currency="NOK"),
    )
    body = {
        "steps": [
            {"event": "Product Viewed", "where": [{"property": "category", "equals": cat}]},
            {"event": "Product Added", "where": [{"property": "category", "equals": cat}]},
            "Checkout Started",
            "Order Completed",
        ],
        "within": "7 days",
        "since": "60 days",
    }
    found = api(server, "POST", "/api/insights/funnel", json=body)
    assert [s["profiles"] for s in found["steps"]] == [5, 2, 1, 1]
    assert [s["drop_off"] for s in found["steps"]] == [0, 3, 1, 0]
    assert found["steps"][1]["conversion_from_previous"] == 0.4
    assert found["conversion"] == 0.2
    assert 2.5 < found["median_hours_to_complete"] < 3.5

    # nobody matches: an empty funnel, not an error
    body["steps"][0]["where"][0]["equals"] = f"nothing-{tag}"
    empty = api(server, "POST", "/api/insights/funnel", json=body)
    assert [s["profiles"] for s in empty["steps"]] == [0, 0, 0, 0]
    assert empty["conversion"] is None

    bad = httpx.post(
        f"{server.url}/api/insights/funnel",
        json={"steps": ["Product Viewed", "Product Viewd"]},
        headers=server.admin,
    )
    assert bad.status_code == 400 and bad.json()["path"] == "steps[1].event"


def test_attribution_first_last_and_linear_touch(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    buyer = f"att-{tag}"

    def visit(days_ago: float, name: str) -> dict[str, Any]:
        return {
            "type": "page",
            "name": "Home",
            "userId": buyer,
            "timestamp": at(days_ago),
            "properties": {"path": "/"},
            "context": {"campaign": {"source": "src", "medium": "cpc", "name": name}},
        }

    send(
        server,
        WEB_KEY,
        visit(40, f"too-old-{tag}"),
        visit(20, f"first-{tag}"),
        visit(10, f"middle-{tag}"),
        visit(5, f"last-{tag}"),
    )
    send(
        server,
        BACKEND_KEY,
        track(buyer, "Order Completed", at(4), order_id=tag, revenue=900.0, currency="NOK"),
    )

    def credit(model: str) -> dict[str, float]:
        found = api(server, "GET", "/api/insights/attribution", params={"model": model})
        return {
            c["utm_campaign"]: c["value"]
            for c in found["channels"]
            if str(c["utm_campaign"]).endswith(tag)
        }

    assert credit("first_touch") == {f"first-{tag}": 900.0}
    assert credit("last_touch") == {f"last-{tag}": 900.0}
    assert credit("linear") == {f"first-{tag}": 300.0, f"middle-{tag}": 300.0, f"last-{tag}": 300.0}
    quality = api(server, "GET", "/api/insights/attribution")["customers"]
    mine = [c for c in quality if c["utm_campaign"] == f"too-old-{tag}"]
    assert mine and mine[0]["customers"] == 1 and mine[0]["avg_revenue"] == 900.0


def test_retention_cohorts_by_first_order(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    orders = []
    for i, weeks in enumerate(([0, 1, 2], [0, 2], [0])):
        for w in weeks:
            orders.append(
                track(
                    f"ret-{tag}-{i}",
                    "Order Completed",
                    at(7 * (30 - w)),  # first order 30 weeks ago, a cohort of its own
                    order_id=f"{tag}-{i}-{w}",
                    revenue=100.0,
                    currency="NOK",
                )
            )
    send(server, BACKEND_KEY, *orders)
    found = api(
        server,
        "GET",
        "/api/insights/retention",
        params={"cohort": "first_order", "activity": "orders", "periods": 40},
    )
    assert found["cohorts"], found
    oldest = found["cohorts"][0]
    assert oldest["size"] == 3
    assert oldest["retention"][:4] == [1.0, 0.3333, 0.6667, 0.0]
    assert oldest["retention"][-1] is None  # that week has not come yet


def test_email_campaign_report_counts_humans_machines_and_orders_after_click(
    server: Server,
) -> None:
    tag = uuid.uuid4().hex[:8]
    campaign = f"news-{tag}"
    people = [f"mail-{tag}-{i}" for i in range(3)]
    rendered = api(
        server,
        "POST",
        f"/api/email/campaigns/{campaign}/render",
        json={
            "html": TEMPLATE,
            "recipients": [{"user_id": p} for p in people],
            "base_url": server.url,
        },
    )
    mails = [m["html"] for m in rendered["mails"]]

    def pixel(mail: str) -> str:
        return next(src for src in urls_of(mail).srcs if "/e/o/" in src)

    def click(mail: str) -> str:
        return next(href for href in urls_of(mail).hrefs if "/e/c/" in href)

    human = {"User-Agent": APPLE_MAIL_ON_IPHONE}
    httpx.get(pixel(mails[0]), headers=human)
    httpx.get(pixel(mails[1]), headers=human)
    httpx.get(pixel(mails[2]), headers={"User-Agent": GMAIL_PROXY})  # a machine open
    httpx.get(click(mails[0]), headers=human, follow_redirects=False)
    send(
        server,
        BACKEND_KEY,
        track(people[0], "Order Completed", at(0), order_id=tag, revenue=450.0, currency="NOK"),
    )
    found = api(server, "GET", "/api/insights/campaigns")["campaigns"]
    row = next(c for c in found if c["campaign"] == campaign)
    assert row["sent"] == 3
    assert (row["human_opens"], row["machine_opens"], row["clicks"]) == (2, 1, 1)
    assert row["click_to_open"] == 0.5
    assert (row["orders_after_click"], row["revenue_after_click"]) == (1, 450.0)


def test_an_empty_shop_answers_every_insight_empty_and_says_why_clv_is_missing(
    tmp_path: Any,
) -> None:
    srv = start_server(tmp_path / "data", KILDE_INSIGHTS_BACKGROUND="0")
    try:
        send(
            srv,
            BACKEND_KEY,
            track(
                "lonely-1", "Order Completed", at(3), order_id="x1", revenue=10.0, currency="NOK"
            ),
        )
        refreshed = api(srv, "POST", "/api/insights/refresh")
        assert "too little purchase history" in refreshed["models"]["problem"]
        clv = api(srv, "GET", "/api/insights/clv")
        assert clv["top"] == [] and clv["distribution"]["customers"] == 0
        cli = srv.kilde("insights", "clv")
        assert "too little purchase history" in cli.stdout
        rfm = api(srv, "GET", "/api/insights/rfm")
        assert rfm["customers"] == 1 and rfm["groups"][0]["customers"] == 1
        for path in (
            "/api/insights/churn",
            "/api/insights/retention",
            "/api/insights/attribution",
            "/api/insights/campaigns",
            "/api/insights/trends",
            "/api/insights/preferences",
        ):
            api(srv, "GET", path)
        assert api(srv, "GET", "/api/insights/campaigns")["campaigns"] == []
        funnel = api(
            srv,
            "POST",
            "/api/insights/funnel",
            json={"steps": ["Product Viewed", "Order Completed"]},
        )
        assert [s["profiles"] for s in funnel["steps"]] == [0, 0]
        segments = api(srv, "GET", "/api/segments")["segments"]
        assert {s["id"] for s in segments} >= {"high-value-at-risk", "tent-browsers"}
        assert all(s["members"] == 0 for s in segments)
    finally:
        srv.stop()
