"""The segment rule language: what a rule may say, parsed into small typed nodes.

A rule is a mapping (YAML or JSON) with exactly one of these keys at each level:

- `all: [rule, ...]`, `any: [rule, ...]`, `not: rule` — nesting, as deep as needed;
- `trait: NAME` with one operator — a trait from the plan (the winner of its candidates);
- `computed: NAME` with one operator — a computed trait (orders, clv, churn_risk, rfm_group, ...);
- `consent: PURPOSE` — the person's current consent for a purpose is granted;
- `segment: ID` — the person is in another segment (evaluated with it, never stale);
- `event: NAME` with optional `where`, `count`, `sum`, `within` or `window` — behaviour.

Operators: equals, not_equals, gt, gte, lt, lte, in, not_in, contains, exists, within
("30 days": a date at most that long ago), before ("90 days": a date longer ago than that).

This module checks the shape of a rule and needs nothing else; the compiler checks the names
against the plan and the computed traits. Every error carries the path of the rule part it is
about (`all[1].event.where[0].gt`), never a value from the data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kilde.errors import KildeError

Op = Literal[
    "equals",
    "not_equals",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "exists",
    "within",
    "before",
]
OPERATORS: tuple[str, ...] = (
    "equals",
    "not_equals",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "exists",
    "within",
    "before",
)
COUNT_OPERATORS = ("equals", "gt", "gte", "lt", "lte")
KINDS = ("all", "any", "not", "trait", "computed", "consent", "segment", "event")
MAX_DEPTH = 32
MAX_DAYS = 36_500  # a hundred years: anything longer is a typo
_DURATION = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|second|seconds|min|minute|minutes|h|hour|hours|d|day|days|"
    r"w|week|weeks|m|month|months|y|year|years)"
    r"(?:\s+ago)?\s*$"
)
_DAYS = {"s": 1 / 86400, "h": 1 / 24, "d": 1, "w": 7, "m": 30, "y": 365}


class RuleError(KildeError):
    """A segment rule that cannot be used; `path` points at the part that is wrong."""

    def __init__(self, path: str, message: str, fix: str | None = None) -> None:
        self.path = path or "(rule)"
        super().__init__(f"{self.path}: {message}", fix=fix)
        self.detail = message


@dataclass(frozen=True)
class Node:
    path: str


@dataclass(frozen=True)
class All(Node):
    children: tuple[Rule, ...]


@dataclass(frozen=True)
class AnyOf(Node):
    children: tuple[Rule, ...]


@dataclass(frozen=True)
class Not(Node):
    child: Rule


@dataclass(frozen=True)
class Compare:
    """One operator and its operand; `path` points at the operator."""

    op: Op
    value: Any
    path: str


@dataclass(frozen=True)
class FieldCondition(Node):
    kind: Literal["trait", "computed"]
    name: str
    compare: Compare


@dataclass(frozen=True)
class ConsentCondition(Node):
    purpose: str


@dataclass(frozen=True)
class SegmentCondition(Node):
    segment: str


@dataclass(frozen=True)
class PropertyCondition(Node):
    """`products[].category` tests every element of the products array (any may match)."""

    property: str
    parts: tuple[str, ...]
    each: str | None  # the array part, when the path has `[]`
    rest: tuple[str, ...]
    compare: Compare


@dataclass(frozen=True)
class Window:
    """From `start_days` ago up to `end_days` ago (0: now)."""

    start_days: float
    end_days: float = 0.0


@dataclass(frozen=True)
class EventCondition(Node):
    event: str
    where: tuple[PropertyCondition, ...] = ()
    count: Compare = field(default_factory=lambda: Compare("gte", 1, ""))
    total: tuple[str, Compare] | None = None  # (property, comparison) on the sum
    window: Window | None = None


Rule = All | AnyOf | Not | FieldCondition | ConsentCondition | SegmentCondition | EventCondition


def duration_days(text: Any, path: str) -> float:
    """'30 days', '12 weeks', '6 months', '24 hours' or a number of days -> days."""
    if isinstance(text, bool):
        raise RuleError(path, "a duration must be text like '30 days'", fix=_DURATION_FIX)
    if isinstance(text, int | float):
        days = float(text)
    elif isinstance(text, str) and (match := _DURATION.match(text.lower())):
        unit = match.group(2)
        days = float(match.group(1)) * (1 / 1440 if unit.startswith("min") else _DAYS[unit[0]])
    else:
        raise RuleError(path, "this duration is not understood", fix=_DURATION_FIX)
    if days <= 0:
        raise RuleError(path, "a time window must be longer than zero", fix=_DURATION_FIX)
    if days > MAX_DAYS:
        raise RuleError(path, "a time window longer than 100 years is impossible", _DURATION_FIX)
    return days


_DURATION_FIX = "write a number and a unit, for example '30 days', '12 weeks' or '6 months'"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def parse_rule(data: Any, path: str = "") -> Rule:
    """Check the shape of a rule and turn it into nodes; raises RuleError with the path."""
    return _parse(data, path, 0)


def _parse(data: Any, path: str, depth: int) -> Rule:
    if depth > MAX_DEPTH:
        raise RuleError(path, f"the rule nests deeper than {MAX_DEPTH} levels", fix=_SHAPE_FIX)
    if not isinstance(data, dict):
        raise RuleError(
            path,
            "a rule must be a mapping such as {all: [...]} or {computed: orders, gte: 2}",
            fix=_SHAPE_FIX,
        )
    kinds = [k for k in data if k in KINDS]
    if not kinds:
        unknown = next(iter(data), None)
        if unknown is None:
            raise RuleError(path, "the rule is empty", fix=_SHAPE_FIX)
        raise RuleError(_join(path, str(unknown)), f"unknown rule key {unknown!r}", _SHAPE_FIX)
    if len(kinds) > 1:
        raise RuleError(
            path,
            f"one rule part says both {kinds[0]!r} and {kinds[1]!r}; nesting is unbalanced",
            fix="wrap the parts in `all: [...]` or `any: [...]`, one condition per list item",
        )
    kind = kinds[0]
    here = _join(path, kind)
    if kind in ("all", "any"):
        _only(data, {kind}, path)
        children = data[kind]
        if not isinstance(children, list) or not children:
            raise RuleError(
                here, f"`{kind}` needs a non-empty list of rules", fix=f"write {kind}: [rule, ...]"
            )
        parsed = tuple(_parse(child, _join(here, i), depth + 1) for i, child in enumerate(children))
        return All(path, parsed) if kind == "all" else AnyOf(path, parsed)
    if kind == "not":
        _only(data, {"not"}, path)
        if isinstance(data["not"], list):
            raise RuleError(
                here, "`not` takes one rule, not a list", fix="write not: {any: [...]} for several"
            )
        return Not(path, _parse(data["not"], here, depth + 1))
    if kind in ("trait", "computed"):
        name = _name(data[kind], here)
        compare = _one_compare(data, {kind}, path)
        return FieldCondition(path, kind, name, compare)  # type: ignore[arg-type]
    if kind == "consent":
        _only(data, {"consent"}, path)
        return ConsentCondition(path, _name(data["consent"], here))
    if kind == "segment":
        _only(data, {"segment"}, path)
        return SegmentCondition(path, _name(data["segment"], here))
    return _event(data, path)


_SHAPE_FIX = (
    "each part has one of: all, any, not, trait, computed, consent, segment, event "
    "(see docs/insights-segments.md)"
)


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RuleError(path, "this must be a name (text)", fix="write the name as text")
    return value.strip()


def _only(data: dict[str, Any], allowed: set[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            raise RuleError(
                _join(path, str(key)),
                f"{key!r} does not belong here",
                fix="allowed here: " + ", ".join(sorted(allowed)),
            )


def _one_compare(data: dict[str, Any], kind_keys: set[str], path: str) -> Compare:
    ops = [k for k in data if k not in kind_keys]
    for key in ops:
        if key not in OPERATORS:
            raise RuleError(
                _join(path, str(key)),
                f"unknown operator {key!r}",
                fix="use one of: " + ", ".join(OPERATORS),
            )
    if len(ops) != 1:
        raise RuleError(
            path,
            "a condition needs exactly one operator" + ("" if ops else " (none given)"),
            fix="for example {computed: orders, gte: 2}; combine several with `all`",
        )
    op = ops[0]
    return _compare(op, data[op], _join(path, op))


def _compare(op: str, value: Any, path: str) -> Compare:
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not value:
            raise RuleError(path, f"`{op}` needs a non-empty list", fix=f"write {op}: [a, b]")
        for i, item in enumerate(value):
            if not _scalar(item):
                raise RuleError(_join(path, i), "list items must be text, numbers or booleans")
        return Compare(op, tuple(value), path)  # type: ignore[arg-type]
    if op == "exists":
        if not isinstance(value, bool):
            raise RuleError(path, "`exists` takes true or false", fix="write exists: true")
        return Compare("exists", value, path)
    if op in ("within", "before"):
        return Compare(op, duration_days(value, path), path)  # type: ignore[arg-type]
    if not _scalar(value):
        raise RuleError(path, f"`{op}` needs a single value (text, number or boolean)")
    if op in ("gt", "gte", "lt", "lte") and isinstance(value, bool):
        raise RuleError(path, f"`{op}` cannot compare with true or false", fix="use equals")
    return Compare(op, value, path)  # type: ignore[arg-type]


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and value is not None


_EVENT_KEYS = {"event", "where", "count", "sum", "within", "window"}
_PROPERTY = re.compile(r"^[A-Za-z_$][\w$\-]*(\[\])?(\.[A-Za-z_$][\w$\-]*(\[\])?)*$")


def _event(data: dict[str, Any], path: str) -> EventCondition:
    _only(data, _EVENT_KEYS, path)
    name = _name(data["event"], _join(path, "event"))
    where: list[PropertyCondition] = []
    raw_where = data.get("where", [])
    where_path = _join(path, "where")
    if isinstance(raw_where, dict):
        raw_where = [raw_where]
    if not isinstance(raw_where, list):
        raise RuleError(where_path, "`where` takes a list of property conditions")
    for i, item in enumerate(raw_where):
        where.append(_property(item, _join(where_path, i)))
    count = Compare("gte", 1, _join(path, "count"))
    if "count" in data:
        count = _count(data["count"], _join(path, "count"))
    total = None
    if "sum" in data:
        sum_path = _join(path, "sum")
        raw = data["sum"]
        if not isinstance(raw, dict) or "property" not in raw:
            raise RuleError(sum_path, "`sum` needs {property: NAME, gte: NUMBER}")
        prop = _property_path(raw["property"], _join(sum_path, "property"))
        compare = _one_compare(raw, {"property"}, sum_path)
        if compare.op not in COUNT_OPERATORS or not _number(compare.value):
            raise RuleError(compare.path, "`sum` compares with a number: gt, gte, lt, lte, equals")
        total = (prop, compare)
    window = None
    if "within" in data and "window" in data:
        raise RuleError(path, "give either `within` or `window`, not both")
    if "within" in data:
        window = Window(duration_days(data["within"], _join(path, "within")))
    elif "window" in data:
        window = _window(data["window"], _join(path, "window"))
    return EventCondition(path, name, tuple(where), count, total, window)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(raw: Any, path: str) -> Compare:
    if _number(raw):
        raw = {"gte": raw}
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RuleError(path, "`count` takes one comparison such as {gte: 2} or {equals: 0}")
    op, value = next(iter(raw.items()))
    here = _join(path, str(op))
    if op not in COUNT_OPERATORS:
        raise RuleError(here, f"unknown count operator {op!r}", fix=", ".join(COUNT_OPERATORS))
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RuleError(here, "a count is a whole number of zero or more")
    if (op == "lt" and value == 0) or (op == "lte" and value < 0):
        raise RuleError(here, "no one can have done something fewer than zero times")
    return Compare(op, value, here)


def _window(raw: Any, path: str) -> Window:
    if not isinstance(raw, dict) or "from" not in raw:
        raise RuleError(
            path,
            "`window` needs {from: '90 days', to: '30 days'} (both ago; `to` may be left out)",
        )
    _only(raw, {"from", "to"}, path)
    start = duration_days(raw["from"], _join(path, "from"))
    end = 0.0
    if "to" in raw:
        to = raw["to"]
        end = 0.0 if to in ("now", 0) else duration_days(to, _join(path, "to"))
    if end >= start:
        raise RuleError(
            _join(path, "to"),
            "the window ends before it starts (`to` must be more recent than `from`)",
            fix="for 'between 90 and 30 days ago' write {from: '90 days', to: '30 days'}",
        )
    return Window(start, end)


def _property_path(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _PROPERTY.match(value):
        raise RuleError(
            path,
            "a property is a name or a dotted path such as revenue or products[].category",
        )
    if value.count("[]") > 1:
        raise RuleError(path, "only one array step (`[]`) is supported in a property path")
    return value


def _property(item: Any, path: str) -> PropertyCondition:
    if not isinstance(item, dict) or "property" not in item:
        raise RuleError(path, "a property condition needs {property: NAME, <operator>: value}")
    prop = _property_path(item["property"], _join(path, "property"))
    compare = _one_compare(item, {"property"}, path)
    if compare.op in ("within", "before"):
        raise RuleError(compare.path, "`within` and `before` apply to dates of traits only")
    head, sep, tail = prop.partition("[]")
    if sep:
        parts = tuple(head.split("."))
        rest = tuple(p for p in tail.split(".") if p)
        return PropertyCondition(path, prop, parts, parts[-1], rest, compare)
    return PropertyCondition(path, prop, tuple(prop.split(".")), None, (), compare)


def referenced_segments(rule: Rule) -> list[SegmentCondition]:
    """Every `segment:` condition in a rule."""
    found: list[SegmentCondition] = []

    def walk(node: Rule) -> None:
        if isinstance(node, All | AnyOf):
            for child in node.children:
                walk(child)
        elif isinstance(node, Not):
            walk(node.child)
        elif isinstance(node, SegmentCondition):
            found.append(node)

    walk(rule)
    return found
