"""Preferences: what each person likes, where and when they come; what to offer them next.

- favourite products: bought most often (a purchase counts 3, adding to the cart 2, a view 1);
  favourite categories are already a profile trait (profiles/build.py);
- preferred channel: the source most of their activity comes from (web, app, email, ...);
- preferred time of day: night (0-6), morning (6-12), afternoon (12-18) or evening (18-24),
  in UTC, whichever has most of their activity.

Recommendations (recommendations.py) build on the products bought together.
"""

from __future__ import annotations

from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.insights.data import behaviour
from kilde.store.portable import ranked_list

PRODUCT_WEIGHTS = {"Order Completed": 3, "Product Added": 2, "Product Viewed": 1}
TOP = 3


def product_rows(backend: Any) -> ir.Table:
    """profile_id, product_id, event, message_id: every product a profile viewed, added, bought."""
    ev = behaviour(backend)
    ev = ev.filter(ev.event.isin(list(PRODUCT_WEIGHTS)))
    single = ev.filter(ev.event != "Order Completed").select(
        "profile_id", "event", "message_id", "product_id"
    )
    orders = ev.filter(ev.event == "Order Completed")
    items = orders.select(
        "profile_id",
        "event",
        "message_id",
        item=orders.properties.cast("json")["products"].array.unnest(),
    )
    bought = items.select(
        "profile_id", "event", "message_id", product_id=items.item["product_id"].str
    )
    rows = single.union(bought)
    return rows.filter(rows.product_id.notnull())


def _top(table: ir.Table, key: str, score: ir.Value, name: str) -> ir.Table:
    ranked = table.mutate(
        _rn=ibis.row_number().over(
            group_by=table.profile_id, order_by=[ibis.desc(score), table[key]]
        )
    )
    top = ranked.filter(ranked._rn < TOP)
    return ranked_list(top, "profile_id", key, "_rn", TOP, name)


def favourite_products(backend: Any) -> ir.Table:
    rows = product_rows(backend)
    weight = ibis.cases(
        *((rows.event == name, value) for name, value in PRODUCT_WEIGHTS.items()), else_=0
    )
    scored = rows.group_by("profile_id", "product_id").aggregate(score=weight.sum())
    return _top(scored, "product_id", scored.score, "favourite_products")


def channel_and_time(backend: Any) -> ir.Table:
    """profile_id, preferred_channel, preferred_time."""
    ev = behaviour(backend)
    # the hour (UTC) by arithmetic on the epoch: far cheaper than calendar functions
    hour = (ev.seconds % 86400) / 3600
    part = ibis.cases(
        (hour < 6, "night"), (hour < 12, "morning"), (hour < 18, "afternoon"), else_="evening"
    )
    # each count straight from the events (a projection shared by both would be materialised)
    channels = ev.group_by("profile_id", channel=ev.source).aggregate(n=ev.count())
    ranked = channels.mutate(
        _rn=ibis.row_number().over(
            group_by=channels.profile_id, order_by=[ibis.desc(channels.n), channels.channel]
        )
    )
    channel = ranked.filter(ranked._rn == 0).select("profile_id", preferred_channel=ranked.channel)
    parts = ev.group_by("profile_id", part=part).aggregate(n=ev.count())
    ranked_parts = parts.mutate(
        _rn=ibis.row_number().over(
            group_by=parts.profile_id, order_by=[ibis.desc(parts.n), parts.part]
        )
    )
    time = ranked_parts.filter(ranked_parts._rn == 0).select(
        "profile_id", preferred_time=ranked_parts.part
    )
    return channel.join(time, "profile_id")


def preferences_report(insights: ir.Table, profiles: ir.Table) -> dict[str, Any]:
    """How profiles spread over channels, times of day and favourite categories."""

    def spread(table: ir.Table, column: str) -> list[dict[str, Any]]:
        known = table.filter(table[column].notnull())
        counted = (
            known.group_by(column)
            .aggregate(profiles=known.count())
            .order_by([ibis.desc("profiles"), column])
        )
        return [
            {"value": r[column], "profiles": r["profiles"]}
            for r in counted.to_pyarrow().to_pylist()
        ]

    cats = profiles.select(category=profiles.favourite_categories[0])
    return {
        "preferred_channel": spread(insights, "preferred_channel"),
        "preferred_time": spread(insights, "preferred_time"),
        "favourite_category": spread(cats, "category"),
    }
