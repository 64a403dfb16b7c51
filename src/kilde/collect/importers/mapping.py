"""Mappings: which column of a file holds which Kilde field, from a YAML file or guessed.

A mapping file is small YAML; anything it does not name is detected from common column names
(`Order No.`, `customer_id`, `E-mail`, ...). See docs/importing.md for every key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kilde.collect.importers.base import ImportFailed, Kind
from kilde.plan.models import Plan

_IDENTITY = {
    "user_id": [
        "user_id",
        "userid",
        "customer_id",
        "customerid",
        "customer_no",
        "customer_number",
        "customer",
        "client_id",
        "contact_id",
        "crm_id",
        "member_id",
        "account_id",
        "kundenummer",
        "kundenr",
    ],
    "anonymous_id": ["anonymous_id", "anonymousid", "device_id", "cookie_id"],
    "email": ["email", "e_mail", "email_address", "mail", "epost", "e_post"],
}
FIELDS: dict[str, dict[str, list[str]]] = {
    "transactions": {
        **_IDENTITY,
        "timestamp": [
            "timestamp",
            "order_date",
            "ordered_at",
            "purchased_at",
            "purchase_date",
            "created_at",
            "date",
            "datetime",
            "time",
            "dato",
        ],
        "order_id": [
            "order_id",
            "orderid",
            "order_no",
            "order_number",
            "ordernumber",
            "order",
            "ordrenr",
            "invoice_id",
            "invoice_no",
            "transaction_id",
            "receipt_id",
        ],
        "revenue": [
            "revenue",
            "total",
            "order_total",
            "total_amount",
            "grand_total",
            "amount",
            "sum",
            "value",
            "belop",
        ],
        "currency": ["currency", "currency_code", "valuta"],
        "status": ["status", "order_status", "transaction_type", "type", "kind"],
        "refund_id": ["refund_id", "credit_note_id", "return_id"],
        "product_id": ["product_id", "productid", "item_id", "article_id"],
        "sku": ["sku", "article_number", "item_number", "varenr"],
        "product_name": ["product_name", "product", "item_name", "item", "title"],
        "category": ["category", "product_category"],
        "price": ["price", "unit_price", "item_price"],
        "quantity": ["quantity", "qty", "count", "antall"],
        "products": ["products", "items", "line_items"],
        "tax": ["tax", "vat", "mva"],
        "shipping": ["shipping", "shipping_cost", "freight"],
        "discount": ["discount"],
        "coupon": ["coupon", "coupon_code", "discount_code"],
    },
    "contacts": {
        **_IDENTITY,
        "timestamp": ["updated_at", "modified_at", "last_modified", "timestamp"],
    },
    "interactions": {
        **_IDENTITY,
        "timestamp": [
            "timestamp",
            "created_at",
            "opened_at",
            "date",
            "datetime",
            "time",
            "started_at",
        ],
        "interaction_id": [
            "interaction_id",
            "ticket_id",
            "ticket",
            "ticket_no",
            "case_id",
            "conversation_id",
            "call_id",
            "meeting_id",
            "id",
        ],
        "interaction_type": ["interaction_type", "type", "department", "team"],
        "channel": ["channel", "medium", "via", "source_channel"],
        "topic": ["topic", "subject", "category", "reason", "title"],
        "text": [
            "text",
            "body",
            "description",
            "message",
            "comment",
            "transcript",
            "notes",
            "content",
        ],
        "status": ["status", "state"],
    },
    "broker": {
        **_IDENTITY,
        "timestamp": ["updated_at", "observed_at", "timestamp"],
    },
    "social_login": {
        "user_id": ["user_id", "userid", "customer_id", "account_id"],
        "anonymous_id": ["anonymous_id", "anonymousid"],
        "provider": ["provider", "idp", "issuer", "iss"],
        "sub": ["sub", "subject", "provider_user_id"],
        "email": ["email"],
        "email_verified": ["email_verified"],
        "name": ["name"],
        "given_name": ["given_name", "first_name"],
        "family_name": ["family_name", "last_name"],
        "locale": ["locale"],
        "picture": ["picture", "avatar", "picture_url"],
        "timestamp": ["timestamp", "logged_in_at", "auth_time", "iat"],
    },
}
# Common column names of traits the plan may declare (used for contacts and broker files).
TRAIT_SYNONYMS: dict[str, list[str]] = {
    "first_name": ["first_name", "firstname", "given_name", "fornavn"],
    "last_name": ["last_name", "lastname", "surname", "family_name", "etternavn"],
    "name": ["name", "full_name", "fullname", "navn"],
    "phone": ["phone", "phone_number", "mobile", "telephone", "tel", "telefon", "mobil"],
    "city": ["city", "town", "poststed", "sted"],
    "country": ["country", "country_code", "land"],
    "created_at": [
        "created_at",
        "signup_date",
        "signed_up",
        "signed_up_at",
        "registered_at",
        "created",
    ],
}
_NORMAL = re.compile(r"[^a-z0-9]+")


def normal(name: str) -> str:
    """'Order No.' -> 'order_no'; 'E-mail' -> 'e_mail'."""
    return _NORMAL.sub("_", name.lower().replace("ø", "o").replace("å", "a")).strip("_")


class BrokerTerms(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # the data company that sold the file
    acquired: date | None = None  # when the file was bought
    licence_expires: date | None = None  # when the licence to use it ends
    purpose: str | None = None  # the plan purpose it is used for (gives the lawful basis)


class MappingFile(BaseModel):
    """The YAML mapping file."""

    model_config = ConfigDict(extra="forbid")
    kind: Kind | None = None
    format: Literal["csv", "jsonl", "parquet", "excel"] | None = None
    encoding: str | None = None
    delimiter: str | None = None
    sheet: str | None = None
    decimal: Literal[".", ","] | None = None
    timestamp_format: str | None = None
    timezone: str = "UTC"
    currency: str | None = None
    interaction: Literal["support", "sales"] | None = None
    refund_values: list[str] = Field(
        default_factory=lambda: [
            "refund",
            "refunded",
            "return",
            "returned",
            "credit",
            "credit_note",
        ]
    )
    columns: dict[str, str] = Field(default_factory=dict)
    traits: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, str] = Field(default_factory=dict)
    consents: dict[str, str] = Field(default_factory=dict)  # plan purpose -> yes/no column
    ignore: list[str] = Field(default_factory=list)
    broker: BrokerTerms = Field(default_factory=lambda: BrokerTerms())
    sentiment: str | None = None
    auto_detect: bool = True

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        if value is not None:
            value = {"\\t": "\t", "tab": "\t"}.get(value, value)
            if len(value) != 1:
                raise ValueError("the delimiter must be one character, like ';' or '\\t'")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not a time zone name like Europe/Oslo or UTC") from None
        return value


def load_mapping(path: Path | None) -> MappingFile:
    if path is None:
        return MappingFile()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError:
        raise ImportFailed(
            f"the mapping file {path} cannot be read", fix="check the path"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ImportFailed(
            f"the mapping file {path} is not valid YAML{where}", fix="correct the YAML syntax"
        ) from None
    return parse_mapping(raw, str(path))


def parse_mapping(raw: Any, name: str = "the mapping") -> MappingFile:
    if not isinstance(raw, dict):
        raise ImportFailed(f"{name} must be a YAML mapping of keys", fix="see docs/importing.md")
    try:
        return MappingFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ImportFailed(
            f"{name}: {where}: {first['msg']}",
            fix="see docs/importing.md for the keys a mapping may have",
        ) from None


@dataclass
class Resolved:
    """The mapping applied to one file's columns."""

    kind: Kind
    fields: dict[str, str] = field(default_factory=dict)  # Kilde field -> column
    traits: dict[str, str] = field(default_factory=dict)  # trait -> column
    properties: dict[str, str] = field(default_factory=dict)  # property -> column
    consents: dict[str, str] = field(default_factory=dict)  # purpose -> column (contacts)
    detected: set[str] = field(default_factory=set)  # fields found by name, not the mapping
    ignored: list[str] = field(default_factory=list)  # columns nobody uses

    def column(self, name: str) -> str | None:
        return self.fields.get(name)


def resolve(kind: Kind, columns: list[str], mapping: MappingFile, plan: Plan) -> Resolved:
    """Match the mapping and the detection rules against the file's columns."""
    present = set(columns)
    by_normal: dict[str, str] = {}
    for column in columns:
        by_normal.setdefault(normal(column), column)
    known = FIELDS[kind]
    resolved = Resolved(kind)
    problems = []
    for name, column in mapping.columns.items():
        if name not in known:
            problems.append(
                f"columns.{name} is not a field of {kind} imports (fields: {', '.join(known)})"
            )
        elif column not in present:
            problems.append(f"columns.{name}: the file has no column {column!r}")
        else:
            resolved.fields[name] = column
    for group, target in (
        (mapping.traits, resolved.traits),
        (mapping.properties, resolved.properties),
    ):
        label = "traits" if group is mapping.traits else "properties"
        for name, column in group.items():
            if column not in present:
                problems.append(f"{label}.{name}: the file has no column {column!r}")
            else:
                target[name] = column
    for purpose, column in mapping.consents.items():
        if kind != "contacts":
            problems.append(f"consents: only contacts imports record consent, not {kind}")
            break
        if plan.purpose(purpose) is None:
            problems.append(f"consents.{purpose}: the plan has no such purpose")
        elif column not in present:
            problems.append(f"consents.{purpose}: the file has no column {column!r}")
        else:
            resolved.consents[purpose] = column
    if problems:
        raise ImportFailed(
            "the mapping does not fit the file: " + "; ".join(problems),
            fix="correct the mapping; the file's columns are: " + ", ".join(columns),
        )
    taken = set(resolved.fields.values()) | set(resolved.traits.values())
    taken |= set(resolved.properties.values()) | set(mapping.ignore)
    taken |= set(resolved.consents.values())
    if mapping.auto_detect:
        for name, synonyms in known.items():
            if name in resolved.fields:
                continue
            for synonym in synonyms:
                found = by_normal.get(synonym)
                if found is not None and found not in taken:
                    resolved.fields[name] = found
                    resolved.detected.add(name)
                    taken.add(found)
                    break
        if kind in ("contacts", "broker"):
            declared = {t.name for t in plan.traits if t.scope == "user"}
            for trait in sorted(declared):
                if trait in resolved.traits or trait == "email":
                    continue
                for synonym in [trait, *TRAIT_SYNONYMS.get(trait, [])]:
                    found = by_normal.get(normal(synonym))
                    if found is not None and found not in taken:
                        resolved.traits[trait] = found
                        resolved.detected.add(f"traits.{trait}")
                        taken.add(found)
                        break
    resolved.ignored = [c for c in columns if c not in taken]
    return resolved
