"""The overview: events per day by source and channel, profiles, dead-letter rate, sources'
health and consent rates; the page `/` and its figures at `GET /api/overview` (aggregates only).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kilde.store import Store
from kilde.web import admin_api
from kilde.web.dashboard import charts
from kilde.web.dashboard.base import Page, page_route

router = APIRouter()
api = APIRouter(prefix="/api")  # guarded by require_admin in routes.py

# The channel of an event: the campaign medium it came with (utm_medium), else how it arrived.
_CHANNEL = (
    "coalesce(nullif(json_extract_string(context, '$.campaign.medium'), ''), "
    "CASE WHEN json_extract_string(context, '$.kilde.form_id') IS NOT NULL THEN 'form' "
    "WHEN json_extract_string(context, '$.provenance.import_run') IS NOT NULL THEN 'import' "
    "ELSE 'direct' END)"
)


def _days(days: int) -> list[date]:
    today = datetime.now(UTC).date()
    return [today - timedelta(days=days - 1 - i) for i in range(days)]


def events_per_day(store: Store, days: int, by: str) -> dict[str, Any]:
    column = "source" if by == "source" else _CHANNEL
    since = datetime.combine(_days(days)[0], datetime.min.time(), UTC)
    rows = store.query(
        f"SELECT CAST(timezone('UTC', timestamp) AS DATE) AS day, {column} AS key, "
        "count(*) AS events FROM events WHERE timestamp >= ? GROUP BY ALL",
        [since],
    )
    labels = [d.isoformat() for d in _days(days)]
    index = {d: i for i, d in enumerate(labels)}
    series: dict[str, list[int]] = {}
    for row in rows:
        i = index.get(row["day"].isoformat())
        if i is None:
            continue
        series.setdefault(str(row["key"]), [0] * days)[i] += int(row["events"])
    ordered = dict(sorted(series.items(), key=lambda kv: -sum(kv[1])))
    return {"days": labels, "series": ordered}


def profile_figures(store: Store, active_days: int = 30) -> dict[str, Any]:
    since = datetime.now(UTC) - timedelta(days=active_days)
    row = store.query(
        "SELECT (SELECT count(*) FROM profiles) AS profiles, "
        "(SELECT count(*) FROM profiles WHERE last_seen >= ?) AS active, "
        "(SELECT count(DISTINCT profile_id) FROM identity_map "
        " WHERE id_type IN ('user_id', 'email', 'phone', 'external_id')) AS identified",
        [since],
    )[0]
    total = int(row["profiles"] or 0)
    return {
        "profiles": total,
        "active": int(row["active"] or 0),
        "active_days": active_days,
        "identified": int(row["identified"] or 0),
        "identified_share": (int(row["identified"] or 0) / total) if total else None,
    }


def dead_letter_rate(store: Store, days: int = 7) -> dict[str, Any]:
    since = datetime.now(UTC) - timedelta(days=days)
    row = store.query(
        "SELECT (SELECT count(*) FROM events WHERE received_at >= ?) AS stored, "
        "(SELECT count(*) FROM dead_letters WHERE received_at >= ?) AS rejected",
        [since, since],
    )[0]
    stored, rejected = int(row["stored"] or 0), int(row["rejected"] or 0)
    seen = stored + rejected
    return {
        "days": days,
        "stored": stored,
        "rejected": rejected,
        "rate": rejected / seen if seen else None,
    }


def source_health(request: Request) -> list[dict[str, Any]]:
    """Every source of the plan with the last event received (from GET /api/stats)."""
    stats = admin_api.stats(request)
    last: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for row in stats["by_source_and_type"]:
        name = row["source"]
        counts[name] = counts.get(name, 0) + int(row["events"])
        if row["last_received"] is not None and (
            name not in last or row["last_received"] > last[name]
        ):
            last[name] = row["last_received"]
    now = datetime.now(UTC)
    result = []
    for source in request.app.state.pipeline.plan.sources:
        seen = last.get(source.name)
        if seen is None:
            status = "never"
        elif now - seen > timedelta(days=1):
            status = "quiet"
        else:
            status = "ok"
        result.append(
            {
                "source": source.name,
                "kind": source.kind,
                "owner": source.owner,
                "events": counts.get(source.name, 0),
                "last_received": seen,
                "status": status,
            }
        )
    return result


def consent_rates(store: Store) -> list[dict[str, Any]]:
    """Per purpose: people whose latest recorded choice is granted, denied or withdrawn."""
    rows = store.query(
        "SELECT purpose, state, count(*) AS people FROM ("
        " SELECT purpose, state, row_number() OVER (PARTITION BY purpose, "
        " coalesce(user_id, 'a:' || anonymous_id) ORDER BY decided_at DESC, seq DESC) AS rn "
        " FROM consent_ledger) WHERE rn = 1 GROUP BY ALL ORDER BY purpose, state"
    )
    by: dict[str, dict[str, int]] = {}
    for row in rows:
        by.setdefault(row["purpose"], {})[row["state"]] = int(row["people"])
    result = []
    for purpose, states in sorted(by.items()):
        decided = sum(states.values())
        result.append(
            {
                "purpose": purpose,
                "granted": states.get("granted", 0),
                "denied": states.get("denied", 0),
                "withdrawn": states.get("withdrawn", 0),
                "decided": decided,
                "rate": states.get("granted", 0) / decided if decided else None,
            }
        )
    return result


def overview(request: Request, days: int = 30) -> dict[str, Any]:
    store: Store = request.app.state.store
    return {
        "by_source": events_per_day(store, days, "source"),
        "by_channel": events_per_day(store, days, "channel"),
        "profiles": profile_figures(store),
        "dead_letters": dead_letter_rate(store),
        "sources": source_health(request),
        "consent": consent_rates(store),
    }


@api.get("/overview")
def overview_api(request: Request, days: int = Query(30, ge=1, le=366)) -> dict[str, Any]:
    """The dashboard's overview figures: aggregates only, so every role may read them."""
    return overview(request, days)


@page_route(router, "/", "aggregate")
def overview_page(page: Page) -> Response:
    figures = overview(page.request)
    src, chn = figures["by_source"], figures["by_channel"]
    return page.render(
        "overview.html",
        title="Overview",
        f=figures,
        chart_source=charts.stacked_bars(src["days"], src["series"], "Events per day by source"),
        legend_source=charts.legend(list(src["series"])),
        chart_channel=charts.stacked_bars(chn["days"], chn["series"], "Events per day by channel"),
        legend_channel=charts.legend(list(chn["series"])),
        chart_consent=charts.hbars(
            [(c["purpose"], c["rate"] or 0.0) for c in figures["consent"]],
            "Consent granted per purpose",
            fmt="{:.0%}",
            max_value=1.0,
        ),
    )
