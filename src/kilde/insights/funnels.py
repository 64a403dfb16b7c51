"""Funnels: of the people who did step 1, how many went on to step 2, 3, ... in order, in time.

A person enters the funnel at their first step-1 event in the period looked at; each next step
counts when it happens after the previous step and no later than `within` after step 1. Each
step is an event with optional property conditions (the same `where` as in segment rules).
Conversion is the share of the previous step's people who reached the step; drop-off the rest.
A funnel can be limited to the members of a segment.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.insights.data import profile_events
from kilde.insights.segments.compiler import Context, event_rows, members
from kilde.insights.segments.rules import EventCondition, RuleError, duration_days, parse_rule

MAX_STEPS = 20


def parse_steps(raw: Any) -> list[EventCondition]:
    """Steps as event names or {event: NAME, where: [...]}; RuleError with `steps[i]` paths."""
    if not isinstance(raw, list) or len(raw) < 2:
        raise RuleError("steps", "a funnel needs a list of at least two steps")
    if len(raw) > MAX_STEPS:
        raise RuleError("steps", f"a funnel has at most {MAX_STEPS} steps")
    steps = []
    for i, item in enumerate(raw):
        path = f"steps[{i}]"
        data = {"event": item} if isinstance(item, str) else item
        if not isinstance(data, dict) or "event" not in data:
            raise RuleError(path, "a step is an event name or {event: NAME, where: [...]}")
        unknown = set(data) - {"event", "where"}
        if unknown:
            raise RuleError(f"{path}.{sorted(unknown)[0]}", "a step takes only event and where")
        node = parse_rule(data, path)
        assert isinstance(node, EventCondition)
        steps.append(node)
    return steps


def funnel(
    ctx: Context,
    steps: list[EventCondition],
    within: str | float = "7 days",
    since: str | float | None = "90 days",
    segment_rule: Any = None,
) -> dict[str, Any]:
    window_days = duration_days(within, "within")
    since_days = duration_days(since, "since") if since is not None else None
    # The steps filter one join of the events to their profiles, shared by all of them (the
    # engine narrows it by every step's filter at once).
    shared = profile_events(ctx.backend)
    rows = [event_rows(step, ctx, shared) for step in steps]  # checks every step against the plan
    first = rows[0]
    if since_days is not None:
        first = first.filter(first.timestamp >= ibis.literal(ctx.now - timedelta(days=since_days)))
    if segment_rule is not None:
        first = first.semi_join(members(segment_rule, ctx).select("profile_id"), "profile_id")
    # Every step's events once, in one table held by the backend for the steps below.
    parts = [first.select("profile_id", "timestamp", step=ibis.literal(0))]
    parts += [
        r.select("profile_id", "timestamp", step=ibis.literal(i)) for i, r in enumerate(rows[1:], 1)
    ]
    hits = parts[0].union(*parts[1:]).cache() if len(parts) > 1 else parts[0].cache()
    stages: list[ir.Table] = []
    try:
        start = hits.filter(hits.step == 0)
        reached = start.group_by("profile_id").aggregate(start=start.timestamp.min())
        stages.append(reached.mutate(t=reached.start).cache())
        window = ibis.interval(seconds=int(window_days * 86400))
        for i in range(1, len(steps)):
            prev = stages[-1]
            later = hits.filter(hits.step == i).select("profile_id", ts=hits.timestamp)
            joined = prev.join(later, "profile_id")
            joined = joined.filter((joined.ts >= joined.t) & (joined.ts <= joined.start + window))
            stages.append(
                joined.group_by("profile_id", "start").aggregate(t=joined.ts.min()).cache()
            )
        counts = [int(stage.count().to_pyarrow().as_py()) for stage in stages]
        last = stages[-1]
        hours = (
            last.aggregate(
                h=((last.t.epoch_seconds() - last.start.epoch_seconds()) / 3600.0).median()
            )
            .to_pyarrow()
            .to_pylist()[0]["h"]
        )
    finally:
        for table in (hits, *stages):
            with contextlib.suppress(Exception):
                table.release()
    out = []
    for i, (step, n) in enumerate(zip(steps, counts, strict=True)):
        previous = counts[i - 1] if i else n
        out.append(
            {
                "step": i + 1,
                "event": step.event,
                "where": [w.property for w in step.where],
                "profiles": n,
                "conversion_from_previous": round(n / previous, 4) if previous else None,
                "conversion_from_start": round(n / counts[0], 4) if counts[0] else None,
                "drop_off": previous - n if i else 0,
            }
        )
    return {
        "steps": out,
        "entered": counts[0],
        "completed": counts[-1],
        "conversion": round(counts[-1] / counts[0], 4) if counts[0] else None,
        "median_hours_to_complete": round(float(hours), 2) if hours is not None else None,
        "within_days": window_days,
        "since_days": since_days,
        "as_of": ctx.now,
    }


def now_or(value: datetime | None) -> datetime:
    from datetime import UTC

    return value or datetime.now(UTC)
