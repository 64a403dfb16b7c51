"""Dead letter: rejected records are kept, with why and where, until fixed and replayed."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from kilde.pipeline.normalize import Envelope


def dead_letter_row(
    payload: Any,
    *,
    source: str | None,
    env: Envelope,
    code: str,
    reason: str,
    path: str | None,
    message_type: str | None = None,
) -> dict[str, Any]:
    """One dead-letter row. `payload` is the original record, or the raw text of a bad body."""
    if isinstance(payload, str):
        text = payload
    else:
        text = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode()
    envelope = {
        "channel": env.channel,
        "ip": env.ip,
        "user_agent": env.user_agent,
        "type": message_type,
        "code": code,
        "raw": isinstance(payload, str),
    }
    return {
        "id": uuid.uuid4().hex,
        "received_at": env.received_at,
        "source": source,
        "channel": env.channel,
        "reason": reason,
        "path": path,
        "payload": text,
        "envelope": orjson.dumps(envelope).decode(),
        "status": "pending",
    }
