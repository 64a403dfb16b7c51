"""The admin API under /api: health, stats, events, dead letters, the plan.

Everything but /api/health needs `Authorization: Bearer <admin token>`.
"""

from __future__ import annotations

import base64
import os
import resource
import sys
from datetime import datetime
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from kilde import __version__
from kilde.errors import KildeError
from kilde.pipeline import Pipeline
from kilde.pipeline.replay import replay
from kilde.plan import PlanError, load_plan
from kilde.store import Store
from kilde.web.dashboard.auth import COOKIE as SESSION_COOKIE
from kilde.web.dashboard.auth import authorize_api
from kilde.web.errors import HttpProblem


def require_admin(request: Request) -> None:
    if "authorization" not in request.headers and SESSION_COOKIE in request.cookies:
        # A dashboard user's session: allowed what their role allows (see dashboard.auth).
        authorize_api(request)
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HttpProblem(
            401,
            "missing_admin_token",
            "this endpoint needs the admin token",
            "send Authorization: Bearer <token>; `kilde admin token` makes a new one",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not request.app.state.tokens.valid(token.strip()):
        raise HttpProblem(
            401,
            "invalid_admin_token",
            "the admin token is not valid",
            "use the token printed on first start, or make a new one with `kilde admin token`",
            headers={"WWW-Authenticate": "Bearer"},
        )


public = APIRouter(prefix="/api")
router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


@public.get("/health")
def health(request: Request) -> dict[str, Any]:
    _store(request).scalar("SELECT 1")
    return {"status": "ok", "version": __version__}


@router.get("/stats")
def stats(request: Request) -> dict[str, Any]:
    store = _store(request)
    by_type = store.query(
        "SELECT source, type, count(*) AS events, max(received_at) AS last_received "
        "FROM events GROUP BY ALL ORDER BY source, type"
    )
    dead = store.query(
        "SELECT coalesce(source, '') AS source, status, count(*) AS dead_letters "
        "FROM dead_letters GROUP BY ALL ORDER BY source, status"
    )
    flagged = store.scalar("SELECT count(*) FROM events WHERE plan_status = 'warn'")
    # what DuckDB runs with (KILDE_DUCKDB_THREADS, KILDE_DUCKDB_MEMORY_LIMIT), as it says it
    engine = store.query(
        "SELECT current_setting('threads') AS threads, "
        "current_setting('memory_limit') AS memory_limit, "
        "(SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()) AS memory_bytes"
    )[0]
    return {
        "events": sum(r["events"] for r in by_type),
        "flagged": flagged,
        "dead_letters_pending": sum(r["dead_letters"] for r in dead if r["status"] == "pending"),
        "by_source_and_type": by_type,
        "dead_letters": dead,
        "store": {
            "duckdb_threads": engine["threads"],
            "duckdb_memory_limit": engine["memory_limit"],
            "duckdb_memory_bytes": int(engine["memory_bytes"]),
        },
        "process": {
            **_resident_memory(),
            # what the writer remembers to catch retried messages (KILDE_DEDUPE_IDS)
            "remembered_message_ids": len(request.app.state.writer.recent),
        },
        # running totals since the start: where acknowledgements spend their time
        "writer": request.app.state.writer.tally.as_dict(),
    }


def _resident_memory() -> dict[str, int | None]:
    """The serving process's resident memory now and at its peak, in bytes (None where the
    system does not say)."""
    now = None
    try:
        with open("/proc/self/statm") as statm:  # Linux: pages
            now = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return {"rss_bytes": now, "peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}


_EVENT_FIELDS = (
    "message_id, source, type, event, user_id, anonymous_id, group_id, previous_id, timestamp, "
    "original_timestamp, sent_at, received_at, properties, traits, context, integrations, ip, "
    "country, browser, browser_version, os, os_version, device, page_url, page_path, referrer, "
    "plan_status, plan_issues"
)


def _cursor_decode(cursor: str) -> tuple[datetime, str, str]:
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(raw, list) or len(raw) != 3:
            raise ValueError("not a cursor")
        return datetime.fromisoformat(raw[0]), str(raw[1]), str(raw[2])
    except Exception:
        raise HttpProblem(
            400,
            "invalid_cursor",
            "the cursor is not one this API handed out",
            "pass the `next_cursor` value of the previous page unchanged",
            path="cursor",
        ) from None


def _cursor_encode(row: dict[str, Any]) -> str:
    # message_id alone does not identify a row: dedupe is per source.
    raw = orjson.dumps([row["timestamp"].isoformat(), row["message_id"], row["source"]])
    return base64.urlsafe_b64encode(raw).decode()


@router.get("/events")
def events(
    request: Request,
    source: str | None = None,
    type: str | None = None,
    event: str | None = None,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
) -> dict[str, Any]:
    """Newest first; pass `next_cursor` back as `cursor` for the next page."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("source", source),
        ("type", type),
        ("event", event),
        ("user_id", user_id),
        ("anonymous_id", anonymous_id),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("timestamp >= ?")
        params.append(since)
    if until is not None:
        where.append("timestamp < ?")
        params.append(until)
    if cursor:
        at, message_id, from_source = _cursor_decode(cursor)
        where.append("(timestamp, message_id, source) < (?, ?, ?)")
        params.extend([at, message_id, from_source])
    sql = f"SELECT {_EVENT_FIELDS} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY timestamp DESC, message_id DESC, source DESC LIMIT ?"
    params.append(limit + 1)
    rows = _store(request).query(sql, params)
    more = len(rows) > limit
    rows = rows[:limit]
    for row in rows:
        for column in ("properties", "traits", "context", "integrations", "plan_issues"):
            if row[column] is not None:
                row[column] = orjson.loads(row[column])
    return {
        "events": rows,
        "count": len(rows),
        "next_cursor": _cursor_encode(rows[-1]) if more and rows else None,
    }


_LETTER_FIELDS = (
    "id, received_at, source, channel, reason, path, status, replay_count, last_replayed_at"
)


@router.get("/bad-events")
def bad_events(
    request: Request,
    status: Literal["pending", "replayed", "all"] = "pending",
    source: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    where, params = _letter_filter(status, source)
    rows = _store(request).query(
        f"SELECT {_LETTER_FIELDS} FROM dead_letters{where} "
        "ORDER BY received_at DESC, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    total = _store(request).scalar(f"SELECT count(*) FROM dead_letters{where}", params)
    return {"dead_letters": rows, "total": total}


def _letter_filter(status: str, source: str | None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if status != "all":
        clauses.append("status = ?")
        params.append(status)
    if source:
        clauses.append("source = ?")
        params.append(source)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


@router.get("/bad-events/{letter_id}")
def bad_event(request: Request, letter_id: str) -> dict[str, Any]:
    rows = _store(request).query(
        f"SELECT {_LETTER_FIELDS}, payload, envelope FROM dead_letters WHERE id = ?", [letter_id]
    )
    if not rows:
        raise HttpProblem(
            404,
            "not_found",
            "there is no dead letter with that id",
            "list them with GET /api/bad-events or `kilde bad-events list`",
        )
    row = rows[0]
    row["envelope"] = orjson.loads(row["envelope"] or "{}")
    return row


class ReplayRequest(BaseModel):
    ids: list[str] | None = Field(None, description="dead letters to replay; all pending if empty")
    source: str | None = None
    reload_plan: bool = Field(True, description="read the plan file again before replaying")


@router.post("/bad-events/replay")
def replay_bad_events(request: Request, body: ReplayRequest) -> dict[str, Any]:
    if body.reload_plan:
        _reload(request)
    store = _store(request)
    if body.ids:
        marks = ", ".join("?" for _ in body.ids)
        letters = store.query(
            f"SELECT * FROM dead_letters WHERE status = 'pending' AND id IN ({marks})", body.ids
        )
    else:
        where, params = _letter_filter("pending", body.source)
        letters = store.query(f"SELECT * FROM dead_letters{where} ORDER BY received_at", params)
    report = replay(request.app.state.pipeline, letters)
    return {
        "replayed": report.replayed,
        "still_failing": report.still_failing,
        "events_stored": report.events_stored,
        "duplicates": report.duplicates,
        "failures": report.failures[:100],
    }


def _reload(request: Request) -> None:
    settings = request.app.state.settings
    try:
        plan = load_plan(settings.plan_path)
    except PlanError as exc:
        raise HttpProblem(
            422,
            "plan_invalid",
            "the plan file has problems, so it was not loaded",
            "run `kilde plan check` and correct the plan",
            extra={"problems": [str(p) for p in exc.problems]},
        ) from None
    except KildeError as exc:
        raise HttpProblem(
            422, "plan_unreadable", exc.message, exc.fix or "check the plan"
        ) from None
    request.app.state.use_plan(plan)


@router.post("/plan/reload")
def reload_plan(request: Request) -> dict[str, Any]:
    _reload(request)
    return {"reloaded": True, "plan": plan_summary(request.app.state.pipeline)}


@router.get("/plan")
def plan(request: Request) -> dict[str, Any]:
    return plan_summary(request.app.state.pipeline)


def plan_summary(pipeline: Pipeline) -> dict[str, Any]:
    plan = pipeline.plan
    return {
        "company": plan.company.name,
        "sources": [
            {"name": s.name, "kind": s.kind, "owner": s.owner, "tool": s.tool, "mode": s.mode}
            for s in plan.sources
        ],
        "purposes": [{"id": p.id, "legal_basis": p.legal_basis} for p in plan.purposes],
        "events": [{"type": e.type, "name": e.name, "purposes": e.purposes} for e in plan.events],
        "traits": [{"name": t.name, "type": t.type, "pii": t.pii} for t in plan.traits],
    }
