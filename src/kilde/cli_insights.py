"""`kilde segment ...` and `kilde insights ...`: audiences and what the data says.

Every command prints a readable table; `--csv` prints CSV and `--json` the API's answer.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from kilde.cli_common import (
    DataOpt,
    JsonOpt,
    PlanOpt,
    TokenOpt,
    console,
    fail,
    print_json,
    settings_from,
)
from kilde.client import Client
from kilde.errors import KildeError

segment_app = typer.Typer(
    help="Segments (audiences): preview a rule, list, refresh, see members.", no_args_is_help=True
)
insights_app = typer.Typer(
    help="Insights: RFM, lifetime value, churn, funnels, retention, attribution, campaigns.",
    no_args_is_help=True,
)
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table")]


def register(app: typer.Typer) -> None:
    app.add_typer(segment_app, name="segment")
    app.add_typer(insights_app, name="insights")


def _client(data: Path | None, plan: Path | None, token: str | None) -> Client:
    return Client(settings_from(data, plan), token)


def _call(data: Path | None, plan: Path | None, token: str | None, *requests: Any) -> list[Any]:
    """Run (method, path, kwargs) requests against the server; exit 1 with the fix on errors."""
    try:
        with _client(data, plan, token) as client:
            return [client.request(method, path, **kwargs) for method, path, kwargs in requests]
    except KildeError as exc:
        fail(exc)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def emit(
    rows: list[dict[str, Any]],
    columns: list[str],
    *,
    title: str,
    as_csv: bool,
    as_json: bool,
    raw: Any,
    empty: str = "(none)",
) -> None:
    if as_json:
        print_json(raw)
        return
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else _csv_value(row.get(c)) for c in columns])
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)
    if not rows:
        console.print(empty)


def _csv_value(value: Any) -> Any:
    return "|".join(str(v) for v in value) if isinstance(value, list) else value


def read_rule(text: str) -> Any:
    """A rule as YAML or JSON text, `@FILE`, or `-` for standard input."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise KildeError(
                f"cannot read the rule file {text[1:]!r} ({exc.strerror})",
                fix="give the path of a YAML or JSON file after @",
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "it cannot be read"
        raise KildeError(
            f"the rule is not valid YAML or JSON{where}: {problem} (are brackets balanced?)",
            fix="close every { and [ you open; for example "
            "'{all: [{computed: orders, gte: 2}, {consent: marketing_email}]}'",
        ) from None


RuleArg = Annotated[
    str,
    typer.Argument(help="The rule as YAML or JSON, @FILE, or - for standard input"),
]
WHY = ["profile_id", "rfm_group", "clv", "churn_risk", "orders", "total_revenue"]


# -- segments ------------------------------------------------------------------------------------


@segment_app.command("preview")
def segment_preview(
    rule: RuleArg,
    sample: Annotated[int, typer.Option(help="How many profiles to show")] = 10,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """How many profiles a rule selects now, with a sample and why (RFM, CLV, churn)."""
    try:
        parsed = read_rule(rule)
    except KildeError as exc:
        fail(exc)
    (found,) = _call(
        data,
        plan,
        token,
        ("POST", "/api/segments/preview", {"json": {"rule": parsed, "sample": sample}}),
    )
    if not json and not as_csv:
        console.print(
            f"[bold]{found['count']}[/] of {found['profiles']} profiles "
            f"({100 * found['share']:.1f}%) match"
        )
    emit(
        found["sample"],
        WHY,
        title="Sample",
        as_csv=as_csv,
        as_json=json,
        raw=found,
        empty="(the segment is empty)",
    )


@segment_app.command("list")
def segment_list(
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Every segment with its members now and when it was last refreshed."""
    (found,) = _call(data, plan, token, ("GET", "/api/segments", {}))
    rows = [
        {
            **s,
            "refreshed": (s.get("last_run") or {}).get("refreshed_at", "")[:19],
        }
        for s in found["segments"]
    ]
    emit(
        rows,
        ["id", "name", "origin", "members", "refreshed"],
        title="Segments",
        as_csv=as_csv,
        as_json=json,
        raw=found,
        empty="(no segments: define some in the plan)",
    )


@segment_app.command("members")
def segment_members(
    segment_id: Annotated[str, typer.Argument(help="The segment's id")],
    limit: Annotated[int, typer.Option(help="How many, highest lifetime value first")] = 50,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Who is in a segment, since when, and why: RFM group, CLV, churn risk."""
    (found,) = _call(
        data,
        plan,
        token,
        ("GET", f"/api/segments/{segment_id}/members", {"params": {"limit": limit}}),
    )
    emit(
        found["members"],
        ["profile_id", "entered_at", *WHY[1:]],
        title=f"{found['total']} members of {segment_id}",
        as_csv=as_csv,
        as_json=json,
        raw=found,
        empty="(the segment is empty)",
    )


@segment_app.command("show")
def segment_show(
    segment_id: Annotated[str, typer.Argument(help="The segment's id")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """A segment's rule, its members now and its membership over time."""
    (found,) = _call(data, plan, token, ("GET", f"/api/segments/{segment_id}", {}))
    if json:
        print_json(found)
        return
    console.print(f"[bold]{found['name']}[/] ({found['id']}, from the {found['origin']})")
    if found.get("description"):
        console.print(found["description"])
    console.print(yaml.safe_dump(found["rule"], sort_keys=False, allow_unicode=True).rstrip())
    console.print(f"members now: [bold]{found['members']}[/]")
    emit(
        found["history"],
        ["refreshed_at", "members", "entered", "exited", "error"],
        title="Refreshes",
        as_csv=False,
        as_json=False,
        raw=found,
        empty="(never refreshed)",
    )


@segment_app.command("refresh")
def segment_refresh(
    segment_ids: Annotated[
        list[str] | None, typer.Argument(help="Segments to refresh (default: all)")
    ] = None,
    insights: Annotated[bool, typer.Option(help="Recompute RFM, CLV and churn first")] = True,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Re-evaluate segments now; who entered and left gets Segment Entered/Exited events."""
    body = {"segments": segment_ids or None, "insights": insights}
    with console.status("refreshing segments"):
        (found,) = _call(data, plan, token, ("POST", "/api/segments/refresh", {"json": body}))
    emit(
        found["segments"],
        ["segment_id", "members", "entered", "exited", "events", "note", "error"],
        title="Refreshed",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


@segment_app.command("save")
def segment_save(
    segment_id: Annotated[str, typer.Argument(help="Id: lower-case letters, digits, - and _")],
    rule: RuleArg,
    name: Annotated[str, typer.Option(help="A name people understand")] = "",
    description: Annotated[str | None, typer.Option(help="What it is for")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Save a segment through the API (segments in the plan are edited in the plan)."""
    try:
        parsed = read_rule(rule)
    except KildeError as exc:
        fail(exc)
    body = {"name": name or segment_id, "description": description, "rule": parsed}
    _call(data, plan, token, ("PUT", f"/api/segments/{segment_id}", {"json": body}))
    console.print(f"[green]saved[/] segment {segment_id}; `kilde segment refresh {segment_id}`")


@segment_app.command("delete")
def segment_delete(
    segment_id: Annotated[str, typer.Argument(help="The segment's id")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a segment saved through the API; its members leave it."""
    _call(data, plan, token, ("DELETE", f"/api/segments/{segment_id}", {}))
    console.print(f"deleted segment {segment_id}")


# -- insights ------------------------------------------------------------------------------------


@insights_app.command("refresh")
def insights_refresh(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Recompute every profile's RFM, CLV, churn and preferences, then every segment."""
    with console.status("computing insights"):
        (found,) = _call(data, plan, token, ("POST", "/api/insights/refresh", {}))
    if json:
        print_json(found)
        return
    models = found["models"]
    console.print(
        f"[green]insights computed[/] for {models['profiles_with_orders']} customers with "
        f"orders in {models['seconds']:.1f} s"
    )
    if models.get("problem"):
        console.print(f"[yellow]lifetime value:[/] {models['problem']}")
    for run in found["segments"]:
        if "error" in run:
            console.print(f"  {run['segment_id']}: [red]{run['error']}[/]")
        else:
            console.print(
                f"  {run['segment_id']}: {run['members']} members "
                f"(+{run['entered']} -{run['exited']})"
            )


@insights_app.command("rfm")
def insights_rfm(
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Customers per RFM group (Champions, Loyal, At risk, ...): how many, spend, CLV."""
    (found,) = _call(data, plan, token, ("GET", "/api/insights/rfm", {}))
    emit(
        found["groups"],
        ["rfm_group", "customers", "share", "revenue", "avg_recency_days", "avg_orders", "avg_clv"],
        title=f"RFM groups of {found['customers']} customers",
        as_csv=as_csv,
        as_json=json,
        raw=found,
        empty="(no customers with orders yet; run `kilde insights refresh`)",
    )


@insights_app.command("clv")
def insights_clv(
    top: Annotated[int, typer.Option(help="How many of the most valuable to list")] = 10,
    cdnow: Annotated[
        Path | None,
        typer.Option(help="Validate on the CDNOW data in this folder instead (no server needed)"),
    ] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Customer lifetime value (BG/NBD + Gamma-Gamma): the fit and the top customers."""
    if cdnow is not None:
        _cdnow(cdnow, json, as_csv)
        return
    (found,) = _call(data, plan, token, ("GET", "/api/insights/clv", {"params": {"top": top}}))
    models = found.get("models") or {}
    if not json and not as_csv:
        if models.get("bgnbd"):
            fit = models["bgnbd"]
            console.print(
                f"BG/NBD on {fit['customers']} customers: r={fit['r']:.4g} "
                f"alpha={fit['alpha']:.4g} a={fit['a']:.4g} b={fit['b']:.4g}, "
                f"log-likelihood {fit['log_likelihood']:.1f}"
                + (" (regularised: customers look alike)" if fit.get("regularised") else "")
            )
        if models.get("problem"):
            console.print(f"[yellow]{models['problem']}[/]")
        if not models:
            console.print("no lifetime values yet: run `kilde insights refresh`")
    emit(
        found["top"],
        ["profile_id", "clv", "expected_purchases", "expected_spend", "p_alive", "rfm_group"],
        title=f"Highest lifetime value (next {models.get('horizon_weeks', 52):g} weeks)",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


def _cdnow(directory: Path, json: bool, as_csv: bool) -> None:
    from kilde.insights.clv import cdnow_validation

    try:
        report = cdnow_validation(directory)
    except FileNotFoundError:
        fail(
            KildeError(
                f"no CDNOW_sample.txt in {directory}", fix="point --cdnow at the CDNOW data folder"
            )
        )
    except KildeError as exc:
        fail(exc)
    rows = [
        {"model": model, "parameter": name, **values}
        for model in ("bgnbd", "gamma_gamma")
        for name, values in report[model].items()
    ]
    if not json and not as_csv:
        console.print(
            f"CDNOW sample: {report['customers']} customers, calibration {report['calibration']}"
        )
        console.print(
            f"log-likelihood {report['log_likelihood']} (published "
            f"{report['published_log_likelihood']}); holdout {report['holdout']}: forecast "
            f"{report['holdout_forecast']} repeat purchases, actual {report['holdout_actual']}"
        )
    emit(
        rows,
        ["model", "parameter", "fitted", "published", "difference_percent"],
        title="Fitted against published",
        as_csv=as_csv,
        as_json=json,
        raw=report,
    )


@insights_app.command("churn")
def insights_churn(
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Who is about to leave: model risk for buyers, the inactivity flag for everyone."""
    (found,) = _call(data, plan, token, ("GET", "/api/insights/churn", {}))
    if not json and not as_csv:
        emit(
            found["by_basis"],
            ["churn_basis", "profiles", "flagged", "avg_risk"],
            title="Churn by basis",
            as_csv=False,
            as_json=False,
            raw=found,
        )
        console.print(f"lifetime value of customers at high risk: {found['clv_of_high_risk']:,.2f}")
    emit(
        found["risk_bands"],
        ["risk", "customers"],
        title="Buyers by churn risk",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


@insights_app.command("preferences")
def insights_preferences(
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Preferred channels and times of day; products bought together."""
    (found,) = _call(data, plan, token, ("GET", "/api/insights/preferences", {}))
    if not json and not as_csv:
        for key in ("preferred_channel", "preferred_time"):
            emit(
                found[key],
                ["value", "profiles"],
                title=key.replace("_", " "),
                as_csv=False,
                as_json=False,
                raw=found,
            )
    emit(
        found["bought_together"],
        ["product", "with_product", "orders", "confidence", "lift"],
        title="Bought together",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


@insights_app.command("funnel")
def insights_funnel(
    steps: Annotated[list[str], typer.Argument(help="Event names in order (2 or more)")],
    within: Annotated[str, typer.Option(help="Time from step 1 to the last step")] = "7 days",
    since: Annotated[str, typer.Option(help="People who began in this period")] = "90 days",
    segment: Annotated[str | None, typer.Option(help="Only members of this segment")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Ordered steps within a time window: people, conversion and drop-off per step.

    A step may be an event name or YAML such as '{event: Product Viewed, where: [{property:
    category, equals: tents}]}'.
    """
    parsed: list[Any] = []
    for step in steps:
        parsed.append(read_rule(step) if step.lstrip().startswith("{") else step)
    body = {"steps": parsed, "within": within, "since": since, "segment": segment}
    (found,) = _call(data, plan, token, ("POST", "/api/insights/funnel", {"json": body}))
    emit(
        found["steps"],
        [
            "step",
            "event",
            "profiles",
            "conversion_from_previous",
            "conversion_from_start",
            "drop_off",
        ],
        title=f"Funnel: {found['entered']} entered, {found['completed']} completed",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


@insights_app.command("retention")
def insights_retention(
    period: Annotated[str, typer.Option(help="week or month")] = "week",
    periods: Annotated[int, typer.Option(help="How many periods")] = 12,
    cohort: Annotated[str, typer.Option(help="first_seen or first_order")] = "first_seen",
    activity: Annotated[str, typer.Option(help="any or orders")] = "any",
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Cohorts by week or month: the share still active in each period after the first."""
    params = {"period": period, "periods": periods, "cohort": cohort, "activity": activity}
    (found,) = _call(data, plan, token, ("GET", "/api/insights/retention", {"params": params}))
    columns = ["cohort", "size", *(f"{period[0]}{k}" for k in range(periods))]
    rows = []
    for c in found["cohorts"]:
        row: dict[str, Any] = {"cohort": c["cohort"], "size": c["size"]}
        for k, share in enumerate(c["retention"]):
            row[f"{period[0]}{k}"] = (
                None if share is None else (share if as_csv else f"{100 * share:.0f}%")
            )
        rows.append(row)
    emit(
        rows,
        columns,
        title=f"Retention by {cohort.replace('_', ' ')} {period}",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


@insights_app.command("attribution")
def insights_attribution(
    model: Annotated[str, typer.Option(help="first_touch, last_touch or linear")] = "last_touch",
    conversion: Annotated[str, typer.Option(help="order or signup")] = "order",
    lookback: Annotated[str, typer.Option(help="Touches this long before count")] = "30 days",
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Orders or signups per UTM source/medium/campaign, and which brings the best customers."""
    params = {"model": model, "conversion": conversion, "lookback": lookback}
    (found,) = _call(data, plan, token, ("GET", "/api/insights/attribution", {"params": params}))
    if not json and not as_csv:
        emit(
            found["channels"],
            ["utm_source", "utm_medium", "utm_campaign", "conversions", "value"],
            title=f"{found['conversions']} {conversion}s by {model.replace('_', ' ')}",
            as_csv=False,
            as_json=False,
            raw=found,
        )
    emit(
        found["customers"],
        [
            "utm_source",
            "utm_medium",
            "utm_campaign",
            "customers",
            "avg_orders",
            "avg_revenue",
            "avg_clv",
            "best_share",
        ],
        title="Customers by the campaign that first brought them (best first)",
        as_csv=as_csv,
        as_json=json,
        raw=found,
    )


@insights_app.command("campaign")
def insights_campaign(
    window: Annotated[str, typer.Option(help="Orders this long after a click count")] = "7 days",
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """Email campaigns: sent, human and machine opens, clicks, click-to-open, orders after."""
    (found,) = _call(
        data, plan, token, ("GET", "/api/insights/campaigns", {"params": {"window": window}})
    )
    emit(
        found["campaigns"],
        [
            "campaign",
            "sent",
            "human_opens",
            "machine_opens",
            "clicks",
            "click_to_open",
            "orders_after_click",
            "revenue_after_click",
        ],
        title="Email campaigns",
        as_csv=as_csv,
        as_json=json,
        raw=found,
        empty="(no tracked email campaigns yet)",
    )


@insights_app.command("trends")
def insights_trends(
    period: Annotated[str, typer.Option(help="week or month")] = "week",
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """NPS and support sentiment per week or month."""
    (found,) = _call(
        data, plan, token, ("GET", "/api/insights/trends", {"params": {"period": period}})
    )
    rows = [
        {
            "period": s["period"],
            "nps_responses": (s.get("nps") or {}).get("responses"),
            "nps": (s.get("nps") or {}).get("nps"),
            "support_contacts": (s.get("sentiment") or {}).get("contacts"),
            "avg_sentiment": (s.get("sentiment") or {}).get("average"),
            "negative_share": (s.get("sentiment") or {}).get("negative_share"),
        }
        for s in found["series"]
    ]
    emit(
        rows,
        ["period", "nps_responses", "nps", "support_contacts", "avg_sentiment", "negative_share"],
        title="Survey and sentiment trends",
        as_csv=as_csv,
        as_json=json,
        raw=found,
        empty="(no survey answers or support contacts yet)",
    )
