"""Normalize: a raw Segment-spec message into one row of the events table.

Checks what the Segment spec requires of every message, whatever the plan says, and corrects
the client's clock: timestamp = receivedAt - (sentAt - originalTimestamp).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kilde.errors import KildeError

MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias")
MAX_ID_LENGTH = 512
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(days=1)


class Rejection(KildeError):
    """A record that cannot be stored as it is; it goes to the dead letter with this reason."""

    def __init__(self, code: str, message: str, *, path: str | None = None, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.code = code
        self.path = path


@dataclass(frozen=True)
class Envelope:
    """What the collector knew about a record besides its body."""

    received_at: datetime
    channel: str = "http"
    ip: str | None = None
    user_agent: str | None = None


def parse_time(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejection(
            "invalid_timestamp",
            f"{field} must be an ISO 8601 string",
            path=field,
            fix="send it like 2026-11-29T08:15:00.000Z",
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Rejection(
            "invalid_timestamp",
            f"{field} is not an ISO 8601 date and time",
            path=field,
            fix="send it like 2026-11-29T08:15:00.000Z",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _identifier(message: dict[str, Any], field: str) -> str | None:
    value = message.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Rejection(
            "invalid_field",
            f"{field} must be a string",
            path=field,
            fix=f"send {field} as a non-empty string",
        )
    text = str(value)
    if len(text) > MAX_ID_LENGTH:
        raise Rejection(
            "invalid_field",
            f"{field} is longer than {MAX_ID_LENGTH} characters",
            path=field,
            fix=f"send a shorter {field}",
        )
    return text


def _object(message: dict[str, Any], field: str) -> dict[str, Any]:
    value = message.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Rejection(
            "invalid_field",
            f"{field} must be a JSON object",
            path=field,
            fix=f'send {field} as an object such as {{"key": "value"}}, or leave it out',
        )
    return value


def normalize(message: Any, message_type: str | None, source: str, env: Envelope) -> dict[str, Any]:
    """Return the events-table row for one message, or raise Rejection."""
    if not isinstance(message, dict):
        raise Rejection(
            "invalid_message", "the message must be a JSON object", fix="send one object per event"
        )
    kind = message_type or message.get("type")
    if kind not in MESSAGE_TYPES:
        raise Rejection(
            "invalid_type",
            "type must be one of " + ", ".join(MESSAGE_TYPES),
            path="type",
            fix="set type, or post to /v1/<type> instead of /v1/batch",
        )
    user_id = _identifier(message, "userId")
    anonymous_id = _identifier(message, "anonymousId")
    if user_id is None and anonymous_id is None:
        raise Rejection(
            "missing_id",
            "the message has neither userId nor anonymousId",
            path="userId",
            fix="send userId for known people or anonymousId (a random id kept on the device)",
        )
    event: str | None = None
    group_id = previous_id = None
    properties = _object(message, "properties")
    traits = _object(message, "traits")
    context = _object(message, "context")
    integrations = _object(message, "integrations")
    if kind == "track":
        name = message.get("event")
        if name is not None and not isinstance(name, str):
            raise Rejection(
                "invalid_field",
                "event must be a string",
                path="event",
                fix='send the event name as a string, for example "Order Completed"',
            )
        if not isinstance(name, str) or not name.strip():
            raise Rejection(
                "missing_event",
                "a track message needs an event name",
                path="event",
                fix='set "event", for example "Order Completed"',
            )
        event = name.strip()
    elif kind in ("page", "screen"):
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise Rejection(
                "invalid_field", "name must be a string", path="name", fix="send name as a string"
            )
        event = name or None
    elif kind == "group":
        group_id = _identifier(message, "groupId")
        if group_id is None:
            raise Rejection(
                "missing_id", "a group message needs groupId", path="groupId", fix="set groupId"
            )
    elif kind == "alias":
        previous_id = _identifier(message, "previousId")
        if previous_id is None:
            raise Rejection(
                "missing_id",
                "an alias message needs previousId",
                path="previousId",
                fix="set previousId to the id the person had before",
            )
        if user_id is None:
            raise Rejection(
                "missing_id",
                "an alias message needs userId",
                path="userId",
                fix="set userId to the id the person has now",
            )
    if kind == "identify" and not traits and isinstance(context.get("traits"), dict):
        traits = context["traits"]

    original = parse_time(message.get("timestamp") or message.get("originalTimestamp"), "timestamp")
    sent_at = parse_time(message.get("sentAt"), "sentAt")
    received = env.received_at
    timestamp: datetime | None
    try:
        if original is not None and sent_at is not None:
            timestamp = received - (sent_at - original)
        else:
            timestamp = original or received
    except OverflowError:  # a clock off by thousands of years
        timestamp = None
    if timestamp is None or timestamp < EARLIEST or timestamp > received + FUTURE_SLACK:
        raise Rejection(
            "timestamp_out_of_range",
            "the timestamp (after correcting the sender's clock with sentAt) is before 2000 or "
            "more than a day in the future",
            path="timestamp",
            fix="check the sending device's clock, or leave timestamp out to use the arrival time",
        )

    message_id = _identifier(message, "messageId") or f"kilde-{uuid.uuid4()}"
    raw_page = context.get("page")
    page: dict[str, Any] = raw_page if isinstance(raw_page, dict) else {}
    if kind == "page":
        page = {
            **page,
            **{k: properties[k] for k in ("url", "path", "referrer") if k in properties},
        }
    return {
        "message_id": message_id,
        "source": source,
        "type": kind,
        "event": event,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "group_id": group_id,
        "previous_id": previous_id,
        "timestamp": timestamp,
        "original_timestamp": original,
        "sent_at": sent_at,
        "received_at": received,
        "properties": properties,
        "traits": traits,
        "context": context,
        "integrations": integrations,
        "page_url": _text(page.get("url")),
        "page_path": _text(page.get("path")),
        "referrer": _text(page.get("referrer")),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def batch_items(payload: dict[str, Any]) -> list[Any]:
    """The messages of a Segment batch, with the batch's context, integrations and sentAt
    merged into each (what the item says itself wins)."""
    batch = payload.get("batch")
    if not isinstance(batch, list):
        return []
    context = payload.get("context")
    integrations = payload.get("integrations")
    sent_at = payload.get("sentAt")
    items: list[Any] = []
    for item in batch:
        if isinstance(item, dict):
            item = dict(item)
            for field, shared in (("context", context), ("integrations", integrations)):
                own = item.get(field)
                if isinstance(shared, dict) and (own is None or isinstance(own, dict)):
                    item[field] = {**shared, **(own or {})}
            if sent_at is not None and "sentAt" not in item:
                item["sentAt"] = sent_at
        items.append(item)
    return items
