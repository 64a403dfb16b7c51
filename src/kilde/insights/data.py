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
    """Profile events without Kilde's own computed events (held ones, see `hold_behaviour`)."""
    held: ir.Table | None = getattr(backend, _HELD, None)
    if held is not None:
        return held
    ev = profile_events(backend)
    return ev.filter(ev.event.isnull() | ~ev.event.isin(COMPUTED_EVENTS))


_HELD = "_kilde_behaviour"
HELD_COLUMNS = ("profile_id", "source", "message_id", "type", "event", "timestamp", "properties")


@contextmanager
def hold_behaviour(backend: Any) -> Iterator[None]:
    """Join the events to their profiles once, and let every `behaviour` read that result.

    For computations that read the profiles' events many times over (the profile insights):
    the backend keeps the joined events (these columns only) until the block ends.
    """
    held = behaviour(backend).select(*HELD_COLUMNS).cache()
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
