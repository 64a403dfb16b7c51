"""The shortest path a new user takes: send an event, see it through the admin API."""

from __future__ import annotations

import httpx

from tests.conftest import WEB_KEY, Server


def test_tracked_event_is_listed_by_the_admin_api(kilde_server: Server) -> None:
    sent = httpx.post(
        f"{kilde_server.url}/v1/track",
        json={
            "userId": "smoke-user",
            "event": "Product Viewed",
            "messageId": "smoke-1",
            "properties": {"product_id": "p-1"},
        },
        auth=(WEB_KEY, ""),
    )
    assert sent.status_code == 200, sent.text
    listed = httpx.get(
        f"{kilde_server.url}/api/events",
        params={"user_id": "smoke-user"},
        headers=kilde_server.admin,
    ).json()
    assert [e["message_id"] for e in listed["events"]] == ["smoke-1"]
    assert listed["events"][0]["properties"] == {"product_id": "p-1"}
