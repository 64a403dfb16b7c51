"""The story the insights exist for, on the demo shop, through the CLI a marketer uses:

define "high-value customers at risk" in one rule, see who is in it and why (RFM group, lifetime
value and churn risk on each profile), and find which campaign brings the best customers.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Server, start_server

AT_RISK = ["At risk", "Can't lose them", "About to sleep", "Hibernating"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("story")
    server = start_server(base / "data", KILDE_INSIGHTS_BACKGROUND="0")
    server.kilde("demo", "--customers", "300", "--days", "365")
    refreshed = server.kilde("insights", "refresh")
    assert "insights computed" in refreshed.stdout
    yield server
    server.stop()


def as_json(server: Server, *args: str) -> Any:
    return json.loads(server.kilde(*args, "--json").stdout)


def test_high_value_customers_at_risk_who_and_why_and_the_best_campaign(shop: Server) -> None:
    clv = as_json(shop, "insights", "clv")
    assert clv["models"]["bgnbd"] is not None, clv["models"]
    median = clv["distribution"]["quantiles"][2]
    assert median > 0

    # 1. one rule
    rule = (
        f"{{all: [{{computed: clv, gte: {median}}}, "
        f"{{any: [{{computed: rfm_group, in: {json.dumps(AT_RISK)}}}, "
        "{computed: churn_risk, gte: 0.5}]}]}"
    )
    preview = shop.kilde("segment", "preview", rule)
    assert " of " in preview.stdout and "profiles" in preview.stdout
    found = as_json(shop, "segment", "preview", rule)
    assert found["count"] > 0
    shop.kilde("segment", "save", "vip-at-risk", rule, "--name", "High-value customers at risk")
    runs = as_json(shop, "segment", "refresh", "vip-at-risk", "--no-insights")
    assert runs["segments"][0]["members"] == found["count"]
    assert runs["segments"][0]["entered"] == found["count"]

    # 2. who is in it, and why: each member's RFM group, CLV and churn risk satisfy the rule
    members = as_json(shop, "segment", "members", "vip-at-risk", "--limit", "1000")
    assert members["total"] == found["count"] == len(members["members"])
    for m in members["members"]:
        assert m["clv"] >= median - 0.01
        assert m["rfm_group"] in AT_RISK or (m["churn_risk"] or 0) >= 0.5
    table = shop.kilde("segment", "members", "vip-at-risk", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    assert len(rows) == found["count"]
    assert {"rfm_group", "clv", "churn_risk"} <= set(rows[0])

    # ... and on the profile itself
    first = members["members"][0]["profile_id"]
    profile = as_json(shop, "profile", "show", first)
    computed = profile["computed"]
    assert computed["rfm_group"] == members["members"][0]["rfm_group"]
    assert computed["clv"] == pytest.approx(members["members"][0]["clv"], abs=0.01)
    assert "churn_risk" in computed and "p_alive" in computed
    assert computed["favourite_products"] and computed["preferred_channel"]
    assert "vip-at-risk" in computed["segments"]
    shown = shop.kilde("profile", "show", first).stdout
    assert "rfm group" in shown and "clv" in shown and "vip-at-risk" in shown

    # 3. which campaign brings the best customers
    attribution = as_json(shop, "insights", "attribution")
    quality = attribution["customers"]
    campaigns = {c["utm_campaign"] for c in quality}
    assert {"winter-sale", "november-news", "hiking-reels"} <= campaigns
    best = quality[0]
    assert best["avg_clv"] == max(c["avg_clv"] or 0 for c in quality)
    assert all(c["customers"] <= c["people"] for c in quality)
    printed = shop.kilde("insights", "attribution").stdout
    assert "best first" in printed and best["utm_campaign"] in printed
    assert printed.index(best["utm_campaign"]) < max(
        printed.rfind(c) for c in campaigns if c and c != best["utm_campaign"]
    )


def test_every_insight_command_answers_with_a_table_csv_and_json(shop: Server) -> None:
    rfm = as_json(shop, "insights", "rfm")
    assert rfm["customers"] > 0
    assert {g["rfm_group"] for g in rfm["groups"]} <= {
        "Champions",
        "Loyal",
        "Potential loyalists",
        "New customers",
        "Promising",
        "Need attention",
        "About to sleep",
        "Can't lose them",
        "At risk",
        "Hibernating",
    }
    assert sum(g["customers"] for g in rfm["groups"]) == rfm["customers"]
    assert sum(map(sum, rfm["grid_recency_by_frequency"])) == rfm["customers"]
    assert "Champions" in shop.kilde("insights", "rfm").stdout
    churn = as_json(shop, "insights", "churn")
    assert sum(b["customers"] for b in churn["risk_bands"]) > 0
    funnel = as_json(
        shop,
        "insights",
        "funnel",
        "Product Viewed",
        "Product Added",
        "Checkout Started",
        "Order Completed",
        "--since",
        "365 days",
    )
    counts = [s["profiles"] for s in funnel["steps"]]
    assert counts[0] > 0 and counts == sorted(counts, reverse=True)
    funnel_csv = shop.kilde(
        "insights", "funnel", "Product Viewed", "Order Completed", "--csv"
    ).stdout
    assert funnel_csv.startswith("step,event,profiles,")
    retention = as_json(shop, "insights", "retention", "--periods", "12")
    assert retention["cohorts"] and all(
        c["retention"][0] == 1.0 and len(c["retention"]) == 12 for c in retention["cohorts"]
    )
    assert "w0" in shop.kilde("insights", "retention").stdout
    prefs = as_json(shop, "insights", "preferences")
    assert prefs["bought_together"] and prefs["preferred_channel"][0]["value"] == "web"
    campaigns = shop.kilde("insights", "campaign").stdout
    assert "Email campaigns" in campaigns
    trends = as_json(shop, "insights", "trends", "--period", "month")
    assert any("nps" in s for s in trends["series"])
    listed = shop.kilde("segment", "list", "--csv").stdout
    for segment in ("high-value-at-risk", "tent-browsers", "repeat-buyers-90d"):
        assert segment in listed
