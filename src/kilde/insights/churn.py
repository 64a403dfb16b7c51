"""Churn: who is about to leave, or has left.

Two readings, both kept as traits of each profile:

- **Buyers**: the BG/NBD model (clv.py) gives the probability that a customer is still active
  from their purchase pattern; `churn_risk` = 1 - that probability. Someone who bought every
  month and has not bought for four months gets a high risk; someone who buys twice a year and
  bought two months ago does not.
- **Everyone, including people who never buy** (readers, app users, newsletter subscribers):
  a rule. A person's usual gap is the mean number of days between the days they were active
  (the span from the first to the last active day over the number of gaps in it);
  `churn_flag` is set when they have been inactive for more than `k` times that gap (k = 3 by
  default). People seen on one day only have no gap of their own and are measured against the
  median gap of everyone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.insights.data import behaviour

GAP_FACTOR = 3.0
# Below this many days of inactivity nobody is flagged, whatever their usual gap.
MIN_INACTIVE_DAYS = 7.0


def activity(backend: Any, now: datetime, factor: float = GAP_FACTOR) -> ir.Table:
    """profile_id, days_inactive, usual_gap_days, active_days and churn_flag per profile."""
    ev = behaviour(backend)
    ev = ev.filter(ev.timestamp <= ibis.literal(now))
    # days as numbers (UTC): arithmetic on the epoch is far cheaper than calendar functions
    day = (ev.seconds / 86400).floor().cast("int64")
    # each profile's active days once, then counted: far cheaper than a distinct count
    days = ev.select("profile_id", day=day).distinct()
    per = days.group_by("profile_id").aggregate(
        first_day=days.day.min(), last_day=days.day.max(), active_days=days.count()
    )
    # the mean gap between active days: the span over the number of gaps in it
    per = per.mutate(
        last_day=per.last_day,
        usual_gap_days=ibis.ifelse(
            per.active_days > 1,
            (per.last_day - per.first_day).cast("float64") / (per.active_days - 1).cast("float64"),
            ibis.null("float64"),
        ),
    )
    everyone = per.usual_gap_days.median().as_scalar()
    per = per.mutate(
        days_inactive=ibis.greatest(now.timestamp() / 86400 - per.last_day.cast("float64"), 0.0),
        gap=per.usual_gap_days.fill_null(everyone),
    )
    threshold = ibis.greatest(per.gap * factor, MIN_INACTIVE_DAYS)
    return per.select(
        "profile_id",
        "days_inactive",
        "usual_gap_days",
        "active_days",
        churn_flag=(per.days_inactive > threshold).fill_null(False),
    )


def churn_report(insights: ir.Table) -> dict[str, Any]:
    """How many profiles are flagged, and the spread of the model's risk among buyers."""
    flagged = insights.group_by("churn_basis").aggregate(
        profiles=insights.count(),
        flagged=insights.churn_flag.sum().cast("int64"),
        avg_risk=insights.churn_risk.mean(),
    )
    rows = flagged.to_pyarrow().to_pylist()
    bands = []
    edges = [0.0, 0.25, 0.5, 0.75, 1.0001]
    labels = ["low (<25%)", "medium (25-50%)", "high (50-75%)", "very high (>=75%)"]
    risk = insights.churn_risk
    counted = (
        insights.aggregate(
            **{
                f"b{i}": ((risk >= edges[i]) & (risk < edges[i + 1])).sum().cast("int64")
                for i in range(4)
            },
            revenue_at_risk=insights.monetary.sum(where=risk >= 0.5),
            clv_at_risk=insights.clv.sum(where=risk >= 0.5),
        )
        .to_pyarrow()
        .to_pylist()[0]
    )
    for i, label in enumerate(labels):
        bands.append({"risk": label, "customers": int(counted[f"b{i}"] or 0)})
    for row in rows:
        if row["avg_risk"] is not None:
            row["avg_risk"] = round(float(row["avg_risk"]), 4)
    return {
        "by_basis": rows,
        "risk_bands": bands,
        "past_revenue_of_high_risk": round(float(counted["revenue_at_risk"] or 0.0), 2),
        "clv_of_high_risk": round(float(counted["clv_at_risk"] or 0.0), 2),
    }
