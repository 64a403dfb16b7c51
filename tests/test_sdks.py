"""Segment's and RudderStack's own Python SDKs, unchanged, with their host set to Kilde."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import rudderstack.analytics as rudderstack
import segment.analytics as segment

from tests.conftest import BACKEND_KEY, Server


def stored(server: Server, user: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/events", params={"user_id": user}, headers=server.admin)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def send_the_five_calls(client: Any, user: str) -> None:
    """identify, track, page, group, alias: what a shop's order service sends."""
    client.identify(user, {"email": f"{user}@example.org", "first_name": "Kari"})
    client.track(
        user,
        "Order Completed",
        {"order_id": f"o-{user}", "revenue": 1290.0, "currency": "NOK"},
    )
    client.page(user, name="Receipt", properties={"url": "https://fjordfell.example/receipt"})
    client.group(user, "company-42")
    client.alias(f"anon-{user}", user)


def assert_five_stored(server: Server, user: str, library: str) -> None:
    events = {e["type"]: e for e in stored(server, user)}
    assert sorted(events) == ["alias", "group", "identify", "page", "track"], events
    assert {e["source"] for e in events.values()} == {"backend"}
    assert {e["plan_status"] for e in events.values()} == {"ok"}
    assert events["identify"]["traits"] == {"email": f"{user}@example.org", "first_name": "Kari"}
    assert events["track"]["event"] == "Order Completed"
    assert events["track"]["properties"]["revenue"] == 1290.0
    assert events["page"]["page_url"] == "https://fjordfell.example/receipt"
    assert events["group"]["group_id"] == "company-42"
    assert events["alias"]["previous_id"] == f"anon-{user}"
    # The SDK's own context arrives, and its clock-corrected time is about now.
    assert library in events["track"]["context"]["library"]["name"]
    when = datetime.fromisoformat(events["track"]["timestamp"])
    assert abs(datetime.now(UTC) - when) < timedelta(minutes=1)
    assert len({e["message_id"] for e in events.values()}) == 5


Factory = Callable[..., Any]


def segment_client(**kwargs: Any) -> Any:
    return segment.Client(**kwargs)


def rudder_client(**kwargs: Any) -> Any:
    return rudderstack.Client(**kwargs)


SDKS = [
    pytest.param(segment_client, "analytics-python", False, id="segment"),
    pytest.param(segment_client, "analytics-python", True, id="segment-gzip"),
    pytest.param(rudder_client, "analytics-python", True, id="rudderstack"),
]


@pytest.mark.parametrize(("factory", "library", "gzip"), SDKS)
def test_sdk_events_arrive(
    kilde_server: Server, factory: Factory, library: str, gzip: bool
) -> None:
    errors: list[Exception] = []
    client = factory(
        write_key=BACKEND_KEY,
        host=kilde_server.url,
        gzip=gzip,
        on_error=lambda error, _batch: errors.append(error),
        max_retries=0,
    )
    user = f"sdk-{uuid.uuid4().hex[:10]}"
    send_the_five_calls(client, user)
    client.flush()
    client.join()
    assert errors == []
    assert_five_stored(kilde_server, user, library)


@pytest.mark.parametrize(("factory", "library", "gzip"), SDKS)
def test_sdk_sending_twice_stores_once(
    kilde_server: Server, factory: Factory, library: str, gzip: bool
) -> None:
    """SDKs retry a batch when an answer is lost; the messageId keeps it from counting twice."""
    user = f"sdk-{uuid.uuid4().hex[:10]}"
    client = factory(write_key=BACKEND_KEY, host=kilde_server.url, gzip=gzip, sync_mode=True)
    message_id = f"{user}-once"
    for _ in range(2):
        client.track(user, "Signed In", message_id=message_id)
    assert [e["message_id"] for e in stored(kilde_server, user)] == [message_id]


@pytest.mark.parametrize(("factory", "library", "gzip"), SDKS)
def test_sdk_reports_a_wrong_write_key_without_retrying(
    kilde_server: Server, factory: Factory, library: str, gzip: bool, caplog: Any
) -> None:
    errors: list[Any] = []
    client = factory(
        write_key="not-a-key-of-this-shop",
        host=kilde_server.url,
        gzip=gzip,
        on_error=lambda error, _batch: errors.append(error),
        max_retries=3,
    )
    user = f"sdk-{uuid.uuid4().hex[:10]}"
    with caplog.at_level(logging.CRITICAL):
        client.track(user, "Signed In")
        client.flush()
        client.join()
    [error] = errors
    assert (error.status, error.code) == (401, "unknown_write_key")
    assert "write key" in error.message
    assert stored(kilde_server, user) == []


@pytest.mark.parametrize(("factory", "library", "gzip"), SDKS)
def test_sdk_off_plan_event_goes_to_the_dead_letter(
    kilde_server: Server, factory: Factory, library: str, gzip: bool
) -> None:
    errors: list[Any] = []
    client = factory(
        write_key=BACKEND_KEY,
        host=kilde_server.url,
        gzip=gzip,
        on_error=lambda error, _batch: errors.append(error),
    )
    user = f"sdk-{uuid.uuid4().hex[:10]}"
    client.track(user, "Refund Issued", {"amount": 10})
    client.track(user, "Signed In")
    client.flush()
    client.join()
    # The batch is accepted (nothing to retry); the off-plan event waits in the dead letter.
    assert errors == []
    assert [e["event"] for e in stored(kilde_server, user)] == ["Signed In"]
    letters = httpx.get(
        f"{kilde_server.url}/api/bad-events",
        params={"source": "backend", "limit": 1000},
        headers=kilde_server.admin,
    ).json()["dead_letters"]
    details = [
        httpx.get(f"{kilde_server.url}/api/bad-events/{d['id']}", headers=kilde_server.admin).json()
        for d in letters
        if d["path"] == "event"
    ]
    assert any(user in d["payload"] and "Refund Issued" in d["payload"] for d in details)
