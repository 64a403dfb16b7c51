"""Dead letter: rejected records are kept, with why and where, until fixed and replayed.

A dead letter keeps the record as sent, with one exception: IP addresses a sender put in
`context.ip` get the plan's IP policy (truncated by default), as they would in the events table.
The country lookup after a replay works on the truncated address as well.
"""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any

import orjson

from kilde.pipeline.enrich import protect_ip
from kilde.pipeline.normalize import Envelope
from kilde.plan.models import IpPolicy


def payload_field(path: str) -> str:
    """SQL for one JSON field of a dead letter's payload, NULL when the payload is not JSON.

    A body too broken to parse is kept as sent, so a scan over all dead letters must not fail on
    it (json_extract_string raises on malformed JSON).
    """
    return f"json_extract_string(CASE WHEN json_valid(payload) THEN payload END, '{path}')"


# `"ip": "203.0.113.57"` in a body too broken to parse.
_RAW_IP = re.compile(r'("ip"\s*:\s*)"([0-9A-Fa-f.:]{2,45})"')


def _protect_context(message: Any, policy: IpPolicy) -> bool:
    """Apply the IP policy to message["context"]["ip"] in place; True if it changed."""
    if not isinstance(message, dict):
        return False
    context = message.get("context")
    if not isinstance(context, dict) or not isinstance(context.get("ip"), str):
        return False
    kept = protect_ip(context["ip"], policy)
    if kept == context["ip"]:
        return False
    if kept is None:
        del context["ip"]
    else:
        context["ip"] = kept
    return True


def protect_payload(payload: Any, policy: IpPolicy) -> Any:
    """The payload with every context.ip (of a message, a batch and its items) protected."""
    if isinstance(payload, str):
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:

            def replace(match: re.Match[str]) -> str:
                kept = protect_ip(match.group(2), policy)
                return f'{match.group(1)}"{kept}"' if kept else f'{match.group(1)}""'

            return _RAW_IP.sub(replace, payload)
        if isinstance(parsed, dict) and _protect_all(parsed, policy):
            return orjson.dumps(parsed, option=orjson.OPT_NON_STR_KEYS).decode()
        return payload
    if isinstance(payload, dict):
        copied = copy.deepcopy(payload)  # the caller's record stays as it was
        if _protect_all(copied, policy):
            return copied
    return payload


def _protect_all(payload: dict[str, Any], policy: IpPolicy) -> bool:
    changed = _protect_context(payload, policy)
    batch = payload.get("batch")
    if isinstance(batch, list):
        for item in batch:
            changed = _protect_context(item, policy) or changed
    return changed


def dead_letter_row(
    payload: Any,
    *,
    source: str | None,
    env: Envelope,
    code: str,
    reason: str,
    path: str | None,
    message_type: str | None = None,
    ip_policy: IpPolicy = "truncate",
) -> dict[str, Any]:
    """One dead-letter row. `payload` is the original record, or the raw text of a bad body."""
    raw = isinstance(payload, str)
    if ip_policy != "full":
        payload = protect_payload(payload, ip_policy)
    if isinstance(payload, str):
        text = payload
    else:
        text = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode()
    envelope = {
        "channel": env.channel,
        "ip": env.ip if ip_policy == "full" else protect_ip(env.ip, ip_policy),
        "user_agent": env.user_agent,
        "type": message_type,
        "code": code,
        "raw": raw,
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
