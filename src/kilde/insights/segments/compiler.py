"""Compiling segment rules to Ibis expressions: one boolean per profile.

Every leaf becomes an expression over the profiles (joined with their insight traits), or a
membership test (`profile_id IN (...)`) of a sub-expression over traits, consents or events.
Leaves are never NULL (a missing value makes a comparison false), so `not` is an exact
complement. Values from the rule reach the backend as literals; no SQL text is built.

Names are checked while compiling: an unknown trait, computed trait, event, property, purpose or
segment, or an operator that does not fit the type, raises RuleError with the rule's path.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import reduce
from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.insights.data import with_profiles
from kilde.insights.rfm import GROUPS
from kilde.insights.segments.rules import (
    All,
    AnyOf,
    Compare,
    ConsentCondition,
    EventCondition,
    FieldCondition,
    Not,
    PropertyCondition,
    Rule,
    RuleError,
    SegmentCondition,
    parse_rule,
)
from kilde.plan.models import Plan

# Computed traits a rule may use, with their types. The first group are columns of `profiles`
# (profiles/build.py), the second of `profile_insights` (insights/scores.py).
PROFILE_FIELDS: dict[str, str] = {
    "first_seen": "datetime",
    "last_seen": "datetime",
    "identifiers": "integer",
    "events": "integer",
    "sessions": "integer",
    "page_views": "integer",
    "screen_views": "integer",
    "orders": "integer",
    "total_revenue": "number",
    "average_order_value": "number",
    "last_order_at": "datetime",
    "favourite_categories": "list",
    "channels": "list",
    "email_opens": "integer",
    "email_clicks": "integer",
    "latest_nps": "integer",
    "support_sentiment": "number",
}
INSIGHT_FIELDS: dict[str, str] = {
    "recency_days": "number",
    "frequency": "integer",
    "monetary": "number",
    "r_score": "integer",
    "f_score": "integer",
    "m_score": "integer",
    "rfm_score": "string",
    "rfm_group": "string",
    "expected_purchases": "number",
    "p_alive": "number",
    "expected_spend": "number",
    "clv": "number",
    "churn_risk": "number",
    "churn_flag": "boolean",
    "churn_basis": "string",
    "days_inactive": "number",
    "usual_gap_days": "number",
    "favourite_products": "list",
    "preferred_channel": "string",
    "preferred_time": "string",
    "recommended_products": "list",
}
COMPUTED_FIELDS: dict[str, str] = {**PROFILE_FIELDS, **INSIGHT_FIELDS}
KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "rfm_group": GROUPS,
    "churn_basis": ("model", "inactivity"),
    "preferred_time": ("night", "morning", "afternoon", "evening"),
}

OPS_BY_TYPE: dict[str, set[str]] = {
    "number": {"equals", "not_equals", "gt", "gte", "lt", "lte", "in", "not_in", "exists"},
    "integer": {"equals", "not_equals", "gt", "gte", "lt", "lte", "in", "not_in", "exists"},
    "string": {"equals", "not_equals", "in", "not_in", "contains", "exists"},
    "boolean": {"equals", "not_equals", "exists"},
    "datetime": {"within", "before", "gt", "gte", "lt", "lte", "exists"},
    "list": {"contains", "in", "exists"},
    "array": {"contains", "exists"},
    "object": {"exists"},
}


@dataclass
class Context:
    """What a rule is compiled against."""

    backend: Any
    plan: Plan
    now: datetime
    # Every known segment's rule (the plan's and those saved through the API), by id.
    segments: Mapping[str, Any] = field(default_factory=dict)
    _stack: list[str] = field(default_factory=list)

    def has_table(self, name: str) -> bool:
        try:
            self.backend.table(name)
        except Exception:  # the backends raise different errors for a missing table
            return False
        return True


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(sorted(known)[:40])
    return f"{hint}known: {shown}" if known else "none are declared"


def base_table(ctx: Context) -> ir.Table:
    """profile_id and every computed trait, one row per current profile."""
    profiles = ctx.backend.table("profiles")
    base = profiles.select("profile_id", *PROFILE_FIELDS)
    insights = ctx.backend.table("profile_insights").select("profile_id", *INSIGHT_FIELDS)
    joined: ir.Table = base.left_join(insights, "profile_id").drop("profile_id_right")
    return joined


def compile_rule(rule: Rule | Mapping[str, Any], ctx: Context, base: ir.Table) -> ir.BooleanValue:
    """The rule as a boolean expression over `base` (see `base_table`)."""
    node = parse_rule(rule) if isinstance(rule, Mapping) else rule
    return _compile(node, ctx, base)


def members(rule: Rule | Mapping[str, Any], ctx: Context) -> ir.Table:
    """The profiles a rule selects, with their computed traits."""
    base = base_table(ctx)
    return base.filter(compile_rule(rule, ctx, base))


def check(rule: Rule | Mapping[str, Any], ctx: Context) -> Rule:
    """Parse and compile without running: raises RuleError at the first wrong part."""
    node = parse_rule(rule) if isinstance(rule, Mapping) else rule
    _compile(node, ctx, base_table(ctx))
    return node


def _compile(node: Rule, ctx: Context, base: ir.Table) -> ir.BooleanValue:
    if isinstance(node, All):
        parts = [_compile(child, ctx, base) for child in node.children]
        return reduce(lambda a, b: a & b, parts)
    if isinstance(node, AnyOf):
        parts = [_compile(child, ctx, base) for child in node.children]
        return reduce(lambda a, b: a | b, parts)
    if isinstance(node, Not):
        return ~_compile(node.child, ctx, base)
    if isinstance(node, FieldCondition):
        if node.kind == "computed":
            return _computed(node, ctx, base)
        return _trait(node, ctx, base)
    if isinstance(node, ConsentCondition):
        return _consent(node, ctx, base)
    if isinstance(node, SegmentCondition):
        return _segment(node, ctx, base)
    return _event(node, ctx, base)


# -- computed traits and traits ---------------------------------------------------------------


def _check_op(compare: Compare, kind: str, what: str) -> None:
    allowed = OPS_BY_TYPE[kind]
    if compare.op not in allowed:
        raise RuleError(
            compare.path,
            f"`{compare.op}` does not apply to {what}, which is of type {kind}",
            fix="use one of: " + ", ".join(sorted(allowed)),
        )
    values = compare.value if compare.op in ("in", "not_in") else (compare.value,)
    if compare.op in ("exists", "within", "before"):
        return
    for value in values:
        ok = True
        if kind in ("number", "integer"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif kind in ("string", "list", "array"):
            ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        elif kind == "boolean":
            ok = isinstance(value, bool)
        elif kind == "datetime":
            ok = isinstance(value, str) and _parse_time(value) is not None
        if not ok:
            expected = {
                "datetime": "a date such as 2026-01-31",
                "boolean": "true or false",
                "number": "a number",
                "integer": "a number",
            }.get(kind, "text")
            raise RuleError(compare.path, f"{what} is of type {kind}: compare it with {expected}")


def _parse_time(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        from datetime import UTC

        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _literal(value: Any, kind: str) -> Any:
    if kind == "datetime" and isinstance(value, str):
        return ibis.literal(_parse_time(value))
    if kind in ("number", "integer"):
        return float(value)
    if kind in ("string", "list", "array") and not isinstance(value, str):
        return str(value)
    return value


def _compare(value: ir.Value, compare: Compare, kind: str, now: datetime) -> ir.BooleanValue:
    """The comparison on a column that may be NULL; NULL compares false."""
    op = compare.op
    if op == "exists":
        present: ir.BooleanValue = value.notnull() if compare.value else value.isnull()
        return present
    if kind == "list":
        arr: Any = value
        if op == "contains":
            return arr.contains(_literal(compare.value, kind)).fill_null(False)
        hits = [arr.contains(str(item)) for item in compare.value]
        return reduce(lambda a, b: a | b, hits).fill_null(False)
    v: Any = value
    if op == "within":
        return (v >= ibis.literal(now - timedelta(days=compare.value))).fill_null(False)
    if op == "before":
        return (v < ibis.literal(now - timedelta(days=compare.value))).fill_null(False)
    if op == "contains":
        return v.contains(str(compare.value)).fill_null(False)
    if op in ("in", "not_in"):
        items = [_literal(item, kind) for item in compare.value]
        test = v.isin(items)
        return (test if op == "in" else ~test).fill_null(False)
    operand = _literal(compare.value, kind)
    result: ir.BooleanValue = {
        "equals": lambda: v == operand,
        "not_equals": lambda: v != operand,
        "gt": lambda: v > operand,
        "gte": lambda: v >= operand,
        "lt": lambda: v < operand,
        "lte": lambda: v <= operand,
    }[op]()
    return result.fill_null(False)


def _check_known_values(node: FieldCondition) -> None:
    known = KNOWN_VALUES.get(node.name)
    if not known or node.compare.op not in ("equals", "not_equals", "in", "not_in"):
        return
    values = node.compare.value if node.compare.op in ("in", "not_in") else (node.compare.value,)
    for i, value in enumerate(values):
        if value not in known:
            where = node.compare.path + (f"[{i}]" if node.compare.op in ("in", "not_in") else "")
            raise RuleError(
                where,
                f"{node.name} has no value {value!r}",
                fix="use one of: " + ", ".join(known),
            )


def _computed(node: FieldCondition, ctx: Context, base: ir.Table) -> ir.BooleanValue:
    kind = COMPUTED_FIELDS.get(node.name)
    if kind is None:
        raise RuleError(
            node.path + ".computed",
            f"unknown computed trait {node.name!r}",
            fix=_suggest(node.name, list(COMPUTED_FIELDS)),
        )
    _check_op(node.compare, kind, f"computed trait {node.name!r}")
    _check_known_values(node)
    column = base[node.name]
    if kind == "integer":
        column = column.cast("float64")
    return _compare(column, node.compare, kind, ctx.now)


def _trait(node: FieldCondition, ctx: Context, base: ir.Table) -> ir.BooleanValue:
    spec = next((t for t in ctx.plan.traits if t.name == node.name), None)
    if spec is None:
        raise RuleError(
            node.path + ".trait",
            f"the plan declares no trait {node.name!r}",
            fix=_suggest(node.name, [t.name for t in ctx.plan.traits])
            + "; computed traits go under `computed:`",
        )
    kind: str = spec.type
    _check_op(node.compare, kind, f"trait {node.name!r}")
    traits = ctx.backend.table("profile_traits")
    traits = traits.filter(traits.name == node.name)
    if node.compare.op == "exists":
        test = base.profile_id.isin(traits.profile_id)
        return test if node.compare.value else ~test
    raw: Any = traits.value.cast("json")
    value: Any
    if kind in ("number", "integer"):
        value = raw.float
    elif kind == "boolean":
        value = raw.bool
    elif kind == "datetime":
        value = raw.str.try_cast("timestamp('UTC')")
    elif kind == "array":
        value = raw.unwrap_as("array<string>")
        kind = "list"
    else:
        value = raw.str
    matched = traits.filter(_compare(value, node.compare, kind, ctx.now))
    return base.profile_id.isin(matched.profile_id)


# -- consent and other segments -----------------------------------------------------------------


def _consent(node: ConsentCondition, ctx: Context, base: ir.Table) -> ir.BooleanValue:
    purpose = ctx.plan.purpose(node.purpose)
    if purpose is None:
        raise RuleError(
            node.path + ".consent",
            f"the plan declares no purpose {node.purpose!r}",
            fix=_suggest(node.purpose, [p.id for p in ctx.plan.purposes]),
        )
    needs_consent = purpose.legal_basis == "consent"
    if not ctx.has_table("consent_ledger"):
        return ibis.literal(not needs_consent)
    latest = latest_consent(ctx.backend, node.purpose)
    if needs_consent:
        granted = latest.filter(latest.state == "granted")
        return base.profile_id.isin(granted.profile_id)
    # Another legal basis: it holds unless the person objected (denied or withdrew).
    objected = latest.filter(latest.state != "granted")
    return ~base.profile_id.isin(objected.profile_id)


def latest_consent(backend: Any, purpose: str) -> ir.Table:
    """profile_id, state: each profile's latest consent choice for a purpose."""
    ledger = backend.table("consent_ledger")
    ledger = ledger.filter(ledger.purpose == purpose)
    idmap = backend.table("identity_map")
    parts = []
    for column, id_type in (("user_id", "user_id"), ("anonymous_id", "anonymous_id")):
        ids = idmap.filter(idmap.id_type == id_type).select("profile_id", id_value=idmap.id_value)
        mine = ledger.filter(ledger[column].notnull())
        joined = mine.join(ids, mine[column] == ids.id_value)
        parts.append(joined.select("profile_id", "state", "decided_at", "seq"))
    rows = parts[0].union(parts[1], distinct=True)
    ranked = rows.mutate(
        _rn=ibis.row_number().over(
            group_by=rows.profile_id, order_by=[ibis.desc(rows.decided_at), ibis.desc(rows.seq)]
        )
    )
    latest: ir.Table = ranked.filter(ranked._rn == 0).select("profile_id", "state")
    return latest


def _segment(node: SegmentCondition, ctx: Context, base: ir.Table) -> ir.BooleanValue:
    rule = ctx.segments.get(node.segment)
    if rule is None:
        raise RuleError(
            node.path + ".segment",
            f"there is no segment {node.segment!r}",
            fix=_suggest(node.segment, list(ctx.segments)),
        )
    if node.segment in ctx._stack:
        chain = " -> ".join([*ctx._stack, node.segment])
        raise RuleError(
            node.path + ".segment",
            f"segments refer to each other in a circle ({chain})",
            fix="one of them must not depend on the other",
        )
    ctx._stack.append(node.segment)
    try:
        try:
            inner = parse_rule(rule, f"segment {node.segment}")
        except RuleError as exc:
            raise RuleError(
                node.path + ".segment", f"segment {node.segment!r} is broken: {exc.message}"
            ) from None
        return _compile(inner, ctx, base)
    finally:
        ctx._stack.pop()


# -- behaviour ---------------------------------------------------------------------------------


def _event_spec(node: EventCondition, ctx: Context) -> dict[str, Any] | None:
    spec = next((e for e in ctx.plan.events if e.type == "track" and e.name == node.event), None)
    if spec is None:
        names = [e.name for e in ctx.plan.events if e.type == "track" and e.name]
        raise RuleError(
            node.path + ".event",
            f"the plan declares no event {node.event!r}",
            fix=_suggest(node.event, names),
        )
    return spec.properties


def _schema_type(schema: dict[str, Any] | None, prop: PropertyCondition) -> str | None:
    """The JSON Schema type of a property path, None when the schema does not say."""
    node: Any = schema
    steps: list[tuple[str, bool]] = [(p, p == prop.each) for p in prop.parts]
    steps += [(p, False) for p in prop.rest]
    for name, is_array in steps:
        if not isinstance(node, dict):
            return None
        props = node.get("properties")
        if not isinstance(props, dict):
            return None  # the schema does not list properties: anything goes
        if name not in props:
            raise RuleError(
                prop.path + ".property",
                f"the event has no property {name!r} in the plan",
                fix=_suggest(name, list(props)),
            )
        node = props[name]
        if is_array:
            if not isinstance(node, dict) or node.get("type") != "array":
                raise RuleError(
                    prop.path + ".property", f"{name!r} is not a list, so `[]` does not apply"
                )
            node = node.get("items")
    if not isinstance(node, dict):
        return None
    kind = node.get("type")
    return kind if isinstance(kind, str) else None


def _value_kind(compare: Compare) -> str:
    value = compare.value[0] if compare.op in ("in", "not_in") else compare.value
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string"


def _property(
    node: PropertyCondition, props: Any, schema: dict[str, Any] | None, now: datetime
) -> Any:
    declared = _schema_type(schema, node)
    if declared is None and node.compare.op == "exists":
        kind = "string"
    else:
        kind = declared or _value_kind(node.compare)
    kind = {"integer": "number"}.get(kind, kind)
    if kind in ("object", "array") or kind not in OPS_BY_TYPE:
        kind = "object"
    _check_op(node.compare, kind, f"property {node.property!r}")

    def typed(value: Any) -> Any:
        if kind == "number":
            return value.float
        if kind == "boolean":
            return value.bool
        if kind == "object":
            return value
        return value.str

    def at(value: Any, parts: tuple[str, ...]) -> Any:
        for part in parts:
            value = value[part]
        return value

    if node.each is None:
        return _compare(typed(at(props, node.parts)), node.compare, kind, now)
    return _Each(node, kind, typed, at)


@dataclass
class _Each:
    """A condition on the elements of an array property: some element matches."""

    node: PropertyCondition
    kind: str
    typed: Callable[[Any], Any]
    at: Callable[[Any, tuple[str, ...]], Any]

    def apply(self, ev: ir.Table, now: datetime) -> ir.Table:
        node = self.node
        negative = node.compare.op in ("not_equals", "not_in")
        positive = node.compare
        if negative:
            op = "equals" if positive.op == "not_equals" else "in"
            positive = Compare(op, positive.value, positive.path)  # type: ignore[arg-type]
        items = ev.select(
            "source",
            "message_id",
            item=self.at(ev.properties.cast("json"), node.parts).array.unnest(),
        )
        value = self.typed(self.at(items.item, node.rest))
        if positive.op == "exists":
            test = value.notnull()
            negative = negative or not positive.value
        else:
            test = _compare(value, positive, self.kind, now)
        hits = items.filter(test).select("source", "message_id").distinct()
        keys = ["source", "message_id"]
        return ev.anti_join(hits, keys) if negative else ev.semi_join(hits, keys)


def _count_test(compare: Compare) -> Callable[[Any], Any]:
    n = compare.value
    return {
        "equals": lambda c: c == n,
        "gt": lambda c: c > n,
        "gte": lambda c: c >= n,
        "lt": lambda c: c < n,
        "lte": lambda c: c <= n,
    }[compare.op]


def _holds_for_zero(compare: Compare) -> bool:
    test = _count_test(compare)
    return bool(test(0))


def event_rows(node: EventCondition, ctx: Context, events: ir.Table | None = None) -> ir.Table:
    """The profile events an event condition is about: name, time window and `where`.

    From `events` when given (events with their profile_id, shared by several conditions),
    otherwise from the events table, joined to the profiles after the filters.
    """
    if events is not None:
        return event_matches(node, ctx, events)
    return with_profiles(ctx.backend, event_matches(node, ctx))


def event_matches(node: EventCondition, ctx: Context, events: ir.Table | None = None) -> ir.Table:
    """The rows of `events` (by default the events table) an event condition is about.

    The name and the time window narrow the events before the `where` conditions (which read
    the JSON properties) and before any join to the profiles.
    """
    schema = _event_spec(node, ctx)
    ev = ctx.backend.table("events") if events is None else events
    ev = ev.filter(ev.event == node.event)
    if node.window is not None:
        start = ctx.now - timedelta(days=node.window.start_days)
        end = ctx.now - timedelta(days=node.window.end_days)
        ev = ev.filter((ev.timestamp >= ibis.literal(start)) & (ev.timestamp <= ibis.literal(end)))
    for condition in node.where:
        test = _property(condition, ev.properties.cast("json"), schema, ctx.now)
        ev = test.apply(ev, ctx.now) if isinstance(test, _Each) else ev.filter(test)
    return ev


def _event(node: EventCondition, ctx: Context, base: ir.Table) -> ir.BooleanValue:
    schema = _event_spec(node, ctx)
    ev = event_rows(node, ctx)
    props = ev.properties.cast("json")
    if node.total is not None:
        prop_path, compare = node.total
        head = PropertyCondition(
            compare.path,
            prop_path,
            tuple(prop_path.split(".")),
            None,
            (),
            Compare("exists", True, compare.path),
        )
        kind = _schema_type(schema, head)
        if kind not in (None, "number", "integer"):
            raise RuleError(compare.path, f"`sum` needs a number property; {prop_path!r} is {kind}")
        value: Any = props
        for part in head.parts:
            value = value[part]
        per = ev.group_by("profile_id").aggregate(total=value.float.sum())
        test = _count_test(compare)
        if test(0):
            failing = per.filter(~test(per.total.fill_null(0.0)))
            return ~base.profile_id.isin(failing.profile_id)
        return base.profile_id.isin(per.filter(test(per.total.fill_null(0.0))).profile_id)
    count = node.count
    test = _count_test(count)
    if count.op == "gte" and count.value == 1:
        return base.profile_id.isin(ev.profile_id)
    if count.op == "equals" and count.value == 0:
        return ~base.profile_id.isin(ev.profile_id)
    per = ev.group_by("profile_id").aggregate(n=ev.count())
    if _holds_for_zero(count):
        return ~base.profile_id.isin(per.filter(~test(per.n)).profile_id)
    return base.profile_id.isin(per.filter(test(per.n)).profile_id)
