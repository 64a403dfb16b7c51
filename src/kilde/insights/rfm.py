"""RFM: how recently, how often and how much each customer bought, scored 1-5 and named.

Recency is the days since the last order, frequency the number of orders, monetary the total
spent. Each is scored 1 (worst fifth of buyers) to 5 (best fifth) by its percentile among all
buyers, so equal values always get equal scores. The named groups come from the recency score
and the mean of the frequency and monetary scores, the grid most RFM tools use:

| recency \\ frequency+monetary | 1               | 2-3                 | 4-5              |
|-------------------------------|-----------------|---------------------|------------------|
| 5                             | New customers   | Potential loyalists | Champions        |
| 4                             | Promising       | Potential loyalists | Loyal            |
| 3                             | About to sleep  | About to sleep / Need attention (3) | Loyal |
| 1-2                           | Hibernating (1-2) | At risk (3-4)     | Can't lose them (5) |

Profiles without orders get no scores and no group.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.insights.data import days_between

GROUPS = (
    "Champions",
    "Loyal",
    "Potential loyalists",
    "New customers",
    "Promising",
    "Need attention",
    "About to sleep",
    "Can't lose them",
    "At risk",
    "Hibernating",
)


def _score(rank: ir.FloatingValue) -> ir.IntegerValue:
    score: ir.IntegerValue = ibis.least((rank * 5).floor().cast("int32") + 1, 5)
    return score


def group_of(r: ir.IntegerValue, fm: ir.IntegerValue) -> ir.StringValue:
    """The named group of a recency score and a frequency-monetary score (both 1-5)."""
    result: ir.StringValue = ibis.cases(
        ((r == 5) & (fm >= 4), "Champions"),
        ((r >= 3) & (fm >= 4), "Loyal"),
        ((r >= 4) & (fm >= 2), "Potential loyalists"),
        ((r == 5) & (fm == 1), "New customers"),
        ((r == 4) & (fm == 1), "Promising"),
        ((r == 3) & (fm == 3), "Need attention"),
        (r == 3, "About to sleep"),
        (fm == 5, "Can't lose them"),
        (fm >= 3, "At risk"),
        else_="Hibernating",
    )
    return result


def rfm_scores(profiles: ir.Table, now: datetime) -> ir.Table:
    """profile_id, recency_days, frequency, monetary, r/f/m scores, rfm_score and rfm_group.

    `profiles` needs profile_id, orders, total_revenue and last_order_at (the profiles table).
    """
    buyers = profiles.filter((profiles.orders > 0) & profiles.last_order_at.notnull())
    buyers = buyers.select(
        "profile_id",
        recency_days=days_between(now, buyers.last_order_at),
        frequency=buyers.orders.cast("int64"),
        monetary=buyers.total_revenue.fill_null(0.0),
    )
    ranked = buyers.mutate(
        r_score=_score(ibis.percent_rank().over(order_by=ibis.desc(buyers.recency_days))),
        f_score=_score(ibis.percent_rank().over(order_by=buyers.frequency)),
        m_score=_score(ibis.percent_rank().over(order_by=buyers.monetary)),
    )
    fm = ((ranked.f_score + ranked.m_score) / 2.0).round().cast("int32")
    return ranked.mutate(
        rfm_score=ranked.r_score.cast("string")
        + ranked.f_score.cast("string")
        + ranked.m_score.cast("string"),
        rfm_group=group_of(ranked.r_score, fm),
    )


def rfm_report(insights: ir.Table) -> dict[str, Any]:
    """Customers, revenue and averages per named group and the 5x5 recency/frequency grid."""
    buyers = insights.filter(insights.rfm_group.notnull())
    groups = (
        buyers.group_by("rfm_group")
        .aggregate(
            customers=buyers.count(),
            revenue=buyers.monetary.sum(),
            avg_recency_days=buyers.recency_days.mean(),
            avg_orders=buyers.frequency.mean(),
            avg_spend=buyers.monetary.mean(),
            avg_clv=buyers.clv.mean(),
        )
        .to_pyarrow()
        .to_pylist()
    )
    order = {name: i for i, name in enumerate(GROUPS)}
    groups.sort(key=lambda g: order.get(g["rfm_group"], len(order)))
    total = sum(g["customers"] for g in groups)
    for g in groups:
        g["share"] = round(g["customers"] / total, 4) if total else 0.0
        for key in ("revenue", "avg_recency_days", "avg_orders", "avg_spend", "avg_clv"):
            if g[key] is not None:
                g[key] = round(float(g[key]), 2)
    grid_rows = (
        buyers.group_by("r_score", "f_score").aggregate(customers=buyers.count()).to_pyarrow()
    )
    grid = [[0] * 5 for _ in range(5)]
    for row in grid_rows.to_pylist():
        grid[int(row["r_score"]) - 1][int(row["f_score"]) - 1] = int(row["customers"])
    return {"customers": total, "groups": groups, "grid_recency_by_frequency": grid}
