"""What every insight reads: the profiles' events, their orders, through the portable layer.

All of it is Ibis expressions over the store's tables, so the same code runs on DuckDB and
(later) on Spark. Values from users reach the backend as literals, never as SQL text.
"""

from __future__ import annotations

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


def profile_events(backend: Any) -> ir.Table:
    """Every event of every current profile, with its profile_id.

    An event belongs to the profile of its primary identifier (identity_records), the same
    reading the profiles themselves are built with.
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
    """Profile events without Kilde's own computed events."""
    ev = profile_events(backend)
    return ev.filter(ev.event.isnull() | ~ev.event.isin(COMPUTED_EVENTS))


def orders(backend: Any) -> ir.Table:
    """profile_id, timestamp, revenue, message_id of every completed order."""
    ev = profile_events(backend)
    ev = ev.filter(ev.event == ORDER_EVENT)
    props = ev.properties.cast("json")
    return ev.select(
        "profile_id",
        "timestamp",
        "message_id",
        "source",
        revenue=props["revenue"].float.fill_null(0.0),
    )


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
