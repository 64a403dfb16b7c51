"""Live events: the newest events as they arrive (polling `GET /api/events`), filterable, each
expandable. Viewers see what happened, where and when, but no ids and no payloads."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from kilde.web import admin_api
from kilde.web.dashboard.base import Page, audit, page_route

router = APIRouter()

PAGE_SIZE = 50
POLL_SECONDS = 3
TYPES = ("track", "page", "screen", "identify", "group", "alias")
# What a viewer may see of an event: no ids, no payloads, no addresses.
AGGREGATE_FIELDS = (
    "source",
    "type",
    "event",
    "timestamp",
    "received_at",
    "plan_status",
    "country",
    "browser",
    "os",
    "device",
)


def _filters(page: Page) -> dict[str, str | None]:
    query = page.request.query_params
    plan = page.state.pipeline.plan
    source = query.get("source") or None
    kind = query.get("type") or None
    event = (query.get("event") or "").strip()[:200] or None
    return {
        "source": source if source in {s.name for s in plan.sources} else None,
        "type": kind if kind in TYPES else None,
        "event": event,
    }


def _after(page: Page) -> tuple[datetime, str] | None:
    raw = page.request.query_params.get("after")
    if not raw:
        return None
    try:
        at, message_id = orjson.loads(base64.urlsafe_b64decode(raw.encode()))
        return datetime.fromisoformat(at), str(message_id)
    except Exception:
        return None


def _cursor(row: dict[str, Any]) -> str:
    raw = orjson.dumps([row["timestamp"].isoformat(), row["message_id"]])
    return base64.urlsafe_b64encode(raw).decode()


def _fetch(page: Page, filters: dict[str, str | None], after: Any) -> list[dict[str, Any]]:
    result = admin_api.events(
        page.request,
        source=filters["source"],
        type=filters["type"],
        event=filters["event"],
        user_id=None,
        anonymous_id=None,
        since=after[0] if after else None,
        until=None,
        limit=PAGE_SIZE,
        cursor=None,
    )
    rows: list[dict[str, Any]] = result["events"]
    if after is not None:
        rows = [r for r in rows if (r["timestamp"], r["message_id"]) > after]
    if not page.user.can("personal"):
        rows = [{k: r.get(k) for k in AGGREGATE_FIELDS} | {"_key": _cursor(r)} for r in rows]
    else:
        rows = [r | {"_key": _cursor(r)} for r in rows]
    return rows


def _context(page: Page) -> dict[str, Any]:
    filters = _filters(page)
    query = urlencode({k: v for k, v in filters.items() if v})
    return {"filters": filters, "query": query, "types": TYPES, "poll": POLL_SECONDS}


@page_route(router, "/live", "aggregate")
def live_page(page: Page) -> Response:
    context = _context(page)
    rows = _fetch(page, context["filters"], None)
    if page.user.can("personal"):  # ids and payloads on the page (not on each poll)
        audit(page.request, 200, personal=True)
    return page.render(
        "live.html",
        title="Live events",
        events=rows,
        after=rows[0]["_key"] if rows else "",
        sources=[s.name for s in page.state.pipeline.plan.sources],
        personal=page.user.can("personal"),
        **context,
    )


@page_route(router, "/live/feed", "aggregate")
def live_feed(page: Page) -> Response:
    """New events since `after`, to put on top, and the poller with the newest cursor."""
    context = _context(page)
    after = _after(page)
    rows = _fetch(page, context["filters"], after)
    newest = rows[0]["_key"] if rows else (page.request.query_params.get("after") or "")
    return page.render(
        "live_feed.html",
        events=rows,
        after=newest,
        personal=page.user.can("personal"),
        **context,
    )
