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

from kilde.identity.identifiers import (
    EMAIL_PATTERN,
    JUNK_VALUES,
    MAX_LENGTH,
    REPEATED_JUNK,
    Normaliser,
)

RECORD_COLUMNS = (
    "source",
    "message_id",
    "ts",
    "received_at",
    "kind",
    "primary_type",
    "primary_value",
    "dropped",
    "write_seq",
)
OBSERVATION_COLUMNS = ("source", "message_id", "ts", "id_type", "id_value", "role")
_RICH_MARKERS = ('"traits"', '"externalIds"', '"advertisingId"')


_PYTHON_TRAITS = ("phone", "email_sha256", "sha256_email", "hashed_email")


def _present(value: ir.Value) -> ir.BooleanValue:
    """A JSON member that is there and not JSON null."""
    return value.notnull() & (value.cast("string") != "null")


def is_rich(events: ir.Table) -> ir.BooleanValue:
    """Records that need the Python normaliser (see the module docstring).

    Identify calls whose only identifier trait is a plain ASCII email string are normalised
    set-based too; phones (libphonenumber), hashed emails and anything unusual go to Python.
    """
    context = events.context.cast("string").fill_null("")
    marked = ibis.literal(False)
    for marker in _RICH_MARKERS:
        marked = marked | context.contains(marker)
    traits = events.traits.cast("json")
    python_traits = ibis.literal(False)
    for key in _PYTHON_TRAITS:
        python_traits = python_traits | _present(traits[key])
    email = traits["email"]
    odd_email = _present(email) & (email.str.isnull() | email.str.re_search(r"[^\x00-\x7f]"))
    identify = (events.type == "identify") & (events.traits.isnull() | python_traits | odd_email)
    return identify | (events.type == "alias") | marked


def plain_id(column: ir.StringValue, normaliser: Normaliser) -> ir.StringValue:
    """`Normaliser.plain_id` as an expression: trimmed, or NULL for junk."""
    text = column.strip()
    return _plain(column, text, text.lower(), normaliser)


def _plain(
    column: ir.StringValue, text: ir.StringValue, low: ir.StringValue, normaliser: Normaliser
) -> ir.StringValue:
    """`plain_id` from the value, its trimmed text and that lower-cased."""
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


def _is_junk(text: ir.StringValue, normaliser: Normaliser) -> ir.BooleanValue:
    low = text.strip().lower()
    return low.isin(sorted(normaliser.junk | JUNK_VALUES)) | low.re_search(REPEATED_JUNK)


def email(raw: ir.StringValue, normaliser: Normaliser) -> ir.StringValue:
    """`Normaliser.email` as an expression (for ASCII addresses; others go to Python)."""
    text = raw.strip().lower()
    text = ibis.ifelse(text.startswith("mailto:"), text.substr(7), text)
    return _email_of_text(text, normaliser)


def simple_raw(events: ir.Table) -> ir.Table:
    """Stage 1 of `simple`: the simple records with their raw identifier values.

    Materialise this (and `simple_texts`) when it runs over many events: the normalising
    expressions use their input many times over, and an engine that inlines the stages
    would read the JSON and trim the strings once per use instead of once.
    """
    rows = events.filter(~is_rich(events))
    raw_email = ibis.ifelse(
        rows.type == "identify", rows.traits.cast("json")["email"].str, ibis.null().cast("string")
    )
    user_text = rows.user_id.strip()
    anon_text = rows.anonymous_id.strip()
    return rows.select(
        "source",
        "message_id",
        ts=rows.timestamp,
        received_at=rows.received_at,
        write_seq=rows.write_seq,
        kind=rows.type,
        raw_user=rows.user_id,
        raw_anon=rows.anonymous_id,
        raw_email=raw_email,
        user_text=user_text,
        user_low=user_text.lower(),
        anon_text=anon_text,
        anon_low=anon_text.lower(),
    )


def simple_texts(raw: ir.Table, normaliser: Normaliser) -> ir.Table:
    """Stage 2 of `simple`: plain ids normalised, the email trimmed, lower-cased, no mailto:."""
    user = _plain(raw.raw_user, raw.user_text, raw.user_low, normaliser)
    anon = _plain(raw.raw_anon, raw.anon_text, raw.anon_low, normaliser)
    text = raw.raw_email.strip().lower()
    text = ibis.ifelse(text.startswith("mailto:"), text.substr(7), text)
    given = raw.raw_email.notnull() & (raw.raw_email != "")
    return raw.select(
        "source",
        "message_id",
        "ts",
        "received_at",
        "write_seq",
        "kind",
        user=user,
        anon=anon,
        user_junk=raw.raw_user.notnull() & (raw.raw_user != "") & user.isnull(),
        anon_junk=raw.raw_anon.notnull() & (raw.raw_anon != "") & anon.isnull(),
        email_text=ibis.ifelse(given, text, ibis.null().cast("string")),
        email_raw_junk=given & _is_junk(raw.raw_email, normaliser),
    )


def simple_emails(texts: ir.Table, normaliser: Normaliser) -> ir.Table:
    """Stage 3 of `simple`: the email validated and folded (the columns of `simple`)."""
    # A column of its own, so the SQL validates it once, not once per use below: the three
    # copies made planning the incremental read cost more than running it.
    texts = texts.mutate(email=_email_of_text(texts.email_text, normaliser))
    mail = texts.email
    given = texts.email_text.notnull()
    return texts.select(
        "source",
        "message_id",
        "ts",
        "received_at",
        "write_seq",
        "kind",
        "user",
        "anon",
        "user_junk",
        "anon_junk",
        "email",
        email_sha256=mail.hexdigest("sha256"),
        email_dropped=ibis.cases(
            (given & mail.isnull() & texts.email_raw_junk, "junk"),
            (given & mail.isnull(), "invalid"),
            else_=None,
        ),
    )


def _email_of_text(text: ir.StringValue, normaliser: Normaliser) -> ir.StringValue:
    valid = text.re_search(EMAIL_PATTERN) & (text.length() <= 254) & ~_is_junk(text, normaliser)
    local = text.split("@")[0]
    domain = text.split("@")[1]
    if normaliser.rules.fold_plus_addressing:
        local = local.split("+")[0]
    folded = local + "@" + domain
    good = valid & (local.length() > 0) & ~_is_junk(folded, normaliser)
    return ibis.ifelse(good, folded, ibis.null().cast("string"))


def simple(events: ir.Table, normaliser: Normaliser) -> ir.Table:
    """Simple records with their normalised ids: one row per record (the three stages)."""
    return simple_emails(simple_texts(simple_raw(events), normaliser), normaliser)


SIMPLE_TYPES = ("user_id", "anonymous_id", "email", "email_sha256")


def _columns(ids: ir.Table) -> dict[str, ir.StringValue]:
    return {
        "user_id": ids.user,
        "anonymous_id": ids.anon,
        "email": ids.email,
        "email_sha256": ids.email_sha256,
    }


def simple_records(ids: ir.Table, normaliser: Normaliser) -> ir.Table:
    columns = _columns(ids)
    ordered = sorted(SIMPLE_TYPES, key=lambda t: normaliser.rank[t])
    primary_type = ibis.cases(
        *[(columns[t].notnull(), t) for t in ordered], else_=ibis.null().cast("string")
    )
    primary_value = ibis.coalesce(*[columns[t] for t in ordered])
    parts = [
        ibis.ifelse(ids.user_junk, '["userId","junk"]', ibis.null().cast("string")),
        ibis.ifelse(ids.anon_junk, '["anonymousId","junk"]', ibis.null().cast("string")),
        ibis.ifelse(
            ids.email_dropped.notnull(),
            '["traits.email","' + ids.email_dropped + '"]',
            ibis.null().cast("string"),
        ),
    ]
    joined = ibis.literal(",").join(parts)  # NULLs are skipped
    dropped = ibis.ifelse(joined == "", ibis.null().cast("string"), "[" + joined + "]")
    return ids.select(
        "source",
        "message_id",
        "ts",
        "received_at",
        "kind",
        primary_type=primary_type,
        primary_value=primary_value,
        dropped=dropped.cast("json"),
        write_seq=ids.write_seq,
    )


def simple_observations(ids: ir.Table) -> ir.Table:
    parts = [
        ids.filter(value.notnull()).select(
            "source", "message_id", "ts", id_type=ibis.literal(id_type), id_value=value
        )
        for id_type, value in _columns(ids).items()
    ]
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.union(part)
    return rows.mutate(role=ibis.literal("self"))
