"""Destinations declared in the plan: where data goes, for which purpose, in which shape.

Kinds:
- `webhook`: real-time events and segment changes as signed JSON POSTs;
- `google_customer_match`, `meta_custom_audience`: hashed customer lists of segments;
- `file`: CSV or Parquet of a segment with chosen traits;
- `partner_export`: a file for a partner or broker that excludes everyone who opted out of
  sale or sharing or lacks consent for the purpose, with a manifest of what was shared.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DestinationKind = Literal[
    "webhook", "google_customer_match", "meta_custom_audience", "file", "partner_export"
]
# Kinds that hand people to a third party (ad platforms, partners and brokers).
SHARING_KINDS = ("google_customer_match", "meta_custom_audience", "partner_export")
_INTERVAL = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_seconds(text: str) -> int:
    """'30s', '15m', '1h' or '1d' as seconds."""
    match = _INTERVAL.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an interval; write for example 15m, 1h or 1d")
    return int(match.group(1)) * _SECONDS[match.group(2)]


META_API = "https://graph.facebook.com/v21.0"
GOOGLE_ADS_API = "https://googleads.googleapis.com/v18"


class Upload(BaseModel):
    """Credentials for sending a customer list to the ad platform itself (use ${VAR})."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_token: str = Field(min_length=1)  # Meta: a system-user token; Google: OAuth token
    audience_id: str | None = None  # Meta: the Custom Audience's id
    customer_id: str | None = None  # Google Ads: the account, digits only
    user_list_id: str | None = None  # Google Ads: the Customer Match list's id
    developer_token: str | None = None  # Google Ads API developer token
    login_customer_id: str | None = None  # Google Ads: the manager account, if any
    api_url: str | None = None  # the platform's API root (for a proxy or a test double)
    timeout: float = Field(30.0, gt=0, le=300)


class Destination(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]*$")
    kind: DestinationKind
    purpose: str  # consent (or another basis) for this purpose is checked at the moment of use
    description: str | None = None
    recipient: str | None = None  # who receives the data, for the register and manifests
    url: str | None = None  # webhook endpoint
    secret: str | None = None  # webhook signing secret (use ${VAR})
    events: list[str] = Field(default_factory=list)  # real-time events to forward
    segments: list[str] = Field(default_factory=list)  # audiences to sync
    traits: list[str] = Field(default_factory=list)  # traits in files and payloads
    mapping: dict[str, str] = Field(default_factory=dict)  # output field -> Kilde field
    schedule: str | None = None  # audience sync interval, e.g. 1h
    format: Literal["csv", "parquet"] = "csv"
    directory: str = "exports"  # files, under the data directory unless absolute
    rate_limit: float = Field(20.0, gt=0)  # webhook requests per second
    max_attempts: int = Field(8, ge=1, le=100)
    timeout: float = Field(10.0, gt=0, le=120)
    upload: Upload | None = None  # ad-platform lists: also send them to the platform

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            interval_seconds(value)
        return value

    @model_validator(mode="after")
    def _kind_needs(self) -> Destination:
        if self.kind == "webhook":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError("a webhook needs an http(s) url")
            if not self.secret or len(self.secret) < 16:
                raise ValueError("a webhook needs a secret of at least 16 characters to sign with")
            if not self.events and not self.segments:
                raise ValueError("a webhook needs events or segments to send")
        elif not self.segments:
            raise ValueError(f"a {self.kind} destination needs the segments to send")
        if self.upload is not None:
            self._upload_needs(self.upload)
        return self

    def _upload_needs(self, upload: Upload) -> None:
        if self.kind == "meta_custom_audience":
            if not upload.audience_id:
                raise ValueError("a Meta upload needs the audience_id of the Custom Audience")
        elif self.kind == "google_customer_match":
            missing = [
                k
                for k in ("customer_id", "user_list_id", "developer_token")
                if not getattr(upload, k)
            ]
            if missing:
                raise ValueError(f"a Google Ads upload needs {', '.join(missing)}")
        else:
            raise ValueError("only google_customer_match and meta_custom_audience can upload")
        if upload.api_url is not None and not upload.api_url.startswith(("http://", "https://")):
            raise ValueError("upload.api_url must be an http(s) url")


def destination_problems(data: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross checks of `destinations` against purposes, events and traits (on the raw YAML)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    items = data.get("destinations")
    if not isinstance(items, list):
        return problems

    def names(section: str, key: str) -> set[Any]:
        value = data.get(section)
        return (
            {i.get(key) for i in value if isinstance(i, Mapping)}
            if isinstance(value, list)
            else set()
        )

    purposes, events, traits = (
        names("purposes", "id"),
        names("events", "name"),
        names("traits", "name"),
    )
    bases = {
        p.get("id"): p.get("legal_basis")
        for p in data.get("purposes") or []
        if isinstance(p, Mapping)
    }
    seen: set[Any] = set()
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        if item.get("name") in seen:
            problems.append((("destinations", index, "name"), "declared twice"))
        seen.add(item.get("name"))
        if item.get("purpose") not in purposes:
            problems.append(
                (("destinations", index, "purpose"), "not a purpose of the plan; declare it first")
            )
        elif item.get("kind") in SHARING_KINDS and bases.get(item.get("purpose")) != "consent":
            problems.append(
                (
                    ("destinations", index, "purpose"),
                    f"a {item.get('kind')} destination shares people with a third party; "
                    "its purpose must rest on consent (legal_basis: consent)",
                )
            )
        for e_index, event in enumerate(item.get("events") or []):
            if event not in events:
                problems.append(
                    (
                        ("destinations", index, "events", e_index),
                        f"event {event!r} is not in the plan",
                    )
                )
        mapping = item.get("mapping")
        if isinstance(mapping, Mapping):
            for out, source in mapping.items():
                problem = mapping_problem(data, item, source)
                if problem:
                    problems.append((("destinations", index, "mapping", out), problem))
        for t_index, trait in enumerate(item.get("traits") or []):
            if trait not in traits:
                problems.append(
                    (
                        ("destinations", index, "traits", t_index),
                        f"trait {trait!r} is not in the plan",
                    )
                )
    return problems


# What a webhook mapping may read: the event's own fields, and its properties and traits.
MAPPABLE_FIELDS = ("message_id", "source", "type", "event", "user_id", "anonymous_id", "timestamp")
SEGMENT_EVENTS = ("Segment Entered", "Segment Exited")


def _declared_properties(data: Mapping[str, Any], event_names: set[Any]) -> set[str] | None:
    """Property names the named events declare; None when one of them allows any property."""
    names: set[str] = set()
    for spec in data.get("events") or []:
        if not isinstance(spec, Mapping) or spec.get("name") not in event_names:
            continue
        schema = spec.get("properties")
        declared = schema.get("properties") if isinstance(schema, Mapping) else None
        if not isinstance(declared, Mapping):
            return None
        names.update(str(k) for k in declared)
    return names


def mapping_problem(data: Mapping[str, Any], item: Mapping[str, Any], source: Any) -> str | None:
    """Why a mapping's source field cannot exist in what the destination sends, or None."""
    if not isinstance(source, str) or not source:
        return "map to a field name such as user_id or properties.order_id"
    root, _, rest = source.partition(".")
    hint = (
        f"one of {', '.join(MAPPABLE_FIELDS)}, properties.NAME (a property of the events sent) "
        "or traits.NAME (a trait of the plan)"
    )
    if root in MAPPABLE_FIELDS:
        return None if not rest else f"{root!r} has no fields; map to {hint}"
    if root == "traits":
        traits = {t.get("name") for t in data.get("traits") or [] if isinstance(t, Mapping)}
        head = rest.split(".", 1)[0]
        if rest and head not in traits:
            return f"unknown field {source!r}: trait {head!r} is not in the plan"
        return None
    if root == "properties":
        events = set(item.get("events") or [])
        if item.get("segments"):
            events.update(SEGMENT_EVENTS)
        declared = _declared_properties(data, events)
        head = rest.split(".", 1)[0]
        if rest and declared is not None and head not in declared:
            return (
                f"unknown field {source!r}: no event this destination sends declares "
                f"a property {head!r}"
            )
        return None
    return f"unknown field {source!r}; map to {hint}"
