"""Reading identifiers out of events, set-based where the record is simple.

Most records (page views, product views, ...) carry only a user id and an anonymous id. Their
identifiers are normalised as Ibis expressions (the same rules as `Normaliser.plain_id`), so a
rebuild over millions of events never loops over them in Python. Records that carry more
(identify traits, `context.traits`, external ids, advertising ids, aliases) go through
`Normaliser.of_record` in Python.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir

from kilde.identity.identifiers import JUNK_VALUES, MAX_LENGTH, REPEATED_JUNK, Normaliser

RECORD_COLUMNS = (
    "source",
    "message_id",
    "ts",
    "received_at",
    "kind",
    "primary_type",
    "primary_value",
    "dropped",
)
OBSERVATION_COLUMNS = ("source", "message_id", "ts", "id_type", "id_value", "role")
_RICH_MARKERS = ('"traits"', '"externalIds"', '"advertisingId"')


def is_rich(events: ir.Table) -> ir.BooleanValue:
    """Records that need the Python normaliser (see the module docstring)."""
    context = events.context.cast("string").fill_null("")
    marked = ibis.literal(False)
    for marker in _RICH_MARKERS:
        marked = marked | context.contains(marker)
    return (events.type == "identify") | (events.type == "alias") | marked


def plain_id(column: ir.StringValue, normaliser: Normaliser) -> ir.StringValue:
    """`Normaliser.plain_id` as an expression: trimmed, or NULL for junk."""
    text = column.strip()
    low = text.lower()
    repeated = low.re_search(REPEATED_JUNK)
    junk = sorted(normaliser.junk | JUNK_VALUES)
    bad = (
        column.isnull()
        | (text.length() == 0)
        | (text.length() > MAX_LENGTH)
        | low.isin(junk)
        | repeated
    )
    return ibis.ifelse(bad, ibis.null().cast("string"), text)


def simple(events: ir.Table, normaliser: Normaliser) -> ir.Table:
    """Simple records with their normalised ids: one row per record."""
    rows = events.filter(~is_rich(events))
    user = plain_id(rows.user_id, normaliser)
    anon = plain_id(rows.anonymous_id, normaliser)
    return rows.select(
        "source",
        "message_id",
        ts=rows.timestamp,
        received_at=rows.received_at,
        kind=rows.type,
        user=user,
        anon=anon,
        user_junk=rows.user_id.notnull() & user.isnull(),
        anon_junk=rows.anonymous_id.notnull() & anon.isnull(),
    )


def simple_records(ids: ir.Table, normaliser: Normaliser) -> ir.Table:
    user_first = normaliser.rank["user_id"] < normaliser.rank["anonymous_id"]
    first, second = (ids.user, ids.anon) if user_first else (ids.anon, ids.user)
    first_type, second_type = (
        ("user_id", "anonymous_id") if user_first else ("anonymous_id", "user_id")
    )
    primary_type = ibis.cases(
        (first.notnull(), first_type), (second.notnull(), second_type), else_=None
    )
    dropped = ibis.cases(
        (ids.user_junk & ids.anon_junk, '[["userId","junk"],["anonymousId","junk"]]'),
        (ids.user_junk, '[["userId","junk"]]'),
        (ids.anon_junk, '[["anonymousId","junk"]]'),
        else_=None,
    )
    return ids.select(
        "source",
        "message_id",
        "ts",
        "received_at",
        "kind",
        primary_type=primary_type,
        primary_value=ibis.coalesce(first, second),
        dropped=dropped.cast("json"),
    )


def simple_observations(ids: ir.Table) -> ir.Table:
    users = ids.filter(ids.user.notnull()).select(
        "source", "message_id", "ts", id_type=ibis.literal("user_id"), id_value=ids.user
    )
    anons = ids.filter(ids.anon.notnull()).select(
        "source", "message_id", "ts", id_type=ibis.literal("anonymous_id"), id_value=ids.anon
    )
    both = users.union(anons)
    return both.mutate(role=ibis.literal("self"))
