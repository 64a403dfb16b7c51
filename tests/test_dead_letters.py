"""Dead letters as a data owner works them: list, inspect, fix the plan, replay."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import BACKEND_KEY, DEMO_PLAN, WEB_KEY, Server, start_server

GIFT_WRAPPED = """
  - name: Gift Wrapped
    purposes: [analytics]
    properties:
      type: object
      properties:
        paper: {type: string}
"""


def add_to_plan(server: Server, events_yaml: str) -> None:
    """Append event specs to the `events:` section of the server's own plan copy."""
    text = server.plan_path.read_text()
    marker = "\n# What we may know about a person"
    assert marker in text
    server.plan_path.write_text(text.replace(marker, events_yaml.rstrip() + "\n" + marker, 1))


def track(server: Server, body: dict[str, Any], key: str = WEB_KEY) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/track", json=body, auth=(key, ""))


def letters(server: Server, status: str = "pending") -> list[dict[str, Any]]:
    """Dead letters through the admin API (the CLI's own listing is tested once below)."""
    response = httpx.get(
        f"{server.url}/api/bad-events", params={"status": status}, headers=server.admin
    )
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["dead_letters"]
    return rows


def cli_letters(server: Server, *args: str) -> list[dict[str, Any]]:
    result = server.kilde("bad-events", "list", "--json", *args)
    rows: list[dict[str, Any]] = orjson.loads(result.stdout)["dead_letters"]
    return rows


def events_of(server: Server, user: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/events", params={"user_id": user}, headers=server.admin)
    rows: list[dict[str, Any]] = response.json()["events"]
    return rows


def test_off_plan_event_is_listed_shown_fixed_and_replayed(own_server: Server) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    body = {
        "userId": user,
        "event": "Gift Wrapped",
        "messageId": f"{user}-gift",
        "properties": {"paper": "red"},
    }
    sent = track(own_server, body)
    assert sent.status_code == 400
    assert sent.json()["error"] == "off_plan"
    letter_id = sent.json()["dead_letter_id"]
    assert events_of(own_server, user) == []

    # list: the table a person reads, and JSON for scripts
    table = own_server.kilde("bad-events", "list").stdout
    assert "1 dead letters (pending)" in table
    assert letter_id[:8] in table
    [row] = cli_letters(own_server)
    assert row["id"] == letter_id
    assert row["source"] == "web"
    assert row["path"] == "event"
    assert "'Gift Wrapped' is not in the collection plan" in row["reason"]

    # show: the original payload, as sent
    shown = orjson.loads(own_server.kilde("bad-events", "show", letter_id).stdout)
    assert orjson.loads(shown["payload"]) == body
    assert shown["envelope"]["type"] == "track"

    # Replaying before the plan changes changes nothing.
    unchanged = own_server.kilde("bad-events", "replay").stdout
    assert "replayed 0 (stored 0 events), 1 still failing" in unchanged
    assert letters(own_server)[0]["status"] == "pending"

    add_to_plan(own_server, GIFT_WRAPPED)
    replayed = own_server.kilde("bad-events", "replay").stdout
    assert "replayed 1 (stored 1 events), 0 still failing" in replayed
    [stored] = events_of(own_server, user)
    assert stored["message_id"] == f"{user}-gift"
    assert stored["properties"] == {"paper": "red"}
    assert stored["plan_status"] == "ok"
    assert letters(own_server) == []
    [done] = cli_letters(own_server, "--status", "replayed")
    assert done["id"] == letter_id
    assert done["replay_count"] == 2
    assert done["last_replayed_at"] is not None


def test_still_failing_replay_stays_pending_with_the_new_reason(own_server: Server) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    sent = track(own_server, {"userId": user, "event": "Gift Wrapped", "properties": {"paper": 5}})
    letter_id = sent.json()["dead_letter_id"]
    [before] = letters(own_server)
    assert before["path"] == "event"

    add_to_plan(own_server, GIFT_WRAPPED)  # the event is now known, but paper must be a string
    result = own_server.kilde("bad-events", "replay", letter_id).stdout
    assert "replayed 0 (stored 0 events), 1 still failing" in result
    assert "properties.paper must be string" in result

    [after] = letters(own_server)
    assert after["id"] == letter_id
    assert after["status"] == "pending"
    assert after["path"] == "properties.paper"
    assert "properties.paper must be string" in after["reason"]
    assert after["replay_count"] == 1
    assert events_of(own_server, user) == []


def test_replay_of_a_whole_rejected_batch_body(own_server: Server) -> None:
    """A batch refused as a whole (here: sent as a form) is kept whole and replayed item by
    item, with the batch's context still merged into each item."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    batch = {
        "batch": [
            {"type": "track", "userId": user, "event": "Signed In", "messageId": f"{user}-1"},
            {"type": "track", "userId": user, "event": "Gift Wrapped", "messageId": f"{user}-2"},
        ],
        "context": {"locale": "nb-NO"},
    }
    sent = httpx.post(
        f"{own_server.url}/v1/batch",
        content=orjson.dumps(batch),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=(BACKEND_KEY, ""),
    )
    assert sent.status_code == 415
    letter_id = sent.json()["dead_letter_id"]

    result = own_server.kilde("bad-events", "replay", "--source", "backend").stdout
    # The body as a whole is replayed; the item that is still off-plan gets a letter of its own.
    assert "replayed 1 (stored 1 events)" in result
    [stored] = events_of(own_server, user)
    assert stored["message_id"] == f"{user}-1"
    assert stored["context"]["locale"] == "nb-NO"
    [item_letter] = letters(own_server)
    assert item_letter["id"] != letter_id
    assert item_letter["path"] == "event"
    item = orjson.loads(own_server.kilde("bad-events", "show", item_letter["id"]).stdout)
    assert orjson.loads(item["payload"])["context"] == {"locale": "nb-NO"}


def test_replay_of_a_body_that_is_still_not_json(kilde_server: Server) -> None:
    sent = httpx.post(
        f"{kilde_server.url}/v1/track",
        content=b'{"userId": "u-1", "event": ',
        headers={"Content-Type": "application/json"},
        auth=(WEB_KEY, ""),
    )
    letter_id = sent.json()["dead_letter_id"]
    result = kilde_server.kilde("bad-events", "replay", letter_id).stdout
    assert "replayed 0 (stored 0 events), 1 still failing" in result
    assert "still not valid JSON" in result
    shown = orjson.loads(kilde_server.kilde("bad-events", "show", letter_id).stdout)
    assert (shown["status"], shown["replay_count"]) == ("pending", 1)


def test_replay_with_a_broken_plan_says_so_and_changes_nothing(own_server: Server) -> None:
    track(own_server, {"userId": "u-1", "event": "Gift Wrapped"})
    own_server.plan_path.write_text(
        own_server.plan_path.read_text().replace("legal_basis: contract", "legal_basis: whim")
    )
    result = own_server.kilde("bad-events", "replay", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "plan" in output and "kilde plan check" in output
    assert "legal_basis" in output
    assert letters(own_server)[0]["status"] == "pending"


def test_bad_events_show_of_an_unknown_id(kilde_server: Server) -> None:
    result = kilde_server.kilde("bad-events", "show", "no-such-letter", check=False)
    assert result.returncode != 0
    assert "no dead letter with that id" in result.stdout + result.stderr


def test_bad_events_commands_work_without_a_running_server(own_server: Server) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    sent = track(own_server, {"userId": user, "event": "Gift Wrapped", "messageId": f"{user}-g"})
    letter_id = sent.json()["dead_letter_id"]
    own_server.stop()

    add_to_plan(own_server, GIFT_WRAPPED)
    replayed = own_server.kilde("bad-events", "replay", letter_id).stdout
    assert "replayed 1 (stored 1 events), 0 still failing" in replayed
    listed = orjson.loads(own_server.kilde("events", "list", "--json").stdout)
    assert [e["message_id"] for e in listed] == [f"{user}-g"]


def test_a_replayed_letter_is_remembered_as_newest_after_a_restart(tmp_path: Path) -> None:
    """A replay keeps the receipt time of the first try, hours ago; the writer's memory of
    recent message ids is reloaded in the order events were written, so an SDK's retry of
    that message after a restart is still caught as a duplicate."""
    plan = tmp_path / "kilde.yaml"
    shutil.copy(DEMO_PLAN, plan)
    server = start_server(tmp_path / "data", plan, KILDE_DEDUPE_IDS="16")
    try:
        user = f"u-{uuid.uuid4().hex[:8]}"
        body = {"userId": user, "event": "Gift Wrapped", "messageId": f"{user}-gift"}
        assert track(server, body).status_code == 400
        newer = [
            {"type": "track", "userId": user, "event": "Signed In", "messageId": f"{user}-{i}"}
            for i in range(40)
        ]
        sent = httpx.post(f"{server.url}/v1/batch", json={"batch": newer}, auth=(WEB_KEY, ""))
        assert sent.json()["stored"] == 40
        add_to_plan(server, GIFT_WRAPPED)
        assert "replayed 1 (stored 1 events)" in server.kilde("bad-events", "replay").stdout
        server.stop()
        server = start_server(tmp_path / "data", plan, KILDE_DEDUPE_IDS="16")
        retried = track(server, body)
        assert retried.json()["stored"] == 0 and retried.json()["duplicates"] == 1
        assert len([e for e in events_of(server, user) if e["event"] == "Gift Wrapped"]) == 1
    finally:
        server.stop()
