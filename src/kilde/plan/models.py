"""Pydantic models of the collection plan.

The plan says why each datum is collected (purposes with a legal basis), who collects it and
with which tool (sources), what it must look like (events with JSON Schemas, traits with types)
and how long it is kept (retention). Unknown keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, cast

import fastjsonschema
from jsonschema import Draft7Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kilde.plan.destinations import Destination
from kilde.plan.forms import Form
from kilde.plan.segments import Segments

SourceKind = Literal["web", "server", "app", "email", "form", "import", "broker"]
SourceMode = Literal["strict", "warn"]
LegalBasis = Literal[
    "consent",
    "contract",
    "legitimate_interest",
    "legal_obligation",
    "vital_interest",
    "public_task",
]
TraitType = Literal["string", "number", "integer", "boolean", "datetime", "object", "array"]
PiiClass = Literal["none", "pseudonymous", "indirect", "direct", "sensitive"]
EventType = Literal["track", "page", "screen"]
IpPolicy = Literal["truncate", "full", "drop"]

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
_RETENTION = re.compile(r"^\s*(\d+)\s*(d|day|days|w|week|weeks|m|month|months|y|year|years)\s*$")
_DAYS_PER_UNIT = {"d": 1, "w": 7, "m": 30, "y": 365}


def _refuse_remote(uri: str) -> Any:
    raise ValueError("a $ref to another document is not supported; put the definition in the plan")


class _NoRemoteRefs(dict[str, Callable[[str], Any]]):
    """fastjsonschema fetches `$ref`s it has no handler for; this handles every scheme."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> Callable[[str], Any]:
        return _refuse_remote


def compile_schema(schema: dict[str, Any]) -> Callable[[Any], Any]:
    """A fast validator for an event's properties; never reaches the network or the disk."""
    return fastjsonschema.compile(schema, handlers=_NoRemoteRefs())


def schema_problem(schema: Any) -> tuple[tuple[str | int, ...], str] | None:
    """(path inside the schema, message) of what makes `schema` invalid, or None."""
    try:
        Draft7Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top)"
        return tuple(exc.path), f"not a valid JSON Schema at {where}: {exc.message}"
    try:
        compile_schema(schema)
    except Exception as exc:  # fastjsonschema raises several kinds; all mean "cannot use it"
        return (), f"the JSON Schema cannot be compiled: {exc}"
    return None


def retention_days(text: str) -> int:
    """Turn '13 months', '90d' or '2y' into a number of days."""
    match = _RETENTION.match(text.lower())
    if not match:
        raise ValueError(
            f"retention {text!r} is not understood; write a number and a unit, "
            "for example '90 days', '13 months' or '2 years'"
        )
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)[0]]


_HEX_COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})\Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Company(_Strict):
    name: str
    website: str | None = None
    contact: str | None = None
    primary_color: str = "#2f6f5e"

    @field_validator("primary_color")
    @classmethod
    def _color_shape(cls, value: str) -> str:
        # It goes into the style of forms, mails and pages: a colour, and nothing that could
        # end the style and start other CSS or HTML.
        if not _HEX_COLOR.match(value):
            raise ValueError("use a hex colour such as #2f6f5e or #363")
        return value


class Goal(_Strict):
    id: str
    description: str
    metrics: list[str] = Field(default_factory=list)


class Source(_Strict):
    name: str
    kind: SourceKind
    owner: str
    tool: str
    description: str | None = None
    mode: SourceMode = "strict"
    write_keys: list[str] = Field(default_factory=list)
    revoked_write_keys: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits, '-' and '_', starting with a letter")
        return value

    @field_validator("write_keys", "revoked_write_keys")
    @classmethod
    def _keys_shape(cls, value: list[str]) -> list[str]:
        for key in value:
            if len(key) < 8:
                raise ValueError("a write key must be at least 8 characters long")
        return value


class Purpose(_Strict):
    id: str
    description: str
    legal_basis: LegalBasis
    double_opt_in: bool = False
    # CCPA "sale or sharing" (e.g. cross-context behavioural advertising): a Global Privacy
    # Control signal opts the person out of this purpose.
    sale_or_sharing: bool = False


class EventSpec(_Strict):
    name: str | None = None
    type: EventType = "track"
    description: str | None = None
    purposes: list[str] = Field(min_length=1)
    properties: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    retention: str | None = None

    @field_validator("properties")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = schema_problem(value)
        if problem is not None:
            # Its own error type: the plan loader reports it at the failing line instead.
            raise PydanticCustomError("json_schema", problem[1])
        return value

    @field_validator("retention")
    @classmethod
    def _retention_shape(cls, value: str | None) -> str | None:
        if value is not None:
            retention_days(value)
        return value

    @model_validator(mode="after")
    def _track_needs_name(self) -> EventSpec:
        if self.type == "track" and not self.name:
            raise ValueError("a track event needs a name")
        return self

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.type, self.name)


class TraitSpec(_Strict):
    name: str
    type: TraitType
    pii: PiiClass
    purposes: list[str] = Field(min_length=1)
    description: str | None = None
    retention: str | None = None
    scope: Literal["user", "group"] = "user"

    @field_validator("retention")
    @classmethod
    def _retention_shape(cls, value: str | None) -> str | None:
        if value is not None:
            retention_days(value)
        return value


class Privacy(_Strict):
    ip: IpPolicy = "truncate"
    # The consent gate at collection (docs/privacy-and-compliance.md). `enforce`: a record (or
    # trait) whose purposes all rest on consent is stored only when the person granted one of
    # them. `refusals`: only a recorded denial or withdrawal keeps it out, for consent asked
    # and enforced before the data reaches Kilde. `off`: no gate.
    consent_gate: Literal["enforce", "refusals", "off"] = "enforce"
    # What `kilde privacy retain` does with events past their retention: delete them, or keep
    # them without anything that identifies the person.
    retention_action: Literal["delete", "anonymise"] = "delete"


class WebTracking(_Strict):
    """How the browser tracker (k.js), its cookie and the web beacon behave."""

    # The purpose the first-party cookie `kilde_aid` serves; when its legal basis is consent,
    # k.js stores no identifier until the visitor grants it. Empty: the purposes of page views.
    cookie_purpose: str | None = None
    # Without consent, still count page views without any identifier (path only).
    cookieless_page_count: bool = False
    # Let the collector (re)set `kilde_aid` as an HTTP cookie (lasts in Safari, unlike cookies
    # set by scripts); useful when Kilde runs on a subdomain of the website.
    server_cookie: bool = True
    # Domain attribute of the server-set cookie, e.g. "shop.example" so that www.shop.example
    # and collect.shop.example share it; host-only when empty.
    cookie_domain: str | None = None


IdentifierType = Literal[
    "user_id", "anonymous_id", "email", "email_sha256", "phone", "external_id", "mobile_ad_id"
]
IDENTIFIER_TYPES: tuple[str, ...] = (
    "user_id",
    "external_id",
    "email",
    "email_sha256",
    "phone",
    "mobile_ad_id",
    "anonymous_id",
)

DEFAULT_LIMITS: dict[str, int] = {
    "user_id": 1,
    "external_id": 5,
    "email": 5,
    "email_sha256": 5,
    "phone": 3,
    "mobile_ad_id": 5,
    "anonymous_id": 100,
}
DEFAULT_SHARED_AFTER: dict[str, int] = {
    "anonymous_id": 3,
    "mobile_ad_id": 3,
    "email": 3,
    "email_sha256": 3,
    "phone": 3,
}


class IdentityRules(_Strict):
    """How identifiers are stitched into profiles (the `identity:` section; all optional)."""

    # Stronger identifiers first: a record's event belongs to the profile of its first one.
    priority: list[IdentifierType] = Field(
        default_factory=lambda: cast(list[IdentifierType], list(IDENTIFIER_TYPES))
    )
    # The most identifiers of a type one profile may hold; a link that would exceed it is
    # refused and recorded as a merge conflict.
    limits: dict[IdentifierType, int] = Field(default_factory=dict)
    # An identifier seen together with more than this many different one-per-person
    # identifiers (types whose limit is 1, such as user_id) is shared (a kiosk, a bot, a
    # family tablet) and links nothing.
    shared_after: dict[IdentifierType, int] = Field(default_factory=dict)
    fold_plus_addressing: bool = False
    default_phone_region: str = "NO"
    blocklist: list[str] = Field(default_factory=list)

    @field_validator("limits")
    @classmethod
    def _limits_positive(cls, value: dict[str, int]) -> dict[str, int]:
        for name, limit in value.items():
            if limit < 1:
                raise ValueError(f"the limit of {name} must be at least 1")
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _region_shape(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]{2}", value):
            raise ValueError("use a two-letter ISO 3166 country code such as NO or GB")
        return value

    def limit(self, id_type: str) -> int:
        """The per-profile limit of a type: the plan's, else the default."""
        limits: dict[str, int] = {str(k): v for k, v in self.limits.items()}
        return limits.get(id_type, DEFAULT_LIMITS.get(id_type, 1))

    def shared_threshold(self, id_type: str) -> int | None:
        """Partners above which an identifier of this type is shared (None: never)."""
        shared: dict[str, int] = {str(k): v for k, v in self.shared_after.items()}
        return shared.get(id_type, DEFAULT_SHARED_AFTER.get(id_type))


class Plan(_Strict):
    version: Literal[1] = 1
    company: Company
    goals: list[Goal] = Field(default_factory=list)
    sources: list[Source] = Field(min_length=1)
    purposes: list[Purpose] = Field(min_length=1)
    events: list[EventSpec] = Field(default_factory=list)
    traits: list[TraitSpec] = Field(default_factory=list)
    privacy: Privacy = Field(default_factory=Privacy)
    web: WebTracking = Field(default_factory=WebTracking)
    forms: list[Form] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    identity: IdentityRules = Field(default_factory=IdentityRules)
    segments: Segments = Field(default_factory=Segments)

    @model_validator(mode="after")
    def _cookie_purpose_declared(self) -> Plan:
        wanted = self.web.cookie_purpose
        if wanted is not None and not any(p.id == wanted for p in self.purposes):
            raise ValueError(
                f"web.cookie_purpose {wanted!r} is not one of the purposes; "
                "name a declared purpose (usually analytics)"
            )
        return self

    def purpose(self, purpose_id: str) -> Purpose | None:
        return next((p for p in self.purposes if p.id == purpose_id), None)

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.name == name), None)
