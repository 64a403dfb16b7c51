"""Profiles from stitched identities: computed traits (set-based) and traits with precedence.

Computed traits are aggregations over every event of every identifier of a profile (Ibis
expressions, so they run on DuckDB and Spark alike). Traits come from identify calls: each
candidate value carries its provenance (source, tier, observed time) and the winner is the one
from the most trusted tier, the newest within a tier (see traits.py).
"""

from __future__ import annotations

from datetime import datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from kilde.identity import keyed
from kilde.identity.runner import Runner
from kilde.insights.data import COMPUTED_EVENTS
from kilde.plan.models import Plan
from kilde.profiles.traits import TIERS, tier_expr
from kilde.store.portable import ranked_list

SESSION_GAP_MINUTES = 30
PROFILE_COLUMNS = (
    "profile_id",
    "closure_id",
    "anchor_type",
    "first_seen",
    "last_seen",
    "identifiers",
    "shared",
    "events",
    "sessions",
    "page_views",
    "screen_views",
    "orders",
    "total_revenue",
    "average_order_value",
    "last_order_at",
    "favourite_categories",
    "channels",
    "email_opens",
    "email_clicks",
    "latest_nps",
    "support_sentiment",
    "updated_at",
)
TRAIT_SCHEMA = pa.schema(
    [
        ("profile_id", pa.string()),
        ("closure_id", pa.string()),
        ("name", pa.string()),
        ("value", pa.string()),
        ("source", pa.string()),
        ("tier", pa.string()),
        ("observed_at", pa.timestamp("us", tz="UTC")),
        ("message_id", pa.string()),
        ("candidates", pa.int64()),
    ]
)


def profile_events(run: Runner, identities: ir.Table) -> ir.Table:
    """Every event of the profiles in `identities`, with its profile_id and closure_id."""
    records = run.source("identity_records")
    owners = identities.select(
        primary_type=identities.id_type,
        primary_value=identities.id_value,
        profile_id=identities.profile_id,
        closure_id=identities.closure_id,
    )
    owned = records.join(owners, ["primary_type", "primary_value"]).select(
        "source", "message_id", "profile_id", "closure_id"
    )
    events = run.source("events")
    return events.join(owned, ["source", "message_id"])


def keyed_profile_events(run: Runner, identities: ir.Table, key: str) -> ir.Table:
    """`profile_events` for a few profiles (an incremental tick): keyed lookups of their
    records, then their events, materialised once for the computed traits and the traits."""
    records = run.source("identity_records")
    owners = identities.select(
        primary_type=identities.id_type,
        primary_value=identities.id_value,
        profile_id=identities.profile_id,
        closure_id=identities.closure_id,
    )
    mine = keyed.lookup(
        run,
        f"k_pe_records_{key}",
        records,
        "primary_value",
        owners,
        ["primary_type", "primary_value"],
    )
    owned = run.make(
        f"k_pe_owned_{key}",
        f"profile_events/owned/{key}",
        lambda: mine.join(owners, ["primary_type", "primary_value"]).select(
            "source", "message_id", "profile_id", "closure_id"
        ),
    )
    return run.make(
        f"k_pe_events_{key}",
        f"profile_events/events/{key}",
        lambda: (
            run.source("events")
            .select(*_PROFILE_EVENT_COLUMNS)
            .join(owned, ["source", "message_id"])
        ),
    )


# the columns of the events the computed traits and the traits read
_PROFILE_EVENT_COLUMNS = (
    "source",
    "message_id",
    "type",
    "event",
    "timestamp",
    "properties",
    "traits",
    "context",
)


def computed_traits(
    run: Runner,
    identities: ir.Table,
    now: datetime,
    events: ir.Table | None = None,
    key: str = "computed",
) -> pa.Table:
    """One row per profile with the computed traits (the columns of the profiles table).

    `events`: the profiles' events when already at hand (`keyed_profile_events`); `key` names
    the compiled stage, so it must differ between callers that pass different `events`.
    """
    table = run.arrow(key, lambda: _computed(run, identities, events))
    stamp = pa.array([now] * table.num_rows, pa.timestamp("us", tz="UTC"))
    return table.append_column("updated_at", stamp)


def _computed(run: Runner, identities: ir.Table, events: ir.Table | None) -> ir.Table:
    ev = profile_events(run, identities) if events is None else events
    # Segment Entered/Exited are Kilde's own notes about a person, not something they did.
    ev = ev.filter(ev.event.isnull() | ~ev.event.isin(COMPUTED_EVENTS))
    props = ev.properties.cast("json")
    text = ev.properties.cast("string")
    nothing = ibis.null()

    def only(when: ir.BooleanValue, value: ir.Value) -> ir.Value:
        # Each value is read only from the events it counts for: parsing JSON is the costly
        # part of this stage, and most events need none of it.
        return ibis.ifelse(when, value, nothing.cast(value.type()))

    has_nps = text.contains('"nps"') | text.contains('"score"')
    ev = ev.select(
        "profile_id",
        "source",
        "type",
        "event",
        "timestamp",
        revenue=only(ev.event == "Order Completed", props["revenue"].float),
        category=only(ev.event.isin(["Product Viewed", "Product Added"]), props["category"].str),
        machine=only(ev.event == "Email Opened", props["machine_open"].bool),
        nps=only(has_nps, ibis.coalesce(props["nps"].int, props["score"].int)),
        sentiment=only(
            ev.event == "Support Interaction",
            ibis.coalesce(props["sentiment"].float, props["sentiment_score"].float),
        ),
    )
    # Sessions need the events in time order: a window over two narrow columns only.
    times = ev.select("profile_id", "timestamp")
    gap = ibis.window(group_by=times.profile_id, order_by=[times.timestamp])
    previous = times.timestamp.lag().over(gap)
    times = times.mutate(
        new_session=(
            previous.isnull()
            | (times.timestamp > previous + ibis.interval(minutes=SESSION_GAP_MINUTES))
        ).cast("int64")
    )
    sessions = times.group_by("profile_id").aggregate(sessions=times.new_session.sum())
    is_order = ev.event == "Order Completed"
    human_open = (ev.event == "Email Opened") & ~ev.machine.fill_null(False)
    base = ev.group_by("profile_id").aggregate(
        events=ev.count(),
        page_views=(ev.type == "page").sum().cast("int64"),
        screen_views=(ev.type == "screen").sum().cast("int64"),
        orders=is_order.sum().cast("int64"),
        total_revenue=ev.revenue.sum(where=is_order),
        last_order_at=ev.timestamp.max(where=is_order),
        email_opens=human_open.sum().cast("int64"),
        email_clicks=(ev.event == "Email Link Clicked").sum().cast("int64"),
        latest_nps=ev.nps.argmax(ev.timestamp, where=ev.nps.notnull()),
        support_sentiment=ev.sentiment.mean(where=ev.event == "Support Interaction"),
        channels=ev.source.collect(distinct=True).sort(),
    )
    base = base.mutate(
        total_revenue=base.total_revenue.fill_null(0.0),
        average_order_value=ibis.ifelse(
            base.orders > 0, base.total_revenue.fill_null(0.0) / base.orders, ibis.null()
        ),
    )
    interest = ev.filter(ev.event.isin(["Product Viewed", "Product Added"]) & ev.category.notnull())
    per_cat = interest.group_by("profile_id", "category").aggregate(n=interest.count())
    ranked = per_cat.mutate(
        rn=ibis.row_number().over(
            group_by=per_cat.profile_id, order_by=[ibis.desc(per_cat.n), per_cat.category]
        )
    )
    top = ranked.filter(ranked.rn < 3)
    favourites = ranked_list(top, "profile_id", "category", "rn", 3, "favourite_categories")
    base = base.left_join(favourites, "profile_id").drop("profile_id_right")
    base = base.left_join(sessions, "profile_id").drop("profile_id_right")
    profiles = identities.group_by("profile_id", "closure_id").aggregate(
        first_seen=identities.first_seen.min(),
        last_seen=identities.last_seen.max(),
        identifiers=identities.count(),
        shared=identities.shared.any(),
        anchor_type=identities.anchor_type.min(),
    )
    joined = profiles.left_join(base, "profile_id")
    return joined.select(
        "profile_id",
        "closure_id",
        "anchor_type",
        "first_seen",
        "last_seen",
        identifiers=joined.identifiers.cast("int32"),
        shared=joined.shared,
        events=joined.events.fill_null(0),
        sessions=joined.sessions.fill_null(0),
        page_views=joined.page_views.fill_null(0),
        screen_views=joined.screen_views.fill_null(0),
        orders=joined.orders.fill_null(0),
        total_revenue=joined.total_revenue.fill_null(0.0),
        average_order_value=joined.average_order_value,
        last_order_at=joined.last_order_at,
        favourite_categories=joined.favourite_categories,
        channels=joined.channels,
        email_opens=joined.email_opens.fill_null(0),
        email_clicks=joined.email_clicks.fill_null(0),
        latest_nps=joined.latest_nps.cast("int32"),
        support_sentiment=joined.support_sentiment,
    )


def trait_rows(
    run: Runner,
    plan: Plan,
    identities: ir.Table,
    events: ir.Table | None = None,
    key: str = "traits",
) -> pa.Table:
    """The winning value of every trait of the profiles in `identities`, with provenance."""
    table = run.arrow(key, lambda: _traits(run, plan, identities, events))
    return table.cast(TRAIT_SCHEMA)


def _traits(run: Runner, plan: Plan, identities: ir.Table, events: ir.Table | None) -> ir.Table:
    ev = profile_events(run, identities) if events is None else events
    ev = ev.filter((ev.type == "identify") & ev.traits.notnull())
    tier = tier_expr(plan, ev.source, ev.context)
    # One unnest per select and a lookup by key: Spark allows a single generator per select.
    found = ev.select(
        "profile_id",
        "closure_id",
        "source",
        "message_id",
        observed_at=ev.timestamp,
        tier=tier,
        pairs=ev.traits.cast("json").map,
    )
    found = found.mutate(name=found.pairs.keys().unnest())
    found = found.mutate(value=found.pairs[found.name].cast("string")).drop("pairs")
    found = found.filter(found.value.notnull() & (found.value != "null"))
    rank = found.tier.cases(*[(t, i) for i, t in enumerate(TIERS)], else_=len(TIERS))
    best_first = ibis.window(
        group_by=[found.profile_id, found.name],
        order_by=[
            rank,
            ibis.desc(found.observed_at),
            ibis.desc(found.message_id),
            ibis.desc(found.source),
        ],
    )
    ranked = found.mutate(
        rn=ibis.row_number().over(best_first),
        candidates=found.count().over(group_by=[found.profile_id, found.name]),
    )
    best = ranked.filter(ranked.rn == 0)
    return best.select(
        "profile_id",
        "closure_id",
        "name",
        "value",
        "source",
        "tier",
        "observed_at",
        "message_id",
        "candidates",
    )
