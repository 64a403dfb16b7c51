"""CRM contacts: each row becomes an identify call with the traits the plan declares.

Consent kept in the CRM (a yes/no column per purpose, `consents:` in the mapping) travels with
the identify call as Segment's `context.consent.categoryPreferences`, so the pipeline records it
in the consent ledger (channel `import`, evidence naming the file and line) when it changes.

The record key is the person plus what the row says about them: importing the same export again
stores nothing twice, while next month's export (with changed traits) is stored as new
identify calls.
"""

from __future__ import annotations

from typing import Any

from kilde.collect.importers.base import (
    Converted,
    ImportFailed,
    Record,
    Row,
    content_key,
    message_id,
)
from kilde.collect.importers.convert import Context, RowProblem, identity, traits_of, when
from kilde.collect.importers.values import ValueProblem, boolean, is_blank


def consents_of(row: Row, ctx: Context) -> dict[str, bool]:
    """{purpose: granted?} from the row's consent columns; blank cells say nothing."""
    choices: dict[str, bool] = {}
    for purpose, column in ctx.resolved.consents.items():
        raw = row.values.get(column)
        if is_blank(raw):
            continue
        try:
            choices[purpose] = boolean(raw)
        except ValueProblem as problem:
            raise RowProblem(column, problem.code, problem.reason, problem.fix) from None
    return choices


def identify_message(row: Row, ctx: Context) -> dict[str, Any]:
    ids, external, person = identity(row, ctx)
    traits = traits_of(row, ctx)
    email_column = ctx.resolved.fields.get("email")
    if email_column and "email" in ctx.traits and external:
        traits.setdefault("email", row.values[email_column].strip())
    consents = consents_of(row, ctx)
    if not traits and not consents:
        raise RowProblem(
            None,
            "no_traits",
            "the row has no trait values",
            "fill in at least one trait, or map columns to traits with `traits: {...}`",
        )
    timestamp = when(row, ctx, required=False)
    key = f"{ctx.tier}\x1f{person}\x1f{content_key(traits)}"
    if consents:  # a changed choice is a new record; rows without one keep their old keys
        key += f"\x1f{content_key(consents)}"
    context = ctx.context_for(row.line)
    if external:
        context["externalIds"] = external
    if consents:
        context["consent"] = {"categoryPreferences": consents}
    message: dict[str, Any] = {
        "type": "identify",
        "messageId": message_id(ctx.source, ctx.kind, key),
        **ids,
        "traits": traits,
        "context": context,
    }
    if timestamp is not None:
        message["timestamp"] = timestamp
    return message


class ContactConverter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        fields = ctx.resolved.fields
        if not any(f in fields for f in ("user_id", "email", "anonymous_id")):
            raise ImportFailed(
                "no customer id or email column was found",
                fix="map one in the mapping file: `columns: {user_id: <column>}` or "
                "`columns: {email: <column>}`",
            )
        if not ctx.resolved.traits and "email" not in fields:
            raise ImportFailed(
                "no column matches a trait of the collection plan",
                fix="map columns to traits in the mapping file (`traits: {city: Town}`) and "
                "declare those traits in the plan",
            )

    def feed(self, rows: list[Row]) -> Converted:
        out = Converted()
        for row in rows:
            try:
                out.records.append(Record(row.line, identify_message(row, self.ctx)))
            except RowProblem as problem:
                out.errors.append(problem.at(row.line))
        return out

    def finish(self) -> Converted:
        return Converted()
