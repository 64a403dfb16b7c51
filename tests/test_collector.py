"""Segment's HTTP Tracking API on the real server: what a sending app sees, and what is stored."""

from __future__ import annotations

import base64
import gzip
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest

from tests.conftest import APP_KEY, BACKEND_KEY, WEB_KEY, Server, start_server

CHROME_ON_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
SAFARI_ON_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


def events_of(server: Server, **filters: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/events", params={"limit": 1000, **filters}, headers=server.admin
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def post(
    server: Server, path: str, body: Any, key: str | None = WEB_KEY, **kwargs: Any
) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}",
        json=body,
        auth=(key, "") if key else None,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/identify",
            {"traits": {"email": "kari@example.org", "newsletter": True}},
            {"type": "identify", "traits": {"email": "kari@example.org", "newsletter": True}},
        ),
        (
            "/v1/track",
            {"event": "Product Viewed", "properties": {"product_id": "p-1", "price": 99.5}},
            {"type": "track", "event": "Product Viewed", "properties": {"product_id": "p-1"}},
        ),
        (
            "/v1/page",
            {"name": "Tents", "properties": {"url": "https://shop.example/tents", "path": "/t"}},
            {"type": "page", "event": "Tents", "page_url": "https://shop.example/tents"},
        ),
        ("/v1/screen", {"name": "Cart"}, {"type": "screen", "event": "Cart"}),
        ("/v1/group", {"groupId": "team-7"}, {"type": "group", "group_id": "team-7"}),
        (
            "/v1/alias",
            {"previousId": "anon-before-login"},
            {"type": "alias", "previous_id": "anon-before-login"},
        ),
    ],
)
def test_each_single_message_endpoint_stores_its_message(
    kilde_server: Server, path: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    user = uid()
    response = post(kilde_server, path, {"userId": user, "messageId": f"{user}-m", **body})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "stored": 1,
        "duplicates": 0,
        "flagged": 0,
        "rejected": [],
    }
    [stored] = events_of(kilde_server, user_id=user)
    assert stored["message_id"] == f"{user}-m"
    assert stored["source"] == "web"
    assert stored["plan_status"] == "ok"
    for key, value in expected.items():
        if isinstance(value, dict):
            assert value.items() <= stored[key].items(), stored
        else:
            assert stored[key] == value, stored


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import"])
def test_batch_and_import_store_every_item(kilde_server: Server, path: str) -> None:
    user = uid()
    batch = [
        {"type": "identify", "userId": user, "traits": {"first_name": "Kari"}},
        {"type": "track", "userId": user, "event": "Signed In"},
        {"type": "page", "anonymousId": f"{user}-anon", "name": "Home"},
        {"type": "screen", "userId": user, "name": "Start"},
        {"type": "group", "userId": user, "groupId": "g-1"},
        {"type": "alias", "userId": user, "previousId": f"{user}-anon"},
    ]
    response = post(kilde_server, path, {"batch": batch}, key=BACKEND_KEY)
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == 6
    stored = events_of(kilde_server, user_id=user)
    assert sorted(e["type"] for e in stored) == ["alias", "group", "identify", "screen", "track"]
    assert {e["source"] for e in stored} == {"backend"}
    assert [e["type"] for e in events_of(kilde_server, anonymous_id=f"{user}-anon")] == ["page"]


def test_write_key_in_the_body_instead_of_basic_auth(kilde_server: Server) -> None:
    user = uid()
    response = post(
        kilde_server,
        "/v1/track",
        {"writeKey": BACKEND_KEY, "userId": user, "event": "Signed In"},
        key=None,
    )
    assert response.status_code == 200, response.text
    [stored] = events_of(kilde_server, user_id=user)
    assert stored["source"] == "backend"
    # The key authenticates; it is not data and is not stored with the event.
    assert BACKEND_KEY not in orjson.dumps(stored).decode()


def test_write_key_in_a_batch_body(kilde_server: Server) -> None:
    user = uid()
    body = {"writeKey": APP_KEY, "batch": [{"type": "screen", "userId": user, "name": "Home"}]}
    response = post(kilde_server, "/v1/batch", body, key=None)
    assert response.status_code == 200, response.text
    assert [e["source"] for e in events_of(kilde_server, user_id=user)] == ["app"]


def test_basic_auth_header_built_by_hand_as_sdks_do(kilde_server: Server) -> None:
    user = uid()
    token = base64.b64encode(f"{WEB_KEY}:".encode()).decode()
    response = httpx.post(
        f"{kilde_server.url}/v1/track",
        content=orjson.dumps({"userId": user, "event": "Signed In"}),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert len(events_of(kilde_server, user_id=user)) == 1


def test_text_plain_body_as_browsers_send_it(kilde_server: Server) -> None:
    user = uid()
    body = {"writeKey": WEB_KEY, "anonymousId": user, "name": "Home"}
    response = httpx.post(
        f"{kilde_server.url}/v1/page",
        content=orjson.dumps(body),
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://shop.example"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] in ("*", "https://shop.example")
    assert len(events_of(kilde_server, anonymous_id=user)) == 1


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
def test_gzip_body(kilde_server: Server, path: str) -> None:
    user = uid()
    message = {"userId": user, "event": "Signed In"}
    body = {"batch": [{"type": "track", **message}]} if path == "/v1/batch" else message
    response = httpx.post(
        f"{kilde_server.url}{path}",
        content=gzip.compress(orjson.dumps(body)),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        auth=(WEB_KEY, ""),
    )
    assert response.status_code == 200, response.text
    assert len(events_of(kilde_server, user_id=user)) == 1


def test_batch_context_and_integrations_are_merged_into_items_and_the_item_wins(
    kilde_server: Server,
) -> None:
    user = uid()
    body = {
        "batch": [
            {"type": "track", "userId": user, "event": "Signed In", "messageId": f"{user}-1"},
            {
                "type": "track",
                "userId": user,
                "event": "Signed In",
                "messageId": f"{user}-2",
                "context": {"locale": "nb-NO", "app": {"name": "item app"}},
                "integrations": {"All": True},
            },
        ],
        "context": {"locale": "en-GB", "library": {"name": "batch-lib"}, "app": {"name": "batch"}},
        "integrations": {"All": False, "Mixpanel": True},
    }
    response = post(kilde_server, "/v1/batch", body)
    assert response.status_code == 200, response.text
    stored = {e["message_id"]: e for e in events_of(kilde_server, user_id=user)}
    first, second = stored[f"{user}-1"], stored[f"{user}-2"]
    assert first["context"]["locale"] == "en-GB"
    assert first["context"]["library"] == {"name": "batch-lib"}
    assert second["context"]["locale"] == "nb-NO"  # the item's own value wins
    assert second["context"]["library"] == {"name": "batch-lib"}
    assert second["context"]["app"] == {"name": "item app"}
    assert first["integrations"] == {"All": False, "Mixpanel": True}
    assert second["integrations"] == {"All": True, "Mixpanel": True}


def test_same_message_id_twice_is_stored_once_and_reported_duplicate(
    kilde_server: Server,
) -> None:
    user = uid()
    message = {"userId": user, "event": "Signed In", "messageId": f"{user}-once"}
    first = post(kilde_server, "/v1/track", message)
    again = post(kilde_server, "/v1/track", message)
    assert first.json()["stored"] == 1 and first.json()["duplicates"] == 0
    assert again.status_code == 200
    assert again.json()["stored"] == 0 and again.json()["duplicates"] == 1
    # Inside one batch too, as an SDK retrying a half-sent batch does.
    batch = {"batch": [{"type": "track", **message}, {"type": "track", **message}]}
    retried = post(kilde_server, "/v1/batch", batch)
    assert retried.json()["stored"] == 0 and retried.json()["duplicates"] == 2
    assert len(events_of(kilde_server, user_id=user)) == 1


def test_duplicates_are_caught_within_the_writers_memory_of_recent_message_ids(
    tmp_path: Path,
) -> None:
    """KILDE_DEDUPE_IDS sets how many recent message ids are remembered (docs: a retry older
    than that is stored again); a restart remembers the newest ones from the store."""
    server = start_server(tmp_path / "data", KILDE_DEDUPE_IDS="16")
    try:
        user = uid()
        message = {"userId": user, "event": "Signed In", "messageId": f"{user}-old"}
        assert post(server, "/v1/track", message).json()["stored"] == 1
        newer = [
            {"type": "track", "userId": uid(), "event": "Signed In", "messageId": f"{user}-{i}"}
            for i in range(40)
        ]
        assert post(server, "/v1/batch", {"batch": newer}).json()["stored"] == 40
        late = post(server, "/v1/track", message).json()
        assert late["stored"] == 1 and late["duplicates"] == 0, "forgotten: stored again"
        assert len(events_of(server, user_id=user)) == 2
        assert post(server, "/v1/track", message).json()["duplicates"] == 1
        server.stop()
        server = start_server(tmp_path / "data", KILDE_DEDUPE_IDS="16")
        again = post(server, "/v1/track", message).json()
        assert again["stored"] == 0 and again["duplicates"] == 1, "the newest one is remembered"
        assert len(events_of(server, user_id=user)) == 2
    finally:
        server.stop()


def test_a_dedupe_window_that_is_not_a_number_is_refused_with_a_warning(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", KILDE_DEDUPE_IDS="lots")
    try:
        user = uid()
        message = {"userId": user, "event": "Signed In", "messageId": f"{user}-once"}
        assert post(server, "/v1/track", message).json()["stored"] == 1
        assert post(server, "/v1/track", message).json()["duplicates"] == 1, "the default"
    finally:
        server.stop()
    warning = "KILDE_DEDUPE_IDS must be a positive whole number; using 500,000"
    assert warning in server.log_text()


def test_timestamp_is_corrected_for_the_senders_clock(kilde_server: Server) -> None:
    user = uid()
    # The device's clock is 2 hours and 5 seconds ahead; the event happened 30 s before sending.
    original = datetime.now(UTC) + timedelta(hours=2)
    sent = original + timedelta(seconds=30)
    body = {
        "batch": [
            {
                "type": "track",
                "userId": user,
                "event": "Signed In",
                "originalTimestamp": original.isoformat(),
            }
        ],
        "sentAt": sent.isoformat(),
    }
    before = datetime.now(UTC)
    assert post(kilde_server, "/v1/batch", body).status_code == 200
    after = datetime.now(UTC)
    [stored] = events_of(kilde_server, user_id=user)
    received = datetime.fromisoformat(stored["received_at"])
    timestamp = datetime.fromisoformat(stored["timestamp"])
    assert before - timedelta(seconds=1) <= received <= after + timedelta(seconds=1)
    assert timestamp == received - timedelta(seconds=30)


def test_timestamp_without_sent_at_is_kept_as_sent(kilde_server: Server) -> None:
    user = uid()
    when = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    body = {"userId": user, "event": "Signed In", "timestamp": "2026-03-01T13:00:00+01:00"}
    assert post(kilde_server, "/v1/track", body).status_code == 200
    [stored] = events_of(kilde_server, user_id=user)
    assert datetime.fromisoformat(stored["timestamp"]) == when


def test_enrichment_from_user_agent_and_public_ip(own_server: Server) -> None:
    user = uid()
    body = {
        "userId": user,
        "event": "Signed In",
        "context": {"ip": "193.69.3.10", "userAgent": SAFARI_ON_IPHONE, "locale": "nb-NO"},
    }
    assert post(own_server, "/v1/track", body).status_code == 200
    # Rejected records keep the address only as the plan allows, too.
    off_plan = {**body, "event": "Tent Pitched", "context": {"ip": "193.69.3.11"}}
    assert post(own_server, "/v1/track", off_plan).status_code == 400
    broken = b'{"userId": "x", "context": {"ip": "193.69.3.12"}, "event": '
    assert post(own_server, "/v1/track", None, content=broken).status_code == 400
    desktop = {"anonymousId": user, "name": "Home"}
    response = post(own_server, "/v1/page", desktop, headers={"User-Agent": CHROME_ON_WINDOWS})
    assert response.status_code == 200

    by_type = {e["type"]: e for e in events_of(own_server, user_id=user)}
    by_type.update({e["type"]: e for e in events_of(own_server, anonymous_id=user)})
    phone, desk = by_type["track"], by_type["page"]
    assert (phone["browser"], phone["os"], phone["device"]) == ("Mobile Safari", "iOS", "mobile")
    assert phone["country"] == "NO"
    assert phone["ip"] == "193.69.3.0"
    assert phone["context"]["ip"] == "193.69.3.0"
    assert (desk["browser"], desk["os"], desk["device"]) == ("Chrome", "Windows", "desktop")
    assert desk["ip"] == "127.0.0.0"  # the socket's address, truncated too
    assert desk["country"] is None

    # Nowhere in what was stored, in any column, is the full address.
    own_server.stop()
    with duckdb.connect(str(own_server.data_dir / "kilde.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT * FROM events").fetchall()
        letters = con.execute("SELECT * FROM dead_letters").fetchall()
    assert rows and len(letters) == 2
    for full in ("193.69.3.10", "193.69.3.11", "193.69.3.12"):
        assert full not in repr(rows) + repr(letters)
    assert "193.69.3.0" in repr(rows)
    assert "193.69.3.0" in repr(letters)


def test_warn_mode_source_stores_off_plan_events_flagged(kilde_server: Server) -> None:
    user = uid()
    off_plan = {
        "userId": user,
        "event": "Tent Pitched",
        "properties": {"minutes": 12},
        "messageId": f"{user}-off",
    }
    wrong_type = {
        "userId": user,
        "event": "Product Viewed",
        "properties": {"product_id": 17},
        "messageId": f"{user}-wrong",
    }
    on_plan = {"userId": user, "event": "Signed In", "messageId": f"{user}-ok"}
    for body, flagged in ((off_plan, 1), (wrong_type, 1), (on_plan, 0)):
        response = post(kilde_server, "/v1/track", body, key=APP_KEY)
        assert response.status_code == 200, response.text
        assert response.json()["stored"] == 1
        assert response.json()["flagged"] == flagged
    stored = {e["message_id"]: e for e in events_of(kilde_server, user_id=user)}
    assert stored[f"{user}-off"]["plan_status"] == "warn"
    assert "not in the collection plan" in stored[f"{user}-off"]["plan_issues"][0]["message"]
    assert stored[f"{user}-wrong"]["plan_status"] == "warn"
    assert stored[f"{user}-wrong"]["plan_issues"][0]["path"] == "properties.product_id"
    assert stored[f"{user}-ok"]["plan_status"] == "ok"
    assert stored[f"{user}-ok"]["plan_issues"] is None


def test_strict_source_checks_traits_on_every_message_type(kilde_server: Server) -> None:
    """An undeclared trait cannot slip in on a track or alias message instead of identify."""
    user = uid()
    for path, body in (
        ("/v1/track", {"event": "Signed In", "traits": {"shoe_size": 44}}),
        ("/v1/alias", {"previousId": "before", "traits": {"shoe_size": 44}}),
        ("/v1/identify", {"traits": {"email": "a@b.example"}, "properties": {"shoe_size": 44}}),
    ):
        response = post(kilde_server, path, {"userId": user, **body})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"] == "off_plan"
    assert events_of(kilde_server, user_id=user) == []


def test_cors_preflight_from_a_browser_origin(kilde_server: Server) -> None:
    preflight = httpx.options(
        f"{kilde_server.url}/v1/batch",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] in ("*", "https://shop.example")
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "content-type" in allowed and "authorization" in allowed

    user = uid()
    sent = post(
        kilde_server,
        "/v1/batch",
        {"batch": [{"type": "page", "anonymousId": user}]},
        headers={"Origin": "https://shop.example"},
    )
    assert sent.status_code == 200
    assert sent.headers["access-control-allow-origin"] in ("*", "https://shop.example")


def test_admin_api_does_not_answer_cross_origin_preflights(kilde_server: Server) -> None:
    preflight = httpx.options(
        f"{kilde_server.url}/api/events",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers
