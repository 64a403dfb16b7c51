"""Segments: every segment with its members now, a form that builds a rule (or takes one as
JSON or YAML), preview with count and sample, save, and membership over time: all through the
insights API's route functions."""

from __future__ import annotations

import re
from typing import Any

import orjson
import yaml
from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

from kilde.web.dashboard import charts
from kilde.web.dashboard.base import SECURITY_HEADERS, Page, page_route
from kilde.web.dashboard.optional import call, insights
from kilde.web.errors import HttpProblem

router = APIRouter()

ROWS = 4
KINDS = ("computed", "trait", "event", "consent", "segment")
FIELD_OPS: tuple[str, ...] = ("gte", "gt", "lte", "lt", "equals", "not_equals", "in", "not_in")
FIELD_OPS += ("contains", "exists", "within", "before")
COUNT_OPS = ("gte", "gt", "equals", "lte", "lt")
COMPUTED_NAMES = (
    "orders",
    "total_revenue",
    "average_order_value",
    "last_order_at",
    "clv",
    "churn_risk",
    "churn_flag",
    "p_alive",
    "rfm_group",
    "recency_days",
    "frequency",
    "monetary",
    "days_inactive",
    "email_opens",
    "email_clicks",
    "latest_nps",
    "preferred_channel",
    "favourite_categories",
)
_SLUG = re.compile(r"[^a-z0-9]+")


def _value(op: str, raw: str) -> Any:
    text = raw.strip()
    if op in ("in", "not_in"):
        return [_scalar(part) for part in text.split(",") if part.strip()]
    if op == "exists":
        return text.lower() not in ("false", "no", "0")
    if op in ("within", "before"):
        return text
    return _scalar(text)


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _row(page: Page, i: int) -> dict[str, str]:
    return {
        key: page.field(f"c{i}_{key}") for key in ("kind", "name", "op", "value", "within", "not")
    }


def _condition(row: dict[str, str]) -> dict[str, Any] | None:
    kind, name = row["kind"], row["name"]
    if kind not in KINDS or not name:
        return None
    condition: dict[str, Any]
    if kind in ("computed", "trait"):
        op = row["op"] if row["op"] in FIELD_OPS else "equals"
        condition = {kind: name, op: _value(op, row["value"])}
    elif kind == "event":
        condition = {"event": name}
        if row["value"]:
            op = row["op"] if row["op"] in COUNT_OPS else "gte"
            condition["count"] = {op: _scalar(row["value"])}
        if row["within"]:
            condition["within"] = row["within"]
    else:
        condition = {kind: name}
    return {"not": condition} if row["not"] else condition


def rule_from_form(page: Page) -> tuple[dict[str, Any] | None, str]:
    """The rule the form describes: the text box if filled in, else the condition rows."""
    text = page.field("rule_text")
    if text:
        try:
            rule = yaml.safe_load(text)
        except yaml.YAMLError:
            return None, "The rule text is neither JSON nor YAML."
        if not isinstance(rule, dict):
            return None, "A rule is a mapping such as {all: [...]}."
        return rule, ""
    conditions = [c for c in (_condition(_row(page, i)) for i in range(ROWS)) if c]
    if not conditions:
        return None, "Give at least one condition."
    combine = "any" if page.field("combine") == "any" else "all"
    return {combine: conditions}, ""


def _linked(page: Page) -> dict[str, str] | None:
    """A condition handed over in the address by a link from another page (no personal data:
    e.g. "computed rfm_group equals Champions" from the RFM table)."""
    query = page.request.query_params
    row = {key: (query.get(key) or "")[:200] for key in ("kind", "name", "op", "value")}
    if row["kind"] not in KINDS or not row["name"]:
        return None
    return row | {"within": "", "not": ""}


def _unavailable(page: Page) -> Response:
    return page.render("unavailable.html", title="Segments", what="Segments")


def _form_context(page: Page) -> dict[str, Any]:
    plan = page.state.pipeline.plan
    rows = [_row(page, i) for i in range(ROWS)]
    if page.form is None:
        rows[0] = _linked(page) or {
            "kind": "computed",
            "name": "orders",
            "op": "gte",
            "value": "2",
            "within": "",
            "not": "",
        }
    return {
        "rows": rows,
        "kinds": KINDS,
        "field_ops": FIELD_OPS,
        "count_ops": COUNT_OPS,
        "names": {
            "computed": COMPUTED_NAMES,
            "trait": [t.name for t in plan.traits],
            "event": sorted({e.name for e in plan.events if e.name}),
            "consent": [p.id for p in plan.purposes],
        },
        "combine": page.field("combine", "all"),
        "rule_text": page.field("rule_text"),
        "seg_name": page.field("name"),
        "seg_id": page.field("segment_id"),
        "seg_description": page.field("description"),
    }


def _preview(page: Page, api: Any, rule: dict[str, Any]) -> dict[str, Any]:
    sample = 10 if page.user.can("personal") else 0
    result: dict[str, Any] = call(
        api.preview_segment, page.request, api.Preview(rule=rule, sample=sample)
    )
    return result


@page_route(router, "/segments", "aggregate", methods=("GET", "POST"))
def segments_page(page: Page) -> Response:
    api = insights(page.request)
    if api is None:
        return _unavailable(page)
    preview: dict[str, Any] | None = None
    problem = ""
    rule: dict[str, Any] | None = None
    if page.form is not None:
        rule, problem = rule_from_form(page)
        action = page.field("action")
        if action == "save" and not page.user.can("change"):
            raise HttpProblem(
                403,
                "forbidden_for_role",
                f"the role {page.user.role} cannot save segments",
                "ask an analyst or an admin",
            )
        if rule is not None:
            try:
                if action == "save":
                    return _save(page, api, rule)
                preview = _preview(page, api, rule)
            except HttpProblem as exc:
                problem = f"{exc.message}. {exc.fix}"
        if page.is_htmx() and action != "save":
            return page.render("segment_preview.html", preview=preview, problem=problem, rule=rule)
    elif (linked := _linked(page)) is not None:  # a link from another page: preview at once
        rule = {"all": [c for c in [_condition(linked)] if c]}
        try:
            preview = _preview(page, api, rule)
        except HttpProblem as exc:
            problem = f"{exc.message}. {exc.fix}"
    listing = call(api.list_segments, page.request)
    return page.render(
        "segments.html",
        title="Segments",
        segments=listing["segments"],
        preview=preview,
        problem=problem,
        rule=rule,
        **_form_context(page),
    )


def _save(page: Page, api: Any, rule: dict[str, Any]) -> Response:
    name = page.field("name")
    if not name:
        raise HttpProblem(400, "missing_name", "a segment needs a name", "give it a name")
    segment_id = page.field("segment_id") or _SLUG.sub("-", name.lower()).strip("-")[:60]
    body = api.SegmentBody(name=name, description=page.field("description") or None, rule=rule)
    call(api.save_segment, page.request, segment_id, body)
    call(api.refresh_segments, page.request, api.Refresh(segments=[segment_id], insights=False))
    response = RedirectResponse(f"/segments/{segment_id}", status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response


@page_route(router, "/segments/{segment_id}", "aggregate", methods=("GET", "POST"))
def segment_page(page: Page) -> Response:
    api = insights(page.request)
    if api is None:
        return _unavailable(page)
    segment_id = page.request.path_params["segment_id"]
    notice = ""
    if page.form is not None:
        if not page.user.can("change"):
            raise HttpProblem(
                403, "forbidden_for_role", "your role cannot refresh segments", "ask an analyst"
            )
        runs = call(api.refresh_segments, page.request, api.Refresh(segments=[segment_id]))
        run: dict[str, Any] = next(iter(runs.get("segments") or []), {})
        notice = (
            f"Refreshed: {run.get('members', 0)} members, {run.get('entered', 0)} entered, "
            f"{run.get('exited', 0)} left."
        )
    segment = call(api.get_segment, page.request, segment_id)
    members = None
    if page.user.can("personal"):
        members = call(api.segment_members, page.request, segment_id, limit=50, offset=0)
    history = list(reversed(segment.get("history") or []))
    points = [
        (str(h["refreshed_at"])[5:16].replace("T", " "), float(h["members"])) for h in history
    ]
    return page.render(
        "segment.html",
        title=segment["name"],
        s=segment,
        rule_json=orjson.dumps(segment["rule"], option=orjson.OPT_INDENT_2).decode(),
        members=members,
        chart=charts.line(points, f"Members of {segment['name']} after each refresh"),
        history=segment.get("history") or [],
        notice=notice,
    )
