"""What every insight reads: the profiles' events, their orders, through the portable layer.

All of it is Ibis expressions over the store's tables, so the same code runs on DuckDB and
(later) on Spark. Values from users reach the backend as literals, never as SQL text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.store.database import Store

ORDER_EVENT = "Order Completed"
SIGNUP_EVENT = "Signed Up"
# Events Kilde records about its own computations (Segment Entered/Exited) carry no behaviour.
COMPUTED_EVENTS = ("Segment Entered", "Segment Exited")


def backend_of(store: Store) -> Any:
    """An Ibis backend over a fresh cursor of the store (one per thread)."""
    return ibis.duckdb.from_connection(store.cursor())


def with_profiles(backend: Any, events: ir.Table) -> ir.Table:
    """`events` (rows of the events table, filtered as needed) with their profile_id.

    An event belongs to the profile of its primary identifier (identity_records), the same
    reading the profiles themselves are built with. Filter first, then join: the engine then
    joins only the events asked about. The tables are joined as they are (no shared
    projection), so that several reads in one query each join their own few events instead
    of sharing one materialised join of all of them.
    """
    records = backend.table("identity_records")
    tagged = events.join(records, ["source", "message_id"])
    idmap = backend.table("identity_map")
    owned = tagged.join(
        idmap,
        [tagged.primary_type == idmap.id_type, tagged.primary_value == idmap.id_value],
    )
    joined: ir.Table = owned.select(*events.columns, "profile_id")
    return joined


def profile_events(backend: Any) -> ir.Table:
    """Every event of every current profile, with its profile_id.

    The identifiers' owners are joined as one table (source, message_id, profile_id): for the
    reads of all events (the profile insights hold this once per pass), and for reads that
    filter the same events several ways in one query (a funnel's steps), which then share one
    join narrowed by all their filters together.
    """
    idmap = backend.table("identity_map")
    owners = idmap.select(
        primary_type=idmap.id_type, primary_value=idmap.id_value, profile_id=idmap.profile_id
    )
    records = backend.table("identity_records")
    owned = records.join(owners, ["primary_type", "primary_value"]).select(
        "source", "message_id", "profile_id"
    )
    events: ir.Table = backend.table("events").join(owned, ["source", "message_id"])
    return events


def behaviour(backend: Any) -> ir.Table:
    """Profile events without Kilde's own computed events (held ones, see `hold_behaviour`).

    Besides the event's own columns (HELD_COLUMNS and properties) each row carries what the
    insights derive from it over and over: `seconds` (since the epoch), `product_id` (of a
    viewed or added product) and `revenue` (of an order). Unused, they cost nothing (the
    engine prunes them); held, they are computed once per pass instead of once per insight.
    """
    held: ir.Table | None = getattr(backend, _HELD, None)
    ev = _derived(profile_events(backend)) if held is None else held
    return ev.filter(ev.event.isnull() | ~ev.event.isin(COMPUTED_EVENTS))


def _derived(ev: ir.Table) -> ir.Table:
    props = ev.properties.cast("json")
    return ev.mutate(
        # float: DuckDB's epoch keeps the fraction of a second (whole seconds on Spark)
        seconds=ev.timestamp.epoch_seconds().cast("float64"),
        product_id=ibis.ifelse(
            ev.event.isin(PRODUCT_EVENTS), props["product_id"].str, ibis.null("string")
        ),
        revenue=ibis.ifelse(
            ev.event == ORDER_EVENT, props["revenue"].float.fill_null(0.0), ibis.null("float64")
        ),
    )


_HELD = "_kilde_behaviour"
# What the profile insights read of each event (the held table has these and no others).
HELD_COLUMNS = ("profile_id", "source", "message_id", "event", "timestamp")
DERIVED_COLUMNS = ("seconds", "product_id", "revenue")
# Events about one product (its product_id is a property); orders list theirs in `products`.
PRODUCT_EVENTS = ("Product Viewed", "Product Added")


@contextmanager
def hold_behaviour(backend: Any) -> Iterator[None]:
    """Join the events to their profiles once, and let every `behaviour` read that result.

    For computations that read the profiles' events many times over (the profile insights):
    the backend keeps the joined events (these columns only, with the derived ones, and the
    properties of orders only) until the block ends.
    """
    # Kilde's own events are left out when read (`behaviour`), not here: a filter on the events
    # would make the engine hold the wide events, not the narrow owners, in the join's table.
    ev = _derived(profile_events(backend))
    # Past the derived columns, only an order's own properties are still read (its products).
    held = ev.select(
        *HELD_COLUMNS,
        *DERIVED_COLUMNS,
        properties=ibis.ifelse(ev.event == ORDER_EVENT, ev.properties, ibis.null("json")),
    ).cache()
    setattr(backend, _HELD, held)
    try:
        yield
    finally:
        setattr(backend, _HELD, None)
        with contextlib.suppress(Exception):
            held.release()


def orders(backend: Any) -> ir.Table:
    """profile_id, timestamp, revenue, message_id of every completed order."""
    ev = behaviour(backend)
    ev = ev.filter(ev.event == ORDER_EVENT)
    return ev.select("profile_id", "timestamp", "message_id", "source", "revenue")


def days_between(
    later: ir.TimestampValue | datetime, earlier: ir.TimestampValue
) -> ir.FloatingValue:
    """Whole and fractional days from `earlier` to `later`."""
    later_expr = ibis.literal(later) if isinstance(later, datetime) else later
    seconds = later_expr.epoch_seconds() - earlier.epoch_seconds()
    result: ir.FloatingValue = seconds.cast("float64") / 86400.0
    return result


def table_exists(store: Store, name: str) -> bool:
    return bool(
        store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])
    )
