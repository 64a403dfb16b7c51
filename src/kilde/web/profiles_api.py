"""The profiles and identity API under /api (admin token required).

Prefer `POST /api/profiles/lookup` (identifier in the JSON body) over
`GET /api/profiles?email=...`: URLs end up in proxies' and browsers' histories, and personal
data must not. The GET form exists for Segment-style tooling; Kilde never logs query strings.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kilde.identity.conflicts import REASONS
from kilde.identity.engine import IdentityEngine, UnmergeError
from kilde.identity.identifiers import Identifier, Normaliser, parse_identifier
from kilde.plan.models import IDENTIFIER_TYPES
from kilde.profiles import queries
from kilde.store import Store
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem, JsonResponse


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    engine = IdentityEngine(
        state.store, state.writer, lambda: state.pipeline.plan, state.settings.data_dir
    )
    state.identity = engine
    if os.environ.get("KILDE_IDENTITY_BACKGROUND", "1") != "0":
        engine.start()
    try:
        yield
    finally:
        await asyncio.to_thread(engine.stop)


router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], lifespan=_lifespan)


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _engine(request: Request) -> IdentityEngine:
    engine: IdentityEngine = request.app.state.identity
    return engine


def _normaliser(request: Request) -> Normaliser:
    return Normaliser(request.app.state.pipeline.plan.identity)


class Lookup(BaseModel):
    """Give one or more; `identifier` takes `type:value`, an email, a phone or an id."""

    email: str | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    phone: str | None = None
    external_id: str | None = Field(None, description="kind:value, e.g. crm_id:C-1042")
    identifier: str | None = None


def _identifiers(request: Request, body: Lookup) -> list[Identifier]:
    normaliser = _normaliser(request)
    found: list[Identifier] = []
    given = False
    for id_type in ("user_id", "anonymous_id", "email", "phone", "external_id"):
        raw = getattr(body, id_type)
        if raw is None:
            continue
        given = True
        value = normaliser.normalise(id_type, raw)
        if value is None:
            raise HttpProblem(
                400,
                "invalid_identifier",
                f"the {id_type} given is not a valid {id_type} (or is a junk value)",
                f"send a real {id_type}; placeholder values such as 'null' link nobody",
                path=id_type,
            )
        found.append(Identifier(id_type, value))
    if body.identifier is not None:
        given = True
        found.extend(parse_identifier(body.identifier, normaliser))
    if not given:
        raise HttpProblem(
            400,
            "missing_identifier",
            "give an identifier to look up",
            'send for example {"email": "..."} or {"identifier": "user_id:..."}',
        )
    return found


def _lookup(request: Request, body: Lookup) -> dict[str, Any]:
    store = _store(request)
    ids = queries.lookup(store, _identifiers(request, body))
    return {"profiles": queries.summary(store, ids), "count": len(ids)}


@router.post("/profiles/lookup")
def lookup_profiles(request: Request, body: Lookup) -> dict[str, Any]:
    """Profiles holding an identifier given in the body (preferred: no personal data in URLs)."""
    return _lookup(request, body)


@router.get("/profiles")
def find_profiles(
    request: Request,
    email: str | None = None,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    phone: str | None = None,
) -> dict[str, Any]:
    """Like POST /api/profiles/lookup; prefer that one, since URLs may be logged elsewhere."""
    body = Lookup(
        email=email, user_id=user_id, anonymous_id=anonymous_id, phone=phone, external_id=None
    )
    return _lookup(request, body)


class Search(BaseModel):
    query: str = Field(min_length=2, max_length=200)
    limit: int = Field(20, ge=1, le=200)


@router.post("/profiles/search")
def search_profiles(request: Request, body: Search) -> dict[str, Any]:
    """Profiles whose identifiers or trait values contain the text."""
    found = queries.search(_store(request), body.query.strip(), body.limit)
    return {"profiles": found, "count": len(found)}


def _current(request: Request, profile_id: str) -> tuple[str, str | None]:
    current = queries.resolve(_store(request), profile_id)
    if current is None:
        raise HttpProblem(
            404,
            "profile_not_found",
            "there is no profile with that id",
            "look it up by identifier with POST /api/profiles/lookup or `kilde profile show`",
        )
    return current, (profile_id if current != profile_id else None)


@router.get("/profiles/{profile_id}")
def get_profile(request: Request, profile_id: str) -> dict[str, Any]:
    """Traits with provenance, identities, consents, computed traits and merge conflicts."""
    current, merged = _current(request, profile_id)
    found = queries.profile(_store(request), current)
    if found is None:  # removed between the two reads
        raise HttpProblem(404, "profile_not_found", "the profile is gone", "look it up again")
    found["redirected_from"] = merged
    return found


def _cursor_decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(raw[0]), str(raw[1])
    except Exception:
        raise HttpProblem(
            400,
            "invalid_cursor",
            "the cursor is not one this API handed out",
            "pass the `next_cursor` value of the previous page unchanged",
            path="cursor",
        ) from None


@router.get("/profiles/{profile_id}/events")
def profile_events(
    request: Request,
    profile_id: str,
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
) -> dict[str, Any]:
    """The profile's timeline: every event of every identifier, newest first."""
    current, merged = _current(request, profile_id)
    before = _cursor_decode(cursor) if cursor else None
    rows = queries.timeline(_store(request), current, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more and rows:
        raw = orjson.dumps([rows[-1]["timestamp"].isoformat(), rows[-1]["message_id"]])
        next_cursor = base64.urlsafe_b64encode(raw).decode()
    return {
        "profile_id": current,
        "redirected_from": merged,
        "events": rows,
        "count": len(rows),
        "next_cursor": next_cursor,
    }


@router.get("/merge-conflicts")
def merge_conflicts(
    request: Request,
    reason: str | None = Query(None, description="one of " + ", ".join(REASONS)),
    profile_id: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """Links the merge rules refused, newest first, with the reason."""
    if reason is not None and reason not in REASONS:
        raise HttpProblem(
            400,
            "invalid_reason",
            "unknown conflict reason",
            "use one of " + ", ".join(REASONS),
            path="reason",
        )
    rows, total = queries.conflicts(_store(request), reason, profile_id, limit, offset)
    return {"conflicts": rows, "total": total, "reasons": REASONS}


class Unmerge(BaseModel):
    identifiers: list[str] = Field(
        min_length=1, description="TYPE:VALUE of each identifier to split off, e.g. email:a@b.no"
    )
    reason: str | None = Field(None, max_length=500)


@router.post("/profiles/{profile_id}/unmerge")
async def unmerge(request: Request, profile_id: str, body: Unmerge) -> dict[str, Any]:
    """Split identifiers off a wrong merge into a profile of their own, for good."""
    current, _ = _current(request, profile_id)
    split: list[Identifier] = []
    for text in body.identifiers:
        head, sep, rest = text.partition(":")
        if not sep or head not in IDENTIFIER_TYPES:
            raise HttpProblem(
                400,
                "invalid_identifier",
                "each identifier must be TYPE:VALUE with a known type",
                "types: " + ", ".join(IDENTIFIER_TYPES),
                path="identifiers",
            )
        value = _normaliser(request).normalise(head, rest)
        if value is None:
            raise HttpProblem(
                400,
                "invalid_identifier",
                f"an identifier of type {head} is not valid",
                "copy the identifier as `kilde profile show` prints it",
                path="identifiers",
            )
        split.append(Identifier(head, value))
    engine = _engine(request)
    try:
        report = await run_in_threadpool(engine.unmerge, current, split, body.reason)
    except UnmergeError as exc:
        raise HttpProblem(409, "cannot_unmerge", exc.message, exc.fix or "") from None
    store = _store(request)
    kept = queries.resolve(store, current)
    moved = queries.lookup(store, split)
    return {
        "profile_id": kept,
        "split_into": [p for p in moved if p != kept],
        "report": report.as_dict(),
    }


@router.post("/profiles/rebuild")
async def rebuild(
    request: Request, wait: float = Query(60.0, ge=0, le=600, description="seconds to wait")
) -> JsonResponse:
    """Recompute every identity and profile from the stored events.

    Answers with the report when the rebuild ends within `wait` seconds, else 202 and
    `running: true`; follow it with GET /api/identity/status.
    """
    future = _engine(request).start_rebuild()
    try:
        report = await asyncio.wait_for(asyncio.wrap_future(future), timeout=wait)
    except TimeoutError:
        return JsonResponse({"running": True, "progress": _engine(request).progress}, 202)
    return JsonResponse({"running": False, **report.as_dict()})


@router.post("/profiles/refresh")
async def refresh(request: Request) -> dict[str, Any]:
    """Process every event stored so far now (the background task does this continuously)."""
    done = await run_in_threadpool(_engine(request).wait_idle, 60.0)
    return {"up_to_date": done}


@router.get("/identity/status")
def identity_status(request: Request) -> dict[str, Any]:
    store = _store(request)
    engine = _engine(request)
    counts = store.query(
        "SELECT (SELECT count(*) FROM profiles) AS profiles, "
        "(SELECT count(*) FROM identity_map) AS identifiers, "
        "(SELECT count(*) FROM identity_map WHERE shared) AS shared_identifiers, "
        "(SELECT count(*) FROM identity_conflicts) AS conflicts, "
        "(SELECT count(*) FROM identity_separations) AS unmerges"
    )[0]
    by_type = store.query(
        "SELECT id_type, count(*) AS identifiers FROM identity_map GROUP BY ALL ORDER BY id_type"
    )
    # identifiers dropped from records as junk or of the wrong shape (counts only, no values)
    dropped = store.query(
        "SELECT d->>0 AS field, d->>1 AS reason, count(*) AS records FROM ("
        " SELECT unnest(CAST(dropped AS JSON[])) AS d FROM identity_records"
        " WHERE dropped IS NOT NULL) GROUP BY ALL ORDER BY records DESC, field"
    )
    return {
        **counts,
        "by_type": by_type,
        "dropped": dropped,
        "last_update": engine.last_tick,
        "unread_events": engine.unread(),
        "last_error": engine.last_error,
        "rebuilding": engine.rebuilding,
        "progress": engine.progress,
        "last_rebuild": engine.last_rebuild.as_dict() if engine.last_rebuild else None,
    }


@router.get("/identity/report")
async def identity_report(request: Request) -> dict[str, Any]:
    """Merge precision and recall against the demo's truth (who each person really is)."""
    from kilde.identity.accuracy import accuracy_report

    data_dir = request.app.state.settings.data_dir
    await run_in_threadpool(_engine(request).wait_idle, 60.0)
    return await run_in_threadpool(accuracy_report, _store(request), data_dir)
