"""The insights API under /api (admin token required): segments, RFM, CLV, churn, preferences,
funnels, retention, attribution, email campaigns, survey and sentiment trends.

A rule that cannot be used answers 400 with `path` pointing at the part of the rule that is
wrong. Empty segments and funnels answer 200 with zero counts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kilde.insights import attribution as attribution_mod
from kilde.insights import campaigns as campaigns_mod
from kilde.insights import churn as churn_mod
from kilde.insights import funnels as funnels_mod
from kilde.insights import preferences as preferences_mod
from kilde.insights import recommendations as recommendations_mod
from kilde.insights import retention as retention_mod
from kilde.insights import rfm as rfm_mod
from kilde.insights import trends as trends_mod
from kilde.insights.data import backend_of
from kilde.insights.engine import InsightsEngine
from kilde.insights.profile_view import profile_insights
from kilde.insights.segments import membership
from kilde.insights.segments.rules import RuleError, duration_days
from kilde.plan.models import Plan
from kilde.profiles import queries
from kilde.store import Store
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem

T = TypeVar("T")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state

    def catch_up() -> None:
        identity = getattr(state, "identity", None)
        if identity is not None:
            identity.wait_idle(120.0)

    engine = InsightsEngine(
        state.store, state.writer, lambda: state.pipeline, state.settings.data_dir, catch_up
    )
    state.insights = engine
    if os.environ.get("KILDE_INSIGHTS_BACKGROUND", "1") != "0":
        engine.start()
    try:
        yield
    finally:
        await asyncio.to_thread(engine.stop)


queries.add_profile_hook(profile_insights)
router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], lifespan=_lifespan)


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _plan(request: Request) -> Plan:
    plan: Plan = request.app.state.pipeline.plan
    return plan


def _engine(request: Request) -> InsightsEngine:
    engine: InsightsEngine = request.app.state.insights
    return engine


def _rule_problem(exc: RuleError, prefix: str = "") -> HttpProblem:
    path = exc.path if not prefix or exc.path.startswith(prefix) else f"{prefix}.{exc.path}"
    return HttpProblem(
        400,
        "invalid_rule",
        f"{path}: {exc.detail}",
        exc.fix or "correct the named part of the rule (see docs/insights-segments.md)",
        path=path,
    )


async def _run(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking compute in a thread, with DuckDB's analytics memory limit (reports scan
    the events); rule errors become 400s with the rule's path."""
    store = _store(request)

    def call() -> T:
        with store.analytics_memory():
            return fn(*args)

    try:
        return await run_in_threadpool(call)
    except RuleError as exc:
        raise _rule_problem(exc) from None
    except membership.SegmentNotFoundError as exc:
        raise HttpProblem(404, "segment_not_found", exc.message, exc.fix or "") from None


def _now() -> datetime:
    return datetime.now(UTC)


async def _fresh(request: Request) -> None:
    """Reports read the profiles: bring them up to date with the stored events first."""
    await run_in_threadpool(_engine(request).catch_up)


# -- segments ----------------------------------------------------------------------------------


@router.get("/segments")
def list_segments(request: Request) -> dict[str, Any]:
    """Every segment (the plan's and the API's) with its members now and its latest refresh."""
    store = _store(request)
    counts = membership.counts(store)
    out = []
    for segment in membership.definitions(store, _plan(request)).values():
        seen = counts.get(segment.id, {})
        out.append(
            {
                **segment.as_dict(),
                "members": seen.get("members", 0),
                "last_run": seen.get("last_run"),
            }
        )
    return {"segments": out, "count": len(out)}


class Preview(BaseModel):
    rule: dict[str, Any] = Field(description="A segment rule (see docs/insights-segments.md)")
    sample: int = Field(10, ge=0, le=200)


@router.post("/segments/preview")
async def preview_segment(request: Request, body: Preview) -> dict[str, Any]:
    """How many profiles a rule selects now, and a sample of them with their RFM, CLV, churn."""
    await run_in_threadpool(_engine(request).catch_up)
    return await _run(
        request, membership.preview, _store(request), _plan(request), body.rule, body.sample
    )


class SegmentBody(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    rule: dict[str, Any]


@router.put("/segments/{segment_id}")
async def save_segment(request: Request, segment_id: str, body: SegmentBody) -> dict[str, Any]:
    """Create or replace a segment (segments in the plan are changed in the plan)."""
    found = await _run(
        request,
        membership.save,
        _store(request),
        request.app.state.writer,
        _plan(request),
        segment_id,
        body.name,
        body.description,
        body.rule,
    )
    return {"segment": found.as_dict(), "saved": True}


@router.delete("/segments/{segment_id}")
async def delete_segment(request: Request, segment_id: str) -> dict[str, Any]:
    await _run(
        request,
        membership.delete,
        _store(request),
        request.app.state.writer,
        _plan(request),
        segment_id,
    )
    return {"deleted": segment_id}


@router.get("/segments/{segment_id}")
async def get_segment(request: Request, segment_id: str) -> dict[str, Any]:
    store = _store(request)
    found = await _run(request, membership.get, store, _plan(request), segment_id)
    seen = membership.counts(store).get(segment_id, {})
    return {
        **found.as_dict(),
        "members": seen.get("members", 0),
        "history": membership.history(store, segment_id),
    }


@router.get("/segments/{segment_id}/members")
async def segment_members(
    request: Request,
    segment_id: str,
    limit: int = Query(50, ge=1, le=10_000),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """Current members, highest lifetime value first, with why: RFM group, CLV, churn risk."""
    store = _store(request)
    await _run(request, membership.get, store, _plan(request), segment_id)
    rows, total = membership.member_rows(store, segment_id, limit, offset)
    return {"segment": segment_id, "members": rows, "total": total}


class Refresh(BaseModel):
    segments: list[str] | None = Field(
        default=None, description="Only these (default: every segment)"
    )
    insights: bool = Field(default=True, description="Recompute RFM, CLV and churn first")


@router.post("/segments/refresh")
async def refresh_segments(request: Request, body: Refresh | None = None) -> dict[str, Any]:
    """Re-evaluate segments now: who entered, who left; their events are emitted."""
    body = body or Refresh()
    engine = _engine(request)
    models = None
    if body.insights:
        models = await _run(request, engine.refresh_profiles)
    runs = await _run(request, engine.refresh_segments, body.segments)
    return {"segments": runs, "models": models}


# -- insights ----------------------------------------------------------------------------------


@router.post("/insights/refresh")
async def refresh_insights(request: Request) -> dict[str, Any]:
    """Recompute every profile's RFM, CLV, churn and preferences, then every segment."""
    engine = _engine(request)
    models = await _run(request, engine.refresh_profiles)
    runs = await _run(request, engine.refresh_segments, None)
    return {"models": models, "segments": runs}


def _insights_table(request: Request) -> Any:
    return backend_of(_store(request)).table("profile_insights")


@router.get("/insights/status")
def insights_status(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return {
        "models": engine.models(),
        "last_run": engine.last_run,
        "last_error": engine.last_error,
        "refresh": _plan(request).segments.refresh,
    }


@router.get("/insights/rfm")
async def rfm(request: Request) -> dict[str, Any]:
    """Customers per RFM group and the recency-by-frequency grid."""
    report = await _run(request, rfm_mod.rfm_report, _insights_table(request))
    return {**report, "computed_at": _engine(request).models()}


@router.get("/insights/clv")
async def clv(request: Request, top: int = Query(20, ge=0, le=1000)) -> dict[str, Any]:
    """The fitted models, the value distribution and the most valuable customers."""
    store = _store(request)

    def build() -> dict[str, Any]:
        deciles = store.query(
            "SELECT count(*) AS customers, sum(clv) AS total, avg(clv) AS average, "
            "quantile_cont(clv, [0.1, 0.25, 0.5, 0.75, 0.9]) AS quantiles, max(clv) AS highest "
            "FROM profile_insights WHERE clv IS NOT NULL"
        )[0]
        best = store.query(
            "SELECT profile_id, clv, expected_purchases, expected_spend, p_alive, rfm_group, "
            "frequency, monetary FROM profile_insights WHERE clv IS NOT NULL "
            "ORDER BY clv DESC, profile_id LIMIT ?",
            [top],
        )
        return {"distribution": deciles, "top": best}

    found = await _run(request, build)
    return {"models": _engine(request).models(), **found}


@router.get("/insights/churn")
async def churn(request: Request) -> dict[str, Any]:
    report = await _run(request, churn_mod.churn_report, _insights_table(request))
    return report


@router.get("/insights/preferences")
async def preferences(request: Request, limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
    """How people spread over channels, times of day, categories; products bought together."""
    await _fresh(request)
    store = _store(request)

    def build() -> dict[str, Any]:
        backend = backend_of(store)
        spread = preferences_mod.preferences_report(
            backend.table("profile_insights"), backend.table("profiles")
        )
        return {**spread, "bought_together": recommendations_mod.bought_together(backend, limit)}

    return await _run(request, build)


class FunnelBody(BaseModel):
    steps: list[Any] = Field(description='Event names or {"event": NAME, "where": [...]}')
    within: str = Field("7 days", description="How long after step 1 the last step may come")
    since: str | None = Field("90 days", description="Only people who began in this period")
    segment: str | None = Field(None, description="Only members of this segment (its rule now)")


@router.post("/insights/funnel")
async def funnel(request: Request, body: FunnelBody) -> dict[str, Any]:
    """Ordered steps within a window: people, conversion and drop-off per step."""
    await _fresh(request)
    store, plan = _store(request), _plan(request)

    def build() -> dict[str, Any]:
        steps = funnels_mod.parse_steps(body.steps)
        for path, value in (("within", body.within), ("since", body.since)):
            if value is not None:
                duration_days(value, path)
        ctx = membership.context(store, plan)
        rule = None
        if body.segment is not None:
            rule = membership.get(store, plan, body.segment).rule
        return funnels_mod.funnel(ctx, steps, body.within, body.since, rule)

    return await _run(request, build)


@router.get("/insights/retention")
async def retention(
    request: Request,
    period: Literal["week", "month"] = "week",
    periods: int = Query(12, ge=1, le=104),
    cohort: Literal["first_seen", "first_order"] = "first_seen",
    activity: Literal["any", "orders"] = "any",
) -> dict[str, Any]:
    """Cohorts by first activity or first order: share active in each later week or month."""
    await _fresh(request)
    backend = backend_of(_store(request))
    return await _run(
        request, retention_mod.retention, backend, _now(), period, periods, cohort, activity
    )


@router.get("/insights/attribution")
async def attribution(
    request: Request,
    model: Literal["first_touch", "last_touch", "linear"] = "last_touch",
    conversion: Literal["order", "signup"] = "order",
    lookback: str = "30 days",
    since: str | None = None,
) -> dict[str, Any]:
    """Orders or signups credited to UTM source, medium and campaign; customer quality."""
    await _fresh(request)
    try:
        lookback_days = duration_days(lookback, "lookback")
        since_days = duration_days(since, "since") if since else None
    except RuleError as exc:
        raise HttpProblem(
            400, "invalid_duration", exc.message, exc.fix or "", path=exc.path
        ) from None
    backend = backend_of(_store(request))
    return await _run(
        request,
        attribution_mod.attribution,
        backend,
        _now(),
        model,
        conversion,
        lookback_days,
        since_days,
    )


@router.get("/insights/campaigns")
async def email_campaigns(request: Request, window: str = "7 days") -> dict[str, Any]:
    """Every email campaign: sent, human and machine opens, clicks, orders after the click."""
    await _fresh(request)
    try:
        days = duration_days(window, "window")
    except RuleError as exc:
        raise HttpProblem(
            400, "invalid_duration", exc.message, exc.fix or "", path=exc.path
        ) from None
    backend = backend_of(_store(request))
    rows = await _run(request, campaigns_mod.campaign_reports, backend, days)
    return {"campaigns": rows, "window_days": days}


@router.get("/insights/trends")
async def trends(
    request: Request,
    period: Literal["week", "month"] = "week",
    periods: int = Query(12, ge=1, le=104),
) -> dict[str, Any]:
    """NPS and support sentiment per week or month."""
    await _fresh(request)
    backend = backend_of(_store(request))
    return await _run(request, trends_mod.trends, backend, _now(), period, periods)
