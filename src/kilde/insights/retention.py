"""Retention cohorts: of the people who started in a week (or month), how many came back later.

A cohort is everyone whose first activity (`first_seen`) or first order (`first_order`) fell in
the same week (Monday to Sunday, UTC) or calendar month. Column k is the share of the cohort
active in the k-th period after it (0 is the starting period itself, always 100%). Activity is
any event of theirs, or only orders (`activity=orders`). Periods still in the future are empty.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import ibis

from kilde.insights.data import ORDER_EVENT, behaviour

Period = Literal["week", "month"]
Cohort = Literal["first_seen", "first_order"]
Activity = Literal["any", "orders"]


def _number(period: Period, ts: Any) -> Any:
    """The period a moment falls in, as a number: weeks (from Monday, UTC) or months."""
    if period == "week":
        # arithmetic on the epoch: much cheaper than calendar functions on 10M timestamps
        return ((ts.epoch_seconds() + 3 * 86400) / 604800).floor().cast("int64")
    return (ts.year() * 12 + ts.month() - 1).cast("int64")


def _number_now(period: Period, now: datetime) -> int:
    if period == "week":
        return int((now.timestamp() + 3 * 86400) // 604800)
    return now.year * 12 + now.month - 1


def _start_of(period: Period, number: int) -> date:
    if period == "week":
        return date(1970, 1, 1) + timedelta(days=7 * number - 3)
    return date(number // 12, number % 12 + 1, 1)


def retention(
    backend: Any,
    now: datetime,
    period: Period = "week",
    periods: int = 12,
    cohort: Cohort = "first_seen",
    activity: Activity = "any",
) -> dict[str, Any]:
    current = _number_now(period, now)
    oldest = _start_of(period, current - periods + 1)
    since = datetime(oldest.year, oldest.month, oldest.day, tzinfo=UTC)
    ev = behaviour(backend)
    orders = ev.filter(ev.event == ORDER_EVENT)
    if cohort == "first_order":
        starts = orders.group_by("profile_id").aggregate(first=orders.timestamp.min())
    else:  # the profiles know when each was first seen: no need to read all events again
        profiles = backend.table("profiles")
        starts = profiles.select("profile_id", first=profiles.first_seen)
    starts = starts.filter(starts.first >= ibis.literal(since))
    starts = starts.select("profile_id", cohort=_number(period, starts.first))
    # only the periods shown: older events are never read
    acts = (orders if activity == "orders" else ev).filter(
        lambda t: (t.timestamp >= ibis.literal(since)) & (t.timestamp <= ibis.literal(now))
    )
    active = acts.select("profile_id", when=_number(period, acts.timestamp)).distinct()
    joined = active.join(starts, "profile_id")
    joined = joined.mutate(k=joined.when - joined.cohort)
    joined = joined.filter((joined.k >= 0) & (joined.k < periods))
    # `active` holds each profile once per period, so counting rows counts people
    counts = joined.group_by("cohort", "k").aggregate(people=joined.count())
    sizes = starts.group_by("cohort").aggregate(size=starts.count()).to_pyarrow().to_pylist()
    cells = {(r["cohort"], r["k"]): r["people"] for r in counts.to_pyarrow().to_pylist()}
    rows = []
    for row in sorted(sizes, key=lambda r: r["cohort"]):
        number = int(row["cohort"])
        elapsed = current - number
        shares: list[float | None] = [
            None if k > elapsed else round(cells.get((number, k), 0) / row["size"], 4)
            for k in range(periods)
        ]
        rows.append(
            {
                "cohort": _start_of(period, number).isoformat(),
                "size": row["size"],
                "retention": shares,
            }
        )
    return {
        "period": period,
        "periods": periods,
        "cohort_by": cohort,
        "activity": activity,
        "cohorts": rows,
    }
