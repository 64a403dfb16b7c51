"""What the kinds share when turning rows into Segment messages: identity, time, traits."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from kilde.collect.importers import values
from kilde.collect.importers.base import Kind, Row, RowError, Tier, email_anonymous_id
from kilde.collect.importers.mapping import MappingFile, Resolved
from kilde.plan.models import Plan, TraitSpec


class RowProblem(Exception):
    """A row cannot become a record; carries the column and never the value."""

    def __init__(self, column: str | None, code: str, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.column = column
        self.code = code
        self.reason = reason
        self.fix = fix

    def at(self, line: int) -> RowError:
        return RowError(line, self.column, self.code, self.reason, self.fix)


@dataclass
class Context:
    """Everything a kind needs besides the rows."""

    kind: Kind
    source: str
    plan: Plan
    mapping: MappingFile
    resolved: Resolved
    file_name: str
    run_id: str | None = None
    tier: Tier = "first_party"
    provenance: dict[str, Any] = field(default_factory=dict)  # extra, e.g. the broker's terms
    zone: tzinfo = UTC
    traits: dict[str, TraitSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.zone = ZoneInfo(self.mapping.timezone) if self.mapping.timezone != "UTC" else UTC
        self.traits = {t.name: t for t in self.plan.traits if t.scope == "user"}
        self._pairs = list(self.resolved.fields.items())

    def fields_of(self, row: Row) -> dict[str, Any]:
        """The row's Kilde fields: blank cells left out, text stripped; computed once."""
        found = row.fields
        if found is None:
            found = {}
            values_get = row.values.get
            for name, column in self._pairs:
                value = values_get(column)
                if value is None:
                    continue
                if type(value) is str:
                    value = value.strip()
                    if not value:
                        continue
                found[name] = value
            row.fields = found
        return found

    def context_for(self, line: int) -> dict[str, Any]:
        provenance = {
            "tier": self.tier,
            "kind": self.kind,
            "file": self.file_name,
            "line": line,
            **self.provenance,
        }
        if self.run_id:
            provenance["import_run"] = self.run_id
        return {"provenance": provenance}


def cell(row: Row, ctx: Context, name: str) -> Any:
    """The value of a Kilde field in a row, or None when blank or not mapped."""
    return ctx.fields_of(row).get(name)


def text_cell(row: Row, ctx: Context, name: str) -> str | None:
    value = ctx.fields_of(row).get(name)
    return value if value is None or type(value) is str else values.text(value)


def _text(value: Any) -> str | None:
    return value if value is None or type(value) is str else values.text(value)


def email_key(email: str) -> str:
    return email.strip().lower()


def identity(row: Row, ctx: Context) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(ids for the message, context.externalIds, a stable key of the person).

    A person known only by an email address gets an anonymous id derived from that address,
    so every import of the same address lands on the same id; the address itself goes into
    context.externalIds for identity resolution.
    """
    found = ctx.fields_of(row)
    user_id = _text(found.get("user_id"))
    anonymous_id = _text(found.get("anonymous_id"))
    email = _text(found.get("email"))
    external: list[dict[str, Any]] = []
    if email is not None:
        if "@" not in email:
            raise RowProblem(
                ctx.resolved.fields.get("email"),
                "invalid_email",
                "is not an email address",
                "correct the address or leave the cell empty",
            )
        external.append(
            {"id": email_key(email), "type": "email", "collection": "users", "encoding": "none"}
        )
    ids: dict[str, Any] = {}
    if user_id is not None:
        ids["userId"] = user_id
    if anonymous_id is not None:
        ids["anonymousId"] = anonymous_id
    if not ids and email is not None:
        ids["anonymousId"] = email_anonymous_id(email)
    if not ids:
        mapped = [ctx.resolved.fields[f] for f in ("user_id", "email") if f in ctx.resolved.fields]
        raise RowProblem(
            None,
            "missing_identifier",
            "the row names nobody: "
            + (
                f"{' and '.join(mapped)} {'are' if len(mapped) > 1 else 'is'} empty"
                if mapped
                else "no id column"
            ),
            "fill in a customer id or an email address; map the id column with "
            "`columns: {user_id: ...}` or `columns: {email: ...}`",
        )
    key = user_id or anonymous_id or email_key(email or "")
    return ids, external, key


def when(row: Row, ctx: Context, *, required: bool) -> str | None:
    raw = ctx.fields_of(row).get("timestamp")
    column = ctx.resolved.fields.get("timestamp")
    if raw is None:
        if required:
            raise RowProblem(
                column,
                "missing_date",
                "the date is empty" if column else "the file has no date column",
                "fill in the date, or map the date column with `columns: {timestamp: ...}`",
            )
        return None
    try:
        return values.iso(values.timestamp(raw, ctx.mapping.timestamp_format, ctx.zone))
    except values.ValueProblem as problem:
        raise RowProblem(column, problem.code, problem.reason, problem.fix) from None


def traits_of(row: Row, ctx: Context) -> dict[str, Any]:
    """Mapped traits, typed as the plan declares them; blank cells are left out."""
    traits: dict[str, Any] = {}
    for name, column in ctx.resolved.traits.items():
        raw = row.values.get(column)
        if values.is_blank(raw):
            continue
        spec = ctx.traits.get(name)
        try:
            traits[name] = values.typed(raw, spec.type) if spec else raw
        except values.ValueProblem as problem:
            raise RowProblem(column, problem.code, problem.reason, problem.fix) from None
    return traits


def properties_of(row: Row, ctx: Context) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, column in ctx.resolved.properties.items():
        raw = row.values.get(column)
        if not values.is_blank(raw):
            props[name] = raw
    return props
