"""Pydantic models of the collection plan.

The plan says why each datum is collected (purposes with a legal basis), who collects it and
with which tool (sources), what it must look like (events with JSON Schemas, traits with types)
and how long it is kept (retention). Unknown keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from jsonschema import Draft7Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


def retention_days(text: str) -> int:
    """Turn '13 months', '90d' or '2y' into a number of days."""
    match = _RETENTION.match(text.lower())
    if not match:
        raise ValueError(
            f"retention {text!r} is not understood; write a number and a unit, "
            "for example '90 days', '13 months' or '2 years'"
        )
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)[0]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Company(_Strict):
    name: str
    website: str | None = None
    contact: str | None = None
    primary_color: str = "#2f6f5e"


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
        try:
            Draft7Validator.check_schema(value)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(top)"
            raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
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


class Plan(_Strict):
    version: Literal[1] = 1
    company: Company
    goals: list[Goal] = Field(default_factory=list)
    sources: list[Source] = Field(min_length=1)
    purposes: list[Purpose] = Field(min_length=1)
    events: list[EventSpec] = Field(default_factory=list)
    traits: list[TraitSpec] = Field(default_factory=list)
    privacy: Privacy = Field(default_factory=Privacy)

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.name == name), None)
