"""Segment's HTTP Tracking API, so Segment's and RudderStack's SDKs work unchanged.

POST /v1/identify|track|page|screen|group|alias|batch (and /v1/import, Segment's old name for
batch). The write key is the Basic-auth user name (empty password) or `writeKey` in the body.
Limits as Segment: 32 KB per event, 500 KB and 2,500 events per batch.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from kilde.pipeline import Envelope, IngestResult, Outcome, Pipeline
from kilde.pipeline.dead_letter import dead_letter_row
from kilde.pipeline.ingest import off_loop
from kilde.pipeline.normalize import batch_items
from kilde.plan.models import Source
from kilde.store.writer import StoreUnavailableError, WriteBatch
from kilde.web.errors import HttpProblem, JsonResponse

MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
BATCH_KINDS = ("batch", "import")
# A body this large is read into records on the preparer thread (kilde.pipeline.ingest).
OFF_LOOP_BYTES = 8 * 1024
# Bodies up to this many times the limit are read (and kept as a dead letter); larger ones
# are refused unread so nobody can fill the store with junk.
READ_FACTOR = 4
ACCEPTED_TYPES = ("application/json", "text/plain", "application/x-json", "")

router = APIRouter()


def client_ip(request: Request) -> str | None:
    if request.app.state.settings.trust_proxy:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else None


async def read_body(request: Request, limit: int) -> bytes:
    """Read the raw body, refusing (unread) more than READ_FACTOR x limit."""
    hard = limit * READ_FACTOR
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > hard:
            raise HttpProblem(
                413,
                "payload_too_large",
                f"the request body is larger than {hard // 1024} KB and was not read",
                f"send at most {limit // 1024} KB per request; split batches",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def inflate(request: Request, body: bytes, limit: int) -> bytes:
    """Gunzip the body if its Content-Encoding says so, refusing more than READ_FACTOR x limit."""
    hard = limit * READ_FACTOR
    encoding = request.headers.get("content-encoding", "").lower().strip()
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header
        try:
            inflated = inflater.decompress(body, hard + 1)
        except zlib.error:
            raise HttpProblem(
                400,
                "bad_gzip",
                "the body says Content-Encoding: gzip but is not valid gzip",
                "compress the body with gzip, or drop the Content-Encoding header",
            ) from None
        if len(inflated) > hard or inflater.unconsumed_tail:
            raise HttpProblem(
                413,
                "payload_too_large",
                f"the body inflates to more than {hard // 1024} KB and was not read",
                f"send at most {limit // 1024} KB per request",
            )
        if not inflater.eof:
            raise HttpProblem(
                400,
                "bad_gzip",
                "the gzip body ends before its end marker (truncated)",
                "send the whole gzip stream",
            )
        return inflated
    if encoding not in ("", "identity"):
        raise HttpProblem(
            415,
            "unsupported_encoding",
            "only gzip content encoding is supported",
            "send the body uncompressed or gzip-compressed",
        )
    return body


def check_content_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ACCEPTED_TYPES and not media.endswith("+json"):
        raise HttpProblem(
            415,
            "unsupported_media_type",
            "the body must be JSON (Content-Type application/json or text/plain)",
            "send a JSON body with Content-Type: application/json",
        )


def basic_auth_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise HttpProblem(
            401,
            "bad_authorization",
            "the Authorization header is not valid Basic authentication",
            "send the write key as the Basic-auth user name with an empty password",
        ) from None
    return decoded.partition(":")[0] or None


def resolve_source(request: Request, key: str | None) -> Source:
    keys = request.app.state.keys
    if not key:
        raise HttpProblem(
            401,
            "missing_write_key",
            "no write key was sent",
            "send the source's write key as the Basic-auth user name, or as writeKey in the body",
            headers={"WWW-Authenticate": 'Basic realm="kilde"'},
        )
    source: Source | None = keys.active.get(key)
    if source is not None:
        return source
    if key in keys.revoked:
        raise HttpProblem(
            401,
            "revoked_write_key",
            "this write key has been revoked",
            "use the source's current write key from the collection plan",
        )
    raise HttpProblem(
        401,
        "unknown_write_key",
        "the write key does not belong to any source in the collection plan",
        "check the key, or add it to a source's write_keys in the plan",
    )


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpProblem(
                400,
                "not_utf8",
                "the body is not UTF-8 text",
                "encode the JSON body as UTF-8",
            ) from None
        raise HttpProblem(
            400,
            "malformed_json",
            f"the body is not valid JSON (at character {exc.pos})",
            "send one JSON object",
        ) from None


async def _dead_letter_body(
    request: Request, source: Source, body: bytes, env: Envelope, problem: HttpProblem
) -> None:
    """Keep a whole rejected body from a known source, so nothing it sent is lost."""
    pipeline: Pipeline = request.app.state.pipeline
    row = dead_letter_row(
        body.decode("utf-8", errors="backslashreplace"),
        source=source.name,
        env=env,
        code=problem.code,
        reason=problem.message,
        path=problem.path,
        message_type=request.path_params.get("kind"),
        ip_policy=pipeline.plan.privacy.ip,
    )
    await pipeline.writer.write(WriteBatch(dead_letters=[row]))
    problem.extra["dead_letter_id"] = row["id"]


@dataclass
class _Decoded:
    """A request's body read into records, or what was wrong with it."""

    source: Source | None
    body: bytes
    records: list[Any] = field(default_factory=list)
    message_type: str | None = None
    problem: HttpProblem | None = None
    # the records as a WriteBatch and their outcomes, when they were prepared with the body
    prepared: tuple[WriteBatch, list[Outcome]] | None = None


def _decode(request: Request, kind: str, raw: bytes, limit: int, source: Source | None) -> _Decoded:
    decoded = _Decoded(source, raw)
    try:
        check_content_type(request)
        body = decoded.body = inflate(request, raw, limit)
        payload = _parse(body)
        if not isinstance(payload, dict):
            raise HttpProblem(
                400, "invalid_body", "the body must be a JSON object", "send one JSON object"
            )
        if decoded.source is None:
            body_key = payload.get("writeKey")
            decoded.source = resolve_source(
                request, body_key if isinstance(body_key, str) else None
            )
        if len(body) > limit:
            raise HttpProblem(
                413,
                "payload_too_large",
                f"the body is {len(body) // 1024} KB; the limit is {limit // 1024} KB",
                "send smaller events, or fewer events per batch",
            )
        if kind in BATCH_KINDS:
            decoded.records = _batch_records(payload)
        else:
            payload.pop("writeKey", None)
            decoded.records = [payload]
            decoded.message_type = kind
    except HttpProblem as problem:
        decoded.problem = problem
    return decoded


def _decode_and_prepare(
    request: Request, kind: str, raw: bytes, limit: int, source: Source | None, env: Envelope
) -> _Decoded:
    """`_decode`, then `Pipeline.batch_for`: one hand-over to the preparer thread for both."""
    decoded = _decode(request, kind, raw, limit, source)
    if decoded.problem is None and decoded.source is not None:
        pipeline: Pipeline = request.app.state.pipeline
        decoded.prepared = pipeline.batch_for(
            decoded.records, decoded.source, env, decoded.message_type, MAX_EVENT_BYTES
        )
    return decoded


async def _receive(request: Request, kind: str) -> Response:
    is_batch = kind in BATCH_KINDS
    limit = MAX_BATCH_BYTES if is_batch else MAX_EVENT_BYTES
    header_key = basic_auth_key(request)
    # Authenticate from the header before reading, so strangers cannot make us read big bodies.
    source = resolve_source(request, header_key) if header_key else None
    raw = await read_body(request, limit)
    env = Envelope(
        received_at=datetime.now(UTC),
        channel="http",
        ip=client_ip(request),
        user_agent=request.headers.get("user-agent"),
    )
    if len(raw) >= OFF_LOOP_BYTES:  # parsing a big body would hold up the event loop
        decoded = await off_loop(_decode_and_prepare, request, kind, raw, limit, source, env)
    else:
        decoded = _decode(request, kind, raw, limit, source)
    if decoded.problem is not None:
        # Whatever a known source sent is kept, so it can be fixed and replayed.
        if decoded.source is not None and decoded.problem.status in (400, 413, 415):
            await _dead_letter_body(request, decoded.source, decoded.body, env, decoded.problem)
        raise decoded.problem
    source, records, message_type = decoded.source, decoded.records, decoded.message_type
    assert source is not None  # resolve_source raises when there is none

    pipeline: Pipeline = request.app.state.pipeline
    try:
        if decoded.prepared is not None:
            result = await pipeline.write(*decoded.prepared)
        else:
            result = await pipeline.ingest(
                records, source, env, message_type, max_event_bytes=MAX_EVENT_BYTES
            )
    except StoreUnavailableError as exc:
        raise HttpProblem(
            503, "store_busy", exc.message, "retry with backoff", headers={"Retry-After": "1"}
        ) from None
    return _answer(result, is_batch)


def _batch_records(payload: dict[str, Any]) -> list[Any]:
    batch = payload.get("batch")
    if not isinstance(batch, list):
        raise HttpProblem(
            400,
            "invalid_batch",
            "batch must be a list of messages",
            'send {"batch": [{"type": "track", ...}, ...]}',
            path="batch",
        )
    if len(batch) > MAX_BATCH_EVENTS:
        raise HttpProblem(
            413,
            "too_many_events",
            f"the batch has {len(batch)} events; the limit is {MAX_BATCH_EVENTS}",
            f"send at most {MAX_BATCH_EVENTS} events per batch",
            path="batch",
        )
    return batch_items(payload)


def _answer(result: IngestResult, is_batch: bool) -> Response:
    rejected = [
        {
            "index": o.index,
            "messageId": o.message_id,
            "error": o.code,
            "message": o.reason,
            "path": o.path,
            "fix": o.fix,
            "dead_letter_id": o.dead_letter_id,
        }
        for o in result.rejected
    ]
    flagged = sum(1 for o in result.outcomes if o.status == "flagged")
    if not is_batch and rejected:
        first = rejected[0]
        body = {"success": False, **first, "code": first["error"], "stored_in": "dead letter"}
        return JsonResponse(body, status_code=400)
    return JsonResponse(
        {
            "success": True,
            "stored": result.stored,
            "duplicates": result.duplicates,
            "flagged": flagged,
            "rejected": rejected,
        }
    )


@router.post("/v1/{kind}")
async def collect(kind: str, request: Request) -> Response:
    if kind not in ("identify", "track", "page", "screen", "group", "alias", "batch", "import"):
        raise HttpProblem(
            404,
            "unknown_endpoint",
            "there is no such endpoint under /v1",
            "use /v1/identify, track, page, screen, group, alias or batch",
        )
    return await _receive(request, kind)
