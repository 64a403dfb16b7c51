"""The audit log: every admin action and every export of personal data, who, when, what.

Every admin endpoint depends on `require_admin`; the privacy router replaces that dependency by
`audited_admin`, which checks the token the same way and records one row per request: when,
who (a fingerprint of the token and the client program, or a dashboard user), the action as
method and route template (`POST /api/privacy/erase`, never the URL with its values), the
outcome, whether the answer carried personal data, and for privacy actions a salted hash of
the person concerned and counts. No personal data is ever written in clear: not the token,
not the identifiers, not the query string.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import Request

from kilde.store.database import Store
from kilde.store.writer import WriteBatch
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem

log = logging.getLogger("kilde.privacy")

# Routes whose answers carry personal data (besides those that say so themselves).
PERSONAL_ROUTES = (
    "/api/events",
    "/api/profiles",
    "/api/consent",
    "/api/bad-events/{",
    "/api/merge-conflicts",
    "/api/privacy/export",
    "/api/privacy/consent",
    "/api/privacy/do-not-sell",
    "/api/segments/{",
    "/api/imports/{",
    "/api/destinations/{",  # runs send people to partners; deliveries and replays hold them
    "/api/email/campaigns/{campaign}/render",  # every recipient's own copy of a mail
)


def actor_of(request: Request) -> str:
    """Who is calling, without anything that could be used to call as them."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    parts = []
    if scheme.lower() == "bearer" and token.strip():
        parts.append("token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12])
    user = getattr(request.state, "user", None)
    name = getattr(user, "username", None) or (user if isinstance(user, str) else None)
    if name:
        parts.append(f"user:{name}")
    declared = request.headers.get("x-kilde-actor", "")[:60]
    if declared:
        parts.append(declared)
    agent = request.headers.get("user-agent", "").split(" ", 1)[0][:40]
    if agent:
        parts.append(f"via:{agent}")
    return " ".join(parts) or "unknown"


def _route(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return f"{request.method} {path or '(unmatched)'}"


async def audited_admin(request: Request) -> AsyncIterator[None]:
    """`require_admin`, and an audit row for the request whatever its outcome."""
    status = 200
    try:
        require_admin(request)
        yield
    except HttpProblem as problem:
        status = problem.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        await _record(request, status)


async def _record(request: Request, status: int) -> None:
    action = _route(request)
    personal = bool(getattr(request.state, "audit_personal", False)) or any(
        action.split(" ", 1)[1].startswith(p) for p in PERSONAL_ROUTES
    )
    detail = getattr(request.state, "audit_detail", None)
    row = (
        "INSERT INTO audit_log (logged_at, actor, action, status, personal_data, subject, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            datetime.now(UTC),
            actor_of(request),
            action,
            status,
            personal and status < 400,
            getattr(request.state, "audit_subject", None),
            orjson.dumps(detail, default=str).decode() if detail else None,
        ],
    )
    try:
        await request.app.state.writer.write(WriteBatch(statements=[row]))
    except Exception as exc:  # the action itself is done; say that its record is missing
        log.error("audit record not written: %s", type(exc).__name__)


def entries(
    store: Store,
    *,
    limit: int = 100,
    personal_only: bool = False,
    action: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    where: list[str] = []
    params: list[Any] = []
    if personal_only:
        where.append("personal_data")
    if action:
        where.append("contains(action, ?)")
        params.append(action)
    if since is not None:
        where.append("logged_at >= ?")
        params.append(since)
    sql = (
        "SELECT seq, logged_at, actor, action, status, personal_data, subject, detail "
        "FROM audit_log"
    )
    sql = f"SELECT * FROM ({sql})"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY logged_at DESC, seq DESC NULLS LAST LIMIT ?"
    rows = store.query(sql, [*params, limit])
    for row in rows:
        row["detail"] = orjson.loads(row["detail"]) if row["detail"] else None
    return rows
