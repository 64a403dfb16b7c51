"""Reading the consent ledger: `GET /api/consent` (admin).

The ledger is written by the pipeline (kilde.pipeline.consent) from the consent signals that
arrive with events: k.js's `kilde.consent()`, Segment's categoryPreferences, and Global Privacy
Control. Here it is read back: the history of one person, and their current state per purpose.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from kilde.store import Store
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem

router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])

_FIELDS = (
    "id, user_id, anonymous_id, purpose, state, decided_at, recorded_at, source, channel, "
    "evidence, ip, message_id"
)


def ledger(
    store: Store,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    purpose: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Ledger rows of a person (by either id), oldest first."""
    where, params = ["(user_id = ? OR anonymous_id = ?)"], [user_id, anonymous_id]
    if purpose is not None:
        where.append("purpose = ?")
        params.append(purpose)
    return store.query(
        f"SELECT {_FIELDS} FROM consent_ledger WHERE {' AND '.join(where)} "
        "ORDER BY decided_at, seq LIMIT ?",
        [*params, limit],
    )


def current(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The latest state per purpose of `ledger` rows."""
    state: dict[str, str] = {}
    for row in rows:
        state[row["purpose"]] = row["state"]
    return state


@router.get("/consent")
def consent_history(
    request: Request,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    purpose: str | None = None,
    limit: int = Query(1000, ge=1, le=10000),
) -> dict[str, Any]:
    """A person's consent records (by user id or anonymous id) and their current state."""
    if not user_id and not anonymous_id:
        raise HttpProblem(
            400,
            "missing_id",
            "name the person with user_id or anonymous_id",
            "add ?user_id=... or ?anonymous_id=...",
        )
    rows = ledger(
        request.app.state.store,
        user_id=user_id,
        anonymous_id=anonymous_id,
        purpose=purpose,
        limit=limit,
    )
    return {"records": rows, "current": current(rows), "count": len(rows)}
