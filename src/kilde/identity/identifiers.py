"""Identifiers: one normaliser and validity check per type, and what a record carries.

A record (an event row) carries identifiers: its anonymous id and user id, and in its traits,
context and device the email, phone, hashed email, external ids (Segment's
`context.externalIds`) and mobile advertising id. Each is normalised (so `Ola@Example.COM ` and
`ola@example.com` are one identifier) and checked; junk values (`null`, `undefined`, `0`,
`test@test.com`, the plan's blocklist) are dropped, so they never link anybody.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import phonenumbers

from kilde.plan.models import IDENTIFIER_TYPES, IdentityRules

# Values that clients send when they have no real id. Compared case-insensitively, trimmed.
JUNK_VALUES = frozenset(
    {
        "",
        "null",
        "none",
        "nil",
        "undefined",
        "nan",
        "0",
        "-1",
        "n/a",
        "na",
        "unknown",
        "anonymous",
        "guest",
        "test",
        "[object object]",
        "00000000-0000-0000-0000-000000000000",
        "test@test.com",
        "test@example.com",
        "email@example.com",
        "noreply@example.com",
        "no-reply@example.com",
        "a@a.com",
        "asdf@asdf.com",
        "x@x.com",
    }
)
# The same pattern runs in SQL for simple records (see extract.py), so it names its characters.
EMAIL_PATTERN = r"^[^@\t\n\x0b\x0c\r \"'<>,;]+@[^@\t\n\x0b\x0c\r \"'<>,;]+\.[a-z]{2,}$"
_EMAIL = re.compile(EMAIL_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_AD_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_EXTERNAL_KIND = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
MAX_LENGTH = 512
# Whitespace trimmed from ids (the same set as the set-based normaliser trims).
WHITESPACE = " \t\n\r\x0b\x0c"
# A value made only of one of these characters repeated ("0000", "----", "xxx") is junk.
REPEATED_JUNK = r"^(0+|-+|x+|\.+)$"
_REPEATED = re.compile(REPEATED_JUNK)


@dataclass(frozen=True, order=True)
class Identifier:
    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass
class RecordIdentifiers:
    """What one record says about who it is."""

    own: list[Identifier] = field(default_factory=list)  # in priority order, no duplicates
    previous: str | None = None  # an alias's previousId (typed when stitching)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (field, reason); no values

    @property
    def primary(self) -> Identifier | None:
        return self.own[0] if self.own else None


class Normaliser:
    """Normalises identifiers by the plan's `identity:` rules."""

    def __init__(self, rules: IdentityRules | None = None) -> None:
        self.rules = rules or IdentityRules()
        self.junk = JUNK_VALUES | {v.strip().lower() for v in self.rules.blocklist}
        self.rank: dict[str, int] = {t: i for i, t in enumerate(identifier_order(self.rules))}
        self._by_type: dict[str, Callable[[str], str | None]] = {
            "user_id": self.plain_id,
            "anonymous_id": self.plain_id,
            "email": self.email,
            "email_sha256": self.email_sha256,
            "phone": self.phone,
            "external_id": self.external_id,
            "mobile_ad_id": self.mobile_ad_id,
        }
        self._cache: dict[tuple[str, str], str | None] = {}

    # -- one normaliser per type; each returns None for an invalid or junk value -------------

    def is_junk(self, text: str) -> bool:
        lowered = text.strip(WHITESPACE).lower()
        return lowered in self.junk or bool(_REPEATED.match(lowered))

    def plain_id(self, raw: str) -> str | None:
        text = raw.strip(WHITESPACE)
        if not text or len(text) > MAX_LENGTH or self.is_junk(text):
            return None
        return text

    def email(self, raw: str) -> str | None:
        text = raw.strip(WHITESPACE).lower()
        if text.startswith("mailto:"):
            text = text[7:]
        if not _EMAIL.fullmatch(text) or len(text) > 254 or self.is_junk(text):
            return None
        local, _, domain = text.rpartition("@")
        if self.rules.fold_plus_addressing and "+" in local:
            local = local.split("+", 1)[0]
            if not local:
                return None
        folded = f"{local}@{domain}"
        return None if self.is_junk(folded) else folded

    def email_sha256(self, raw: str) -> str | None:
        text = raw.strip().lower()
        return text if _SHA256.match(text) and not _REPEATED.match(text) else None

    def phone(self, raw: str) -> str | None:
        text = raw.strip()
        if not text or len(text) > 40 or self.is_junk(text):
            return None
        try:
            number = phonenumbers.parse(text, self.rules.default_phone_region)
        except phonenumbers.NumberParseException:
            return None
        if not phonenumbers.is_valid_number(number):
            return None
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    def external_id(self, raw: str) -> str | None:
        """`kind:value`, for example `crm_id:C-1042` or `google:1134...` (a social login)."""
        kind, sep, value = raw.partition(":")
        kind = kind.strip().lower()
        value = value.strip()
        if not sep or not _EXTERNAL_KIND.match(kind) or not value or len(value) > MAX_LENGTH:
            return None
        if self.is_junk(value):
            return None
        return f"{kind}:{value}"

    def mobile_ad_id(self, raw: str) -> str | None:
        text = raw.strip().lower()
        if not _AD_ID.match(text) or self.is_junk(text):
            return None
        return text

    def normalise(self, id_type: str, raw: Any) -> str | None:
        """The normalised value, or None if it is not a usable identifier of that type."""
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            return None
        text = str(raw)
        key = (id_type, text)
        if key in self._cache:
            return self._cache[key]
        fn = self._by_type.get(id_type)
        result = fn(text) if fn else None
        if len(self._cache) > 500_000:
            self._cache.clear()
        self._cache[key] = result
        return result

    # -- what a record carries --------------------------------------------------------------

    def of_record(self, row: dict[str, Any]) -> RecordIdentifiers:
        """The identifiers of one events-table row (JSON columns as text or as dicts)."""
        found = RecordIdentifiers()
        seen: set[Identifier] = set()

        def add(id_type: str, raw: Any, where: str) -> None:
            if raw is None or raw == "":
                return
            value = self.normalise(id_type, raw)
            if value is None:
                found.dropped.append((where, "junk" if self._looks_junk(raw) else "invalid"))
                return
            ident = Identifier(id_type, value)
            if ident not in seen:
                seen.add(ident)
                found.own.append(ident)

        kind = row.get("type")
        add("user_id", row.get("user_id"), "userId")
        add("anonymous_id", row.get("anonymous_id"), "anonymousId")
        context = _as_dict(row.get("context"))
        people: list[tuple[str, dict[str, Any]]] = []
        if kind == "identify":
            people.append(("traits", _as_dict(row.get("traits"))))
        if kind != "group":
            people.append(("context.traits", _as_dict(context.get("traits"))))
        for where, traits in people:
            email = traits.get("email")
            add("email", email, f"{where}.email")
            normal = self.normalise("email", email) if email else None
            if normal is not None:
                add("email_sha256", hashlib.sha256(normal.encode()).hexdigest(), where)
            for key in ("email_sha256", "sha256_email", "hashed_email"):
                add("email_sha256", traits.get(key), f"{where}.{key}")
            add("phone", traits.get("phone"), f"{where}.phone")
        for entry in _as_list(context.get("externalIds")):
            if isinstance(entry, dict):
                id_kind, value = entry.get("type"), entry.get("id")
                if isinstance(id_kind, str) and isinstance(value, str | int):
                    if id_kind.strip().lower() in ("email", "phone"):
                        add(id_kind.strip().lower(), value, "context.externalIds")
                    else:
                        add("external_id", f"{id_kind}:{value}", "context.externalIds")
        device = _as_dict(context.get("device"))
        if device.get("adTrackingEnabled") is not False:
            add("mobile_ad_id", device.get("advertisingId"), "context.device.advertisingId")
        found.own.sort(key=lambda i: self.rank[i.type])
        if kind == "alias":
            prev = row.get("previous_id")
            if prev is not None and self.plain_id(str(prev)) is not None:
                found.previous = str(prev).strip()
            elif prev is not None:
                found.dropped.append(("previousId", "junk"))
        return found

    def _looks_junk(self, raw: Any) -> bool:
        return isinstance(raw, str | int | float) and self.is_junk(str(raw))


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def identifier_order(rules: IdentityRules) -> list[str]:
    """All identifier types, strongest first, by the plan's priority."""
    order = [t for t in rules.priority if t in IDENTIFIER_TYPES]
    return order + [t for t in IDENTIFIER_TYPES if t not in order]


def parse_identifier(text: str, normaliser: Normaliser) -> list[Identifier]:
    """What an admin typed (an email, a phone, `type:value`, or a bare id) as identifiers."""
    text = text.strip()
    out: list[Identifier] = []
    head, sep, rest = text.partition(":")
    if sep and head in IDENTIFIER_TYPES:
        value = normaliser.normalise(head, rest)
        return [Identifier(head, value)] if value else []
    candidates: Iterable[str] = (
        ("email",) if "@" in text else ("user_id", "anonymous_id", "phone", "external_id")
    )
    for id_type in candidates:
        value = normaliser.normalise(id_type, text)
        if value:
            out.append(Identifier(id_type, value))
    return out
