"""Segments on the real server: rules over traits, behaviour and consent; memberships with
entered/exited times and events; bad rules answered with the path of the wrong part.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BACKEND_KEY, DEMO_PLAN, WEB_KEY, Server, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("segments")
    # no scheduled refresh while these tests run: they refresh on demand
    srv = start_server(base / "data", KILDE_INSIGHTS_BACKGROUND="0")
    yield srv
    srv.stop()


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(days: float) -> str:
    return iso(datetime.now(UTC) - timedelta(days=days))


def send(server: Server, key: str, *messages: dict[str, Any]) -> None:
    batch = [{"messageId": uuid.uuid4().hex, **m} for m in messages]
    r = httpx.post(f"{server.url}/v1/batch", json={"batch": batch}, auth=(key, ""), timeout=30)
    assert r.status_code == 200, r.text
    assert not r.json()["rejected"], r.json()


def order(user: str, revenue: float, days_ago: float) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "timestamp": ago(days_ago),
        "properties": {
            "order_id": uuid.uuid4().hex[:10],
            "revenue": revenue,
            "currency": "NOK",
            "products": [{"product_id": "p-ten-0", "category": "tents"}],
        },
    }


def identify(user: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "timestamp": ago(20), "traits": traits}


def api(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=server.admin, timeout=180, **kwargs)


def refresh(server: Server, segment: str) -> dict[str, Any]:
    r = api(
        server, "POST", "/api/segments/refresh", json={"segments": [segment], "insights": False}
    )
    assert r.status_code == 200, r.text
    runs: dict[str, Any] = r.json()["segments"][0]
    return runs


def save(server: Server, segment: str, rule: dict[str, Any]) -> httpx.Response:
    return api(server, "PUT", f"/api/segments/{segment}", json={"name": segment, "rule": rule})


def events_of(server: Server, event: str, user: str) -> list[dict[str, Any]]:
    r = api(server, "GET", "/api/events", params={"event": event, "user_id": user})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["events"]
    return found


def test_members_enter_and_leave_with_times_and_events(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    city = f"Testby {tag}"
    big1, big2, small = (f"seg-{tag}-{n}" for n in ("a", "b", "c"))
    send(server, WEB_KEY, *(identify(u, city=city) for u in (big1, big2, small)))
    send(
        server,
        BACKEND_KEY,
        order(big1, 800, 3),
        order(big1, 900, 10),
        order(big2, 1200, 5),
        order(big2, 600, 25),
        order(big2, 700, 200),  # outside the 30-day window
        order(small, 800, 4),
        order(small, 100, 6),  # not over 500
    )
    segment = f"big-{tag}"
    rule = {
        "all": [
            {"trait": "city", "equals": city},
            {
                "event": "Order Completed",
                "where": [{"property": "revenue", "gt": 500}],
                "count": {"gte": 2},
                "within": "30 days",
            },
        ]
    }
    assert save(server, segment, rule).status_code == 200
    run = refresh(server, segment)
    assert (run["members"], run["entered"], run["exited"]) == (2, 2, 0)
    assert run["events"] == 2 and run["note"] is None

    members = api(server, "GET", f"/api/segments/{segment}/members").json()
    assert members["total"] == 2
    assert all(m["entered_at"] for m in members["members"])
    entered = events_of(server, "Segment Entered", big1)
    assert [e["properties"]["segment"] for e in entered] == [segment]
    assert entered[0]["source"] == "kilde"
    assert events_of(server, "Segment Entered", small) == []
    # Kilde's own note is not something the person did: not in their activity traits
    assert api(server, "POST", "/api/profiles/refresh").status_code == 200
    found = api(server, "POST", "/api/profiles/lookup", json={"user_id": big1}).json()
    shown = api(server, "GET", f"/api/profiles/{found['profiles'][0]['profile_id']}").json()
    assert shown["computed"]["events"] == 3  # the identify and the two orders
    assert shown["computed"]["channels"] == ["backend", "web"]

    # a refresh that changes nothing emits nothing
    again = refresh(server, segment)
    assert (again["members"], again["entered"], again["exited"]) == (2, 0, 0)

    # stricter rule: both leave; the segment is empty, which is not an error
    rule["all"][1]["count"] = {"gte": 3}
    assert save(server, segment, rule).status_code == 200
    gone = refresh(server, segment)
    assert (gone["members"], gone["entered"], gone["exited"]) == (0, 0, 2)
    exited = events_of(server, "Segment Exited", big2)
    assert [e["properties"]["segment"] for e in exited] == [segment]
    empty = api(server, "GET", f"/api/segments/{segment}/members")
    assert empty.status_code == 200 and empty.json() == {
        "segment": segment,
        "members": [],
        "total": 0,
    }
    shown = api(server, "GET", f"/api/segments/{segment}").json()
    assert [h["members"] for h in shown["history"]] == [0, 2, 2]
    preview = api(server, "POST", "/api/segments/preview", json={"rule": rule}).json()
    assert preview["count"] == 0 and preview["sample"] == []


def test_a_merge_is_not_leaving_and_entering(server: Server) -> None:
    """A member whose profile id a merge retires stays a member, under the merged id, with the
    same entered time, and no Segment Exited/Entered is sent for them."""
    tag = uuid.uuid4().hex[:8]
    city = f"Mergeby {tag}"
    user, device = f"merge-{tag}-user", f"merge-{tag}-device"
    # the account is older than the device, so its profile id is the one that survives
    send(server, BACKEND_KEY, {"type": "identify", "userId": user, "timestamp": ago(30)})
    send(
        server,
        WEB_KEY,
        {"type": "identify", "anonymousId": device, "timestamp": ago(5), "traits": {"city": city}},
    )
    assert api(server, "POST", "/api/profiles/refresh").status_code == 200
    segment = f"merged-{tag}"
    assert save(server, segment, {"trait": "city", "equals": city}).status_code == 200
    first = refresh(server, segment)
    assert (first["members"], first["entered"], first["exited"]) == (1, 1, 0)
    before = api(server, "GET", f"/api/segments/{segment}/members").json()["members"][0]

    send(server, WEB_KEY, {"type": "identify", "userId": user, "anonymousId": device})
    assert api(server, "POST", "/api/profiles/refresh").status_code == 200
    merged = api(server, "POST", "/api/profiles/lookup", json={"user_id": user}).json()
    merged_id = merged["profiles"][0]["profile_id"]
    assert merged_id != before["profile_id"]  # the device's id was retired by the merge

    again = refresh(server, segment)
    assert (again["members"], again["entered"], again["exited"]) == (1, 0, 0)
    after = api(server, "GET", f"/api/segments/{segment}/members").json()["members"]
    assert [(m["profile_id"], m["entered_at"]) for m in after] == [
        (merged_id, before["entered_at"])
    ]
    assert events_of(server, "Segment Entered", user) == []
    assert events_of(server, "Segment Exited", user) == []


def test_behaviour_consent_and_other_segments(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    city = f"Consentby {tag}"
    yes, no, browser = (f"con-{tag}-{n}" for n in ("yes", "no", "browse"))
    send(server, WEB_KEY, *(identify(u, city=city, newsletter=True) for u in (yes, no, browser)))
    send(
        server,
        WEB_KEY,
        {
            "type": "track",
            "event": "Consent Updated",
            "userId": yes,
            "timestamp": ago(2),
            "properties": {"purposes": {"marketing_email": True}},
        },
        {
            "type": "track",
            "event": "Product Viewed",
            "userId": browser,
            "timestamp": ago(1),
            "properties": {"product_id": "p-ten-1", "category": "tents"},
        },
        {
            "type": "track",
            "event": "Product Viewed",
            "userId": yes,
            "timestamp": ago(1),
            "properties": {"product_id": "p-ten-1", "category": "tents"},
        },
    )
    send(server, BACKEND_KEY, order(yes, 3490, 1))
    local = {"trait": "city", "equals": city}

    def count(rule: dict[str, Any]) -> int:
        r = api(server, "POST", "/api/segments/preview", json={"rule": rule, "sample": 5})
        assert r.status_code == 200, r.text
        return int(r.json()["count"])

    assert count({"all": [local, {"consent": "marketing_email"}]}) == 1
    assert count({"all": [local, {"not": {"consent": "marketing_email"}}]}) == 2
    # viewed tents but did not buy one
    viewed_not_bought = {
        "all": [
            local,
            {"event": "Product Viewed", "where": [{"property": "category", "equals": "tents"}]},
            {
                "not": {
                    "event": "Order Completed",
                    "where": [{"property": "products[].category", "equals": "tents"}],
                }
            },
        ]
    }
    assert count(viewed_not_bought) == 1
    # opened no email in 90 days: nobody here opened one
    quiet = {"all": [local, {"not": {"event": "Email Opened", "within": "90 days"}}]}
    assert count(quiet) == 3
    # a rule over another segment's membership
    base = f"local-{tag}"
    assert save(server, base, local).status_code == 200
    assert count({"all": [{"segment": base}, {"trait": "newsletter", "equals": True}]}) == 3
    assert count({"any": [{"segment": base}, {"computed": "orders", "gte": 100000}]}) == 3


BAD_RULES = [
    ({"all": [{"computed": "clvv", "gte": 1}]}, "rule.all[0].computed", "did you mean 'clv'"),
    ({"computed": "orders", "gte": "many"}, "rule.gte", "type integer"),
    ({"trait": "city", "gt": "jane@example.com"}, "rule.gt", "does not apply"),
    ({"trait": "favourite_colour", "equals": "red"}, "rule.trait", "no trait"),
    ({"event": "Order Complete"}, "rule.event", "did you mean 'Order Completed'"),
    (
        {"event": "Order Completed", "where": [{"property": "revenu", "gt": 5}]},
        "rule.where[0].property",
        "no property",
    ),
    ({"event": "Order Completed", "within": "-5 days"}, "rule.within", "not understood"),
    ({"event": "Order Completed", "within": "0 days"}, "rule.within", "longer than zero"),
    (
        {"event": "Order Completed", "window": {"from": "30 days", "to": "90 days"}},
        "rule.window.to",
        "ends before it starts",
    ),
    ({"all": [{"computed": "orders", "gte": 1}], "any": []}, "rule", "unbalanced"),
    ({"all": []}, "rule.all", "non-empty list"),
    ({"not": [{"computed": "orders", "gte": 1}]}, "rule.not", "one rule, not a list"),
    ({"any": [{"consent": "newsletter"}]}, "rule.any[0].consent", "no purpose"),
    ({"any": [{"segment": "nope-x"}]}, "rule.any[0].segment", "no segment"),
    ({"computed": "rfm_group", "in": ["Champions", "VIP"]}, "rule.in[1]", "no value 'VIP'"),
    ({"computed": "orders", "between": [1, 2]}, "rule.between", "unknown operator"),
    ({"event": "Order Completed", "count": {"lt": 0}}, "rule.count.lt", "fewer than zero"),
]


@pytest.mark.parametrize(("rule", "path", "words"), BAD_RULES)
def test_bad_rules_point_at_the_wrong_part(
    server: Server, rule: dict[str, Any], path: str, words: str
) -> None:
    r = api(server, "POST", "/api/segments/preview", json={"rule": rule})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and body["error"] == "invalid_rule"
    assert body["path"] == path
    assert words in f"{body['message']} {body['fix']}"
    assert body["fix"]
    assert "jane@example.com" not in r.text


def test_segments_referring_to_each_other_in_a_circle_are_refused(server: Server) -> None:
    tag = uuid.uuid4().hex[:6]
    a, b = f"circle-a-{tag}", f"circle-b-{tag}"
    assert save(server, b, {"computed": "orders", "gte": 1}).status_code == 200
    assert save(server, a, {"all": [{"segment": b}]}).status_code == 200
    r = save(server, b, {"segment": a})
    assert r.status_code == 400
    assert "circle" in r.json()["message"] and r.json()["path"].endswith("segment")
    plan_owned = save(server, "high-value-at-risk", {"computed": "orders", "gte": 1})
    assert plan_owned.status_code == 400 and "defined in the plan" in plan_owned.json()["message"]


def test_cli_preview_prints_count_and_sample_and_catches_unbalanced_brackets(
    server: Server,
) -> None:
    tag = uuid.uuid4().hex[:8]
    city = f"Cliby {tag}"
    send(server, WEB_KEY, identify(f"cli-{tag}", city=city))
    send(server, BACKEND_KEY, order(f"cli-{tag}", 4990, 2))
    good = server.kilde("segment", "preview", f"{{trait: city, equals: '{city}'}}")
    assert "1 of " in good.stdout and "profiles" in good.stdout
    as_csv = server.kilde("segment", "preview", f'{{"trait": "city", "equals": "{city}"}}', "--csv")
    assert (
        as_csv.stdout.splitlines()[0] == "profile_id,rfm_group,clv,churn_risk,orders,total_revenue"
    )
    assert len(as_csv.stdout.splitlines()) == 2
    empty = server.kilde("segment", "preview", "{computed: orders, gte: 1000000}")
    assert "0 of " in empty.stdout and "(the segment is empty)" in empty.stdout
    bad = server.kilde("segment", "preview", "{all: [{computed: orders, gte: 1}", check=False)
    assert bad.returncode == 1
    assert "line 1, column" in bad.stderr and "brackets" in bad.stderr
    wrong = server.kilde("segment", "preview", "{computed: ordres, gte: 1}", check=False)
    assert wrong.returncode == 1 and "did you mean 'orders'" in wrong.stderr
    listed = server.kilde("segment", "list", "--json")
    assert "high-value-at-risk" in listed.stdout


def test_segments_refresh_on_the_plans_schedule(tmp_path: Path) -> None:
    plan = tmp_path / "kilde.yaml"
    text = DEMO_PLAN.read_text()
    assert "refresh: 15 minutes" in text
    plan.write_text(text.replace("refresh: 15 minutes", "refresh: 5 seconds"))
    srv = start_server(tmp_path / "data", plan)
    try:
        send(srv, BACKEND_KEY, order("sched-1", 990, 1))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = api(srv, "GET", "/api/segments").json()["segments"]
            runs = {s["id"]: s for s in listed}
            if runs["repeat-buyers-90d"]["last_run"] and runs["tent-browsers"]["last_run"]:
                break
            time.sleep(1)
        else:
            raise AssertionError("the segments were not refreshed on schedule")
        status = api(srv, "GET", "/api/insights/status").json()
        assert status["refresh"] == "5 seconds" and status["models"] is not None
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
