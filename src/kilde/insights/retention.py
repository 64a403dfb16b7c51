"""Retention cohorts: of the people who started in a week (or month), how many came back later.

A cohort is everyone whose first activity (`first_seen`) or first order (`first_order`) fell in
the same week (Monday to Sunday, UTC) or calendar month. Column k is the share of the cohort
active in the k-th period after it (0 is the starting period itself, always 100%). Activity is
any event of theirs, or only orders (`activity=orders`). Periods still in the future are empty.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import ibis
import ibis.expr.types as ir

from kilde.insights.data import ORDER_EVENT, behaviour

Period = Literal["week", "month"]
Cohort = Literal["first_seen", "first_order"]
Activity = Literal["any", "orders"]


def _index(period: Period, start: ir.TimestampValue, at: ir.TimestampValue) -> ir.IntegerValue:
    if period == "week":
        days = (at.epoch_seconds() - start.epoch_seconds()) / 86400.0
        result: ir.IntegerValue = (days / 7.0).round().cast("int64")
        return result
    months = (at.year() * 12 + at.month()) - (start.year() * 12 + start.month())
    return months.cast("int64")


def retention(
    backend: Any,
    now: datetime,
    period: Period = "week",
    periods: int = 12,
    cohort: Cohort = "first_seen",
    activity: Activity = "any",
) -> dict[str, Any]:
    unit = "W" if period == "week" else "M"
    ev = behaviour(backend)
    ev = ev.filter(ev.timestamp <= ibis.literal(now))
    orders = ev.filter(ev.event == ORDER_EVENT)
    starts = (
        (orders if cohort == "first_order" else ev)
        .group_by("profile_id")
        .aggregate(first=(orders if cohort == "first_order" else ev).timestamp.min())
    )
    starts = starts.mutate(cohort=starts.first.truncate(unit))
    earliest = (
        (now - timedelta(days=7 * periods)) if period == "week" else _months_ago(now, periods)
    )
    starts = starts.filter(starts.cohort >= ibis.literal(earliest).truncate(unit))
    active = (
        (orders if activity == "orders" else ev)
        .select(
            "profile_id", when=(orders if activity == "orders" else ev).timestamp.truncate(unit)
        )
        .distinct()
    )
    joined = active.join(starts, "profile_id")
    joined = joined.filter(joined.when >= joined.cohort)
    joined = joined.mutate(k=_index(period, joined.cohort, joined.when))
    joined = joined.filter(joined.k < periods)
    counts = joined.group_by("cohort", "k").aggregate(people=joined.profile_id.nunique())
    sizes = starts.group_by("cohort").aggregate(size=starts.count()).to_pyarrow().to_pylist()
    cells = {(r["cohort"], r["k"]): r["people"] for r in counts.to_pyarrow().to_pylist()}
    current = _truncate(now, period)
    rows = []
    for row in sorted(sizes, key=lambda r: r["cohort"]):
        start = row["cohort"]
        elapsed = _elapsed(period, start, current)
        shares: list[float | None] = []
        for k in range(periods):
            if k > elapsed:
                shares.append(None)
            else:
                shares.append(round(cells.get((start, k), 0) / row["size"], 4))
        rows.append({"cohort": start.date().isoformat(), "size": row["size"], "retention": shares})
    return {
        "period": period,
        "periods": periods,
        "cohort_by": cohort,
        "activity": activity,
        "cohorts": rows,
    }


def _truncate(moment: datetime, period: Period) -> datetime:
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _months_ago(now: datetime, months: int) -> datetime:
    total = now.year * 12 + (now.month - 1) - months
    return now.replace(year=total // 12, month=total % 12 + 1, day=1)


def _elapsed(period: Period, start: datetime, current: datetime) -> int:
    if period == "week":
        return round((current - start.astimezone(current.tzinfo)).days / 7)
    return (current.year * 12 + current.month) - (start.year * 12 + start.month)
