"""Insights: RFM grid, lifetime value, churn, preferences, funnels, retention heatmap,
attribution, email campaigns (human and machine opens) and surveys with their trends. One tab
each; every figure comes from the insights, email and forms APIs' route functions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from markupsafe import Markup
from starlette.responses import Response

from kilde.collect.forms import admin as forms_admin
from kilde.web import email_api
from kilde.web.dashboard import charts
from kilde.web.dashboard.base import Page, page_route
from kilde.web.dashboard.optional import call, insights
from kilde.web.errors import HttpProblem

router = APIRouter()

TABS = (
    ("rfm", "RFM"),
    ("clv", "Lifetime value"),
    ("churn", "Churn"),
    ("preferences", "Preferences"),
    ("funnel", "Funnel"),
    ("retention", "Retention"),
    ("attribution", "Attribution"),
    ("campaigns", "Email campaigns"),
    ("surveys", "Surveys & sentiment"),
)
NEEDS_INSIGHTS = {"rfm", "clv", "churn", "preferences", "funnel", "retention", "attribution"}
DEFAULT_FUNNEL = ("Product Viewed", "Product Added", "Checkout Started", "Order Completed")
SCORES = ("1", "2", "3", "4", "5")


def _q(page: Page, name: str, default: str, allowed: tuple[str, ...] | None = None) -> str:
    value = (page.request.query_params.get(name) or default).strip()[:100]
    if allowed is not None and value not in allowed:
        return default
    return value


def _rfm(page: Page, api: Any) -> dict[str, Any]:
    report = call(api.rfm, page.request)
    grid = report.get("grid_recency_by_frequency") or []
    rows = [f"R {i}" for i in range(5, 0, -1)]
    values = [list(map(float, grid[i - 1])) for i in range(5, 0, -1)] if grid else []
    return {
        "report": report,
        "grid": charts.heatmap(
            rows, [f"F {s}" for s in SCORES], values, "Customers by recency and frequency", "{:g}"
        )
        if values
        else Markup('<p class="empty">No customer with an order yet.</p>'),
        "bars": charts.hbars(
            [(g["rfm_group"], float(g["customers"])) for g in report.get("groups", [])],
            "Customers per RFM group",
        ),
    }


def _clv(page: Page, api: Any) -> dict[str, Any]:
    top = 20 if page.user.can("personal") else 0
    report = call(api.clv, page.request, top=top)
    dist = report.get("distribution") or {}
    quantiles = dist.get("quantiles") or []
    labels = ("10 %", "25 %", "median", "75 %", "90 %")
    items = [
        (label, float(v)) for label, v in zip(labels, quantiles, strict=False) if v is not None
    ]
    if dist.get("highest") is not None:
        items.append(("highest", float(dist["highest"])))
    return {
        "report": report,
        "chart": charts.hbars(items, "Lifetime value: quantiles", fmt="{:,.0f}"),
    }


def _churn(page: Page, api: Any) -> dict[str, Any]:
    report = call(api.churn, page.request)
    return {
        "report": report,
        "chart": charts.hbars(
            [(b["risk"], float(b["customers"])) for b in report.get("risk_bands", [])],
            "Customers by churn risk",
        ),
    }


def _preferences(page: Page, api: Any) -> dict[str, Any]:
    report = call(api.preferences, page.request, limit=15)
    spreads = {
        key: charts.hbars([(str(r["value"]), float(r["profiles"])) for r in rows], key)
        for key, rows in report.items()
        if key != "bought_together" and isinstance(rows, list)
    }
    return {"report": report, "spreads": spreads}


def _funnel(page: Page, api: Any) -> dict[str, Any]:
    given = [s.strip() for s in page.request.query_params.getlist("step") if s.strip()][:10]
    steps = given or list(DEFAULT_FUNNEL)
    within = _q(page, "within", "7 days")
    since = _q(page, "since", "90 days")
    segment = _q(page, "segment", "") or None
    body = api.FunnelBody(steps=steps, within=within, since=since, segment=segment)
    problem, report = "", None
    try:
        report = call(api.funnel, page.request, body)
    except HttpProblem as exc:
        problem = f"{exc.message}. {exc.fix}"
    chart = None
    if report:
        chart = charts.hbars(
            [(f"{s['step']}. {s['event']}", float(s["profiles"])) for s in report["steps"]],
            "People reaching each step",
        )
    segments = call(api.list_segments, page.request)["segments"]
    events = sorted({e.name for e in page.state.pipeline.plan.events if e.name})
    return {
        "report": report,
        "chart": chart,
        "problem": problem,
        "steps": steps + [""] * (6 - len(steps)),
        "within": within,
        "since": since,
        "segment": segment or "",
        "segments": segments,
        "events": events,
    }


def _retention(page: Page, api: Any) -> dict[str, Any]:
    period = _q(page, "period", "week", ("week", "month"))
    cohort = _q(page, "cohort", "first_seen", ("first_seen", "first_order"))
    activity = _q(page, "activity", "any", ("any", "orders"))
    report = call(
        api.retention, page.request, period=period, periods=12, cohort=cohort, activity=activity
    )
    cohorts = report.get("cohorts") or []
    width = max((len(c["retention"]) for c in cohorts), default=0)
    chart = charts.heatmap(
        [f"{c['cohort']} ({c['size']})" for c in cohorts],
        [str(i) for i in range(width)],
        [c["retention"] for c in cohorts],
        f"Share of each cohort active in later {period}s",
        max_value=1.0,
    )
    return {
        "report": report,
        "chart": chart,
        "period": period,
        "cohort": cohort,
        "activity": activity,
    }


def _attribution(page: Page, api: Any) -> dict[str, Any]:
    model = _q(page, "model", "last_touch", ("first_touch", "last_touch", "linear"))
    conversion = _q(page, "conversion", "order", ("order", "signup"))
    report = call(
        api.attribution,
        page.request,
        model=model,
        conversion=conversion,
        lookback="30 days",
        since=None,
    )
    chart = charts.hbars(
        [
            (f"{c['utm_source']} / {c['utm_medium']}", float(c["conversions"]))
            for c in report.get("channels", [])
        ],
        "Conversions by source and medium",
        fmt="{:.1f}",
    )
    return {"report": report, "chart": chart, "model": model, "conversion": conversion}


def _campaigns(page: Page, api: Any | None) -> dict[str, Any]:
    listing = email_api.campaigns(page.request)["campaigns"]
    reports = call(api.email_campaigns, page.request, window="7 days") if api else None
    rows = reports.get("campaigns") if reports else None
    return {"campaigns": listing, "reports": rows}


def _surveys(page: Page, api: Any | None) -> dict[str, Any]:
    forms = forms_admin.list_forms(page.request)["forms"]
    results = []
    for form in forms:
        if form["kind"] in ("survey", "nps", "csat") or form["kind"].endswith("survey"):
            results.append(forms_admin.results(page.request, form["id"]))
    nps_charts = {}
    for result in results:
        for q in result["questions"]:
            if "distribution" in q and q.get("responses"):
                nps_charts[(result["form_id"], q["name"])] = charts.columns(
                    [(k, float(v)) for k, v in q["distribution"].items()],
                    f"Answers to {q['label']}",
                    height=160,
                )
    trends = call(api.trends, page.request, period="week", periods=12) if api else None
    trend_charts = {}
    if trends:
        for key in ("nps", "sentiment"):
            points = [
                (str(s["period"])[5:], float(s[key][key if key == "nps" else "average"]))
                for s in trends.get("series", [])
                if isinstance(s.get(key), dict)
                and s[key].get(key if key == "nps" else "average") is not None
            ]
            if points:
                trend_charts[key] = charts.line(points, f"{key} per {trends['period']}")
    return {
        "results": results,
        "charts": nps_charts,
        "trends": trends,
        "trend_charts": trend_charts,
    }


# Tabs whose figures take a moment on a large store: the page comes at once, they follow.
SLOW = {"funnel", "retention", "attribution"}


def _data(page: Page, tab: str, api: Any | None) -> dict[str, Any]:
    if api is None and tab in NEEDS_INSIGHTS:
        return {}
    builders = {
        "rfm": _rfm,
        "clv": _clv,
        "churn": _churn,
        "preferences": _preferences,
        "funnel": _funnel,
        "retention": _retention,
        "attribution": _attribution,
        "campaigns": _campaigns,
        "surveys": _surveys,
    }
    result: dict[str, Any] = builders[tab](page, api)
    return result


@page_route(router, "/insights", "aggregate")
def insights_page(page: Page) -> Response:
    tab = _q(page, "tab", "rfm", tuple(t for t, _ in TABS))
    api = insights(page.request)
    lazy = tab in SLOW and api is not None and page.request.query_params.get("now") != "1"
    status = call(api.insights_status, page.request) if api is not None else None
    return page.render(
        "insights.html",
        title="Insights",
        tab=tab,
        tabs=TABS,
        available=api is not None,
        models=status,
        lazy=lazy,
        query=page.request.url.query,
        d={} if lazy else _data(page, tab, api),
    )


@page_route(router, "/insights/panel", "aggregate")
def insights_panel(page: Page) -> Response:
    """The figures of one tab, for the page to put in place once they are computed."""
    tab = _q(page, "tab", "rfm", tuple(t for t, _ in TABS))
    api = insights(page.request)
    return page.render("insights_panel.html", tab=tab, d=_data(page, tab, api))
