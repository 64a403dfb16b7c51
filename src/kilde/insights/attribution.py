"""Attribution: which campaigns (UTM source, medium, campaign) bring orders, signups and the
best customers.

A touch is any event of a person that carries `context.campaign` (the UTM tags the tracker
reads from the landing page's address). For each conversion (an order or a signup), the
touches of the same person in the `lookback` before it share the credit:

- first touch: all of it to the earliest touch;
- last touch: all of it to the latest touch;
- linear: equal parts to every touch.

Conversions without any touch are credited to "(none)". `customers` tells which campaign
brought the best customers: for each campaign of a person's very first touch, their number,
average orders, spend and lifetime value, and the share of them that are Champions or Loyal.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import ibis
import ibis.expr.types as ir

from kilde.insights.data import ORDER_EVENT, SIGNUP_EVENT, behaviour

Model = Literal["first_touch", "last_touch", "linear"]
Conversion = Literal["order", "signup"]
MODELS: tuple[str, ...] = ("first_touch", "last_touch", "linear")
NONE = "(none)"


def touches(backend: Any) -> ir.Table:
    """profile_id, ts, utm_source, utm_medium, utm_campaign of every tagged event."""
    ev = behaviour(backend)
    campaign = ev.context.cast("json")["campaign"]
    t = ev.select(
        "profile_id",
        ts=ev.timestamp,
        utm_source=campaign["source"].str,
        utm_medium=campaign["medium"].str,
        utm_campaign=campaign["name"].str,
    )
    return t.filter(t.utm_source.notnull() | t.utm_campaign.notnull())


def conversions(backend: Any, kind: Conversion) -> ir.Table:
    ev = behaviour(backend)
    name = ORDER_EVENT if kind == "order" else SIGNUP_EVENT
    ev = ev.filter(ev.event == name)
    props = ev.properties.cast("json")
    return ev.select(
        "profile_id",
        conversion=ev.source + ":" + ev.message_id,
        at=ev.timestamp,
        value=props["revenue"].float.fill_null(0.0) if kind == "order" else ibis.literal(0.0),
    )


KEYS = ("utm_source", "utm_medium", "utm_campaign")


def attribution(
    backend: Any,
    now: datetime,
    model: Model = "last_touch",
    conversion: Conversion = "order",
    lookback_days: float = 30.0,
    since_days: float | None = None,
) -> dict[str, Any]:
    conv = conversions(backend, conversion)
    if since_days is not None:
        conv = conv.filter(conv.at >= ibis.literal(now - timedelta(days=since_days)))
    t = touches(backend)
    joined = conv.join(t, "profile_id")
    joined = joined.filter(
        (joined.ts <= joined.at)
        & (joined.ts >= joined.at - ibis.interval(seconds=int(lookback_days * 86400)))
    )
    w_first = ibis.window(group_by=joined.conversion, order_by=[joined.ts, *KEYS])
    w_last = ibis.window(group_by=joined.conversion, order_by=[ibis.desc(joined.ts), *KEYS])
    joined = joined.mutate(
        first_rank=ibis.row_number().over(w_first),
        last_rank=ibis.row_number().over(w_last),
        touches=joined.count().over(ibis.window(group_by=joined.conversion)),
    )
    if model == "first_touch":
        credited = joined.filter(joined.first_rank == 0).mutate(weight=ibis.literal(1.0))
    elif model == "last_touch":
        credited = joined.filter(joined.last_rank == 0).mutate(weight=ibis.literal(1.0))
    else:
        credited = joined.mutate(weight=1.0 / joined.touches.cast("float64"))
    per = credited.group_by(*KEYS).aggregate(
        conversions=credited.weight.sum(),
        value=(credited.weight * credited.value).sum(),
        people=credited.profile_id.nunique(),
    )
    rows = per.to_pyarrow().to_pylist()
    totals = conv.aggregate(n=conv.count(), value=conv.value.sum()).to_pyarrow().to_pylist()[0]
    touched = joined.conversion.nunique().to_pyarrow().as_py() or 0
    matched = credited.aggregate(
        v=credited.weight.sum(), r=(credited.weight * credited.value).sum()
    )
    m = matched.to_pyarrow().to_pylist()[0]
    none_conversions = int(totals["n"] or 0) - int(touched)
    if none_conversions > 0:
        rows.append(
            {
                "utm_source": NONE,
                "utm_medium": NONE,
                "utm_campaign": NONE,
                "conversions": float(none_conversions),
                "value": float(totals["value"] or 0.0) - float(m["r"] or 0.0),
                "people": None,
            }
        )
    for row in rows:
        row["conversions"] = round(float(row["conversions"] or 0.0), 3)
        row["value"] = round(float(row["value"] or 0.0), 2)
    rows.sort(key=lambda r: (-r["value"], -r["conversions"], str(r["utm_campaign"])))
    return {
        "model": model,
        "conversion": conversion,
        "lookback_days": lookback_days,
        "conversions": int(totals["n"] or 0),
        "value": round(float(totals["value"] or 0.0), 2),
        "channels": rows,
        "customers": customer_quality(backend),
    }


def customer_quality(backend: Any) -> list[dict[str, Any]]:
    """Per campaign of each person's first touch ever: how good the customers it brought are."""
    t = touches(backend)
    ranked = t.mutate(_rn=ibis.row_number().over(group_by=t.profile_id, order_by=[t.ts, *KEYS]))
    first = ranked.filter(ranked._rn == 0).select("profile_id", *KEYS)
    profiles = backend.table("profiles").select("profile_id", "orders", "total_revenue")
    insights = backend.table("profile_insights").select("profile_id", "clv", "rfm_group")
    people = (
        first.join(profiles, "profile_id")
        .left_join(insights, "profile_id")
        .drop("profile_id_right")
    )
    buyer = people.orders > 0
    best = people.rfm_group.isin(["Champions", "Loyal"])
    per = people.group_by(*KEYS).aggregate(
        people=people.count(),
        customers=buyer.sum().cast("int64").fill_null(0),
        avg_orders=people.orders.mean(where=buyer),
        avg_revenue=people.total_revenue.mean(where=buyer),
        avg_clv=people.clv.mean(where=buyer),
        best_customers=best.sum().cast("int64").fill_null(0),
    )
    rows: list[dict[str, Any]] = per.to_pyarrow().to_pylist()
    for row in rows:
        row["conversion_rate"] = (
            round(row["customers"] / row["people"], 4) if row["people"] else None
        )
        row["best_share"] = (
            round(row["best_customers"] / row["customers"], 4) if row["customers"] else None
        )
        for key in ("avg_orders", "avg_revenue", "avg_clv"):
            if row[key] is not None:
                row[key] = round(float(row[key]), 2)
    rows.sort(key=lambda r: (-(r["avg_clv"] or 0.0), -(r["customers"] or 0)))
    return rows
