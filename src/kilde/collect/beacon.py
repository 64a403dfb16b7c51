"""Web beacons: a 1x1 transparent GIF that records a page view or an event from its address.

For pages without JavaScript, AMP pages, and other people's sites:

    <img src="https://collect.example/v1/b.gif?k=WRITE_KEY&t=page&url=..." alt="">

Parameters: `k` (write key, required), `t` (page | track | screen | identify; page when left
out), `e` (event name, or page name), `u` (user id), `a` (anonymous id; else the `kilde_aid`
cookie), `m` (message id, for retries), `url`, `path`, `r` (referrer), `title`, `ts` (ISO 8601
time), `p.NAME=value` (string properties), `props` (a JSON object of properties), and
`utm_*`, `gclid`, `fbclid` (campaign). Segment's `GET /v1/pixel/{type}?data=<base64 JSON>` is
accepted too.

The answer is always the GIF, never cached, whatever was sent: a beacon has nobody to read an
error. A HEAD request (link checkers, prefetchers) gets the GIF's headers and records nothing.
What was wrong goes to the dead letter, and its code to the `X-Kilde-Result` header.
Query strings may carry personal data; like every address they are never logged.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from kilde.collect.cookie import COOKIE, valid_id
from kilde.collect.segment_api import client_ip
from kilde.collect.tracker import gpc_header
from kilde.pipeline import Envelope, Pipeline
from kilde.pipeline.dead_letter import dead_letter_row
from kilde.pipeline.enrich import protect_ip
from kilde.plan.models import Source
from kilde.store.writer import StoreUnavailableError, WriteBatch

# The smallest transparent 1x1 GIF (43 bytes).
GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
MAX_QUERY = 8 * 1024
BEACON_TYPES = ("page", "track", "screen", "identify")
PIXEL_TYPES = ("page", "track", "screen", "identify", "group", "alias")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "0",
}
_CAMPAIGN = {
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_campaign": "name",
    "utm_term": "term",
    "utm_content": "content",
    "gclid": "gclid",
    "fbclid": "fbclid",
}

router = APIRouter()


class BadBeacon(Exception):
    def __init__(self, code: str, reason: str, source: Source | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.source = source


def gif(result: str, status: int = 200) -> Response:
    return Response(
        GIF,
        status_code=status,
        media_type="image/gif",
        headers={**NO_CACHE, "X-Kilde-Result": result},
    )


def _envelope(request: Request) -> Envelope:
    return Envelope(
        received_at=datetime.now(UTC),
        channel="beacon",
        ip=client_ip(request),
        user_agent=request.headers.get("user-agent"),
    )


def _params(request: Request) -> dict[str, str]:
    """The query parameters, last value wins; refuses oversized query strings unread."""
    query = request.scope.get("query_string", b"")
    if len(query) > MAX_QUERY:
        raise BadBeacon("query_too_large", f"the query string is longer than {MAX_QUERY} bytes")
    try:
        text = query.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBeacon("not_utf8", "the query string is not UTF-8") from None
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=False).items()}


def _raw_params(request: Request) -> Any:
    """What a rejected beacon sent, for its dead letter: the parameters (at most MAX_QUERY)."""
    query = request.scope.get("query_string", b"")[:MAX_QUERY]
    text = query.decode("utf-8", errors="replace")
    return {k: v[-1] for k, v in parse_qs(text).items()} or text


def _source(request: Request, key: str | None) -> Source:
    source: Source | None = request.app.state.keys.active.get(key) if key else None
    if source is None:
        if not key:
            raise BadBeacon("missing_write_key", "no write key (parameter k) was sent")
        if key in request.app.state.keys.revoked:
            raise BadBeacon("revoked_write_key", "the write key has been revoked")
        raise BadBeacon("unknown_write_key", "the write key belongs to no source in the plan")
    return source


def _campaign(params: dict[str, str], url: str | None) -> dict[str, str]:
    found = dict(params)
    if url:
        query = parse_qs(urlsplit(url).query)
        found = {**{k: v[-1] for k, v in query.items()}, **found}
    return {name: found[key][:200] for key, name in _CAMPAIGN.items() if found.get(key)}


def beacon_record(params: dict[str, str], request: Request) -> dict[str, Any]:
    """The Segment-spec message a beacon's parameters describe."""
    kind = params.get("t") or params.get("type") or "page"
    if kind not in BEACON_TYPES:
        raise BadBeacon("invalid_type", "t must be one of " + ", ".join(BEACON_TYPES))
    properties: dict[str, Any] = {}
    raw_props = params.get("props")
    if raw_props:
        try:
            decoded = orjson.loads(raw_props)
        except orjson.JSONDecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            raise BadBeacon("invalid_props", "props must be a JSON object")
        properties.update(decoded)
    for param, value in params.items():
        if param.startswith("p.") and len(param) > 2:
            properties[param[2:]] = value
    url = params.get("url") or (request.headers.get("referer") if kind == "page" else None)
    page: dict[str, Any] = {}
    if url:
        page["url"] = url
        page["path"] = params.get("path") or urlsplit(url).path or "/"
    elif params.get("path"):
        page["path"] = params["path"]
    if params.get("r"):
        page["referrer"] = params["r"]
    if params.get("title"):
        page["title"] = params["title"]
    context: dict[str, Any] = {"library": {"name": "kilde-beacon"}, "page": page}
    campaign = _campaign(params, url)
    if campaign:
        context["campaign"] = campaign
    if gpc_header(request):
        context["gpc"] = True
    record: dict[str, Any] = {"type": kind, "context": context}
    user_id = params.get("u") or params.get("userId")
    anonymous_id = (
        params.get("a") or params.get("anonymousId") or valid_id(request.cookies.get(COOKIE))
    )
    if user_id:
        record["userId"] = user_id
    if anonymous_id:
        record["anonymousId"] = anonymous_id
    record["messageId"] = params.get("m") or f"beacon-{uuid.uuid4()}"
    if params.get("ts"):
        record["timestamp"] = params["ts"]
    name = params.get("e") or params.get("event")
    if kind == "track":
        record["event"] = name
        record["properties"] = properties
    elif kind in ("page", "screen"):
        if name:
            record["name"] = name
        record["properties"] = {**page, **properties}
    else:
        record["traits"] = properties
    return record


async def _dead_letter(
    request: Request, payload: Any, env: Envelope, problem: BadBeacon, kind: str | None
) -> None:
    pipeline: Pipeline = request.app.state.pipeline
    kept = Envelope(
        env.received_at, env.channel, protect_ip(env.ip, pipeline.plan.privacy.ip), env.user_agent
    )
    row = dead_letter_row(
        payload,
        source=problem.source.name if problem.source else None,
        env=kept,
        code=problem.code,
        reason=problem.reason,
        path=None,
        message_type=kind,
    )
    await pipeline.writer.write(WriteBatch(dead_letters=[row]))


async def _ingest(
    request: Request, record: dict[str, Any], source: Source, env: Envelope
) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    try:
        result = await pipeline.ingest([record], source, env)
    except StoreUnavailableError:
        return gif("store_busy", 503)
    if result.rejected:
        return gif(f"rejected:{result.rejected[0].code}")
    return gif("stored" if result.stored else "duplicate")


async def _guarded(
    request: Request,
    payload: Callable[[], Any],
    kind: str | None,
    work: Callable[[Envelope], Awaitable[Response]],
) -> Response:
    env = _envelope(request)
    try:
        return await work(env)
    except BadBeacon as problem:
        try:
            await _dead_letter(request, payload(), env, problem, kind)
        except StoreUnavailableError:
            return gif("store_busy", 503)
        return gif(f"rejected:{problem.code}")


@router.api_route("/v1/b.gif", methods=["GET", "HEAD"], include_in_schema=False)
async def beacon(request: Request) -> Response:
    if request.method == "HEAD":  # link checkers and prefetchers: the GIF, nothing recorded
        return gif("not_recorded")

    async def work(env: Envelope) -> Response:
        params = _params(request)
        source = _source(request, params.get("k") or params.get("writeKey"))
        try:
            record = beacon_record(params, request)
        except BadBeacon as problem:
            problem.source = source
            raise
        return await _ingest(request, record, source, env)

    return await _guarded(
        request, lambda: _raw_params(request), request.query_params.get("t"), work
    )


def _decode_pixel(data: str | None) -> dict[str, Any]:
    if not data:
        raise BadBeacon("missing_data", "the data parameter (base64 JSON) is missing")
    text = data.strip().replace(" ", "+")  # '+' often arrives as a space
    padded = text + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        message = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise BadBeacon("invalid_data", "data is not base64-encoded JSON") from None
    if not isinstance(message, dict):
        raise BadBeacon("invalid_data", "data must encode one JSON object")
    return message


@router.api_route("/v1/pixel/{kind}", methods=["GET", "HEAD"], include_in_schema=False)
async def segment_pixel(kind: str, request: Request) -> Response:
    """Segment's pixel API: the message as base64 JSON in `data`, with its writeKey."""
    if request.method == "HEAD":
        return gif("not_recorded")

    async def work(env: Envelope) -> Response:
        if kind not in PIXEL_TYPES:
            kinds = ", ".join(PIXEL_TYPES)
            raise BadBeacon("invalid_type", f"the pixel type must be one of {kinds}")
        params = _params(request)
        message = _decode_pixel(params.get("data"))
        key = message.pop("writeKey", None)
        source = _source(request, key if isinstance(key, str) else None)
        message["type"] = kind
        if gpc_header(request):
            context = message.get("context")
            if isinstance(context, dict):
                message["context"] = {**context, "gpc": True}
            elif context is None:
                message["context"] = {"gpc": True}
        return await _ingest(request, message, source, env)

    return await _guarded(request, lambda: _raw_params(request), kind[:20], work)
