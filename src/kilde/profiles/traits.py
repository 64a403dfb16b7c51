"""Trait precedence: what the person told us > company records > broker data; newer wins.

The tier of a value comes from the kind of the source that sent it (the plan's `sources`):
forms, the website and the app carry what the person said about themselves; the backend and
imports carry the company's records; brokers carry bought data. An import may state its tier
in `context.kilde.tier` (for example a CRM export of what customers typed in a shop).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

TIERS = ("person", "company", "broker")
TIER_OF_KIND = {
    "form": "person",
    "web": "person",
    "app": "person",
    "email": "person",
    "server": "company",
    "import": "company",
    "broker": "broker",
}


@dataclass(frozen=True)
class TraitCandidate:
    value: Any
    source: str
    tier: str
    observed_at: datetime
    message_id: str


def tier_of(source_kind: str | None, context: dict[str, Any]) -> str:
    tier = TIER_OF_KIND.get(source_kind or "", "company")
    if source_kind == "import":
        kilde = context.get("kilde")
        override = kilde.get("tier") if isinstance(kilde, dict) else None
        if override in TIERS:
            return str(override)
    return tier


def choose(candidates: list[TraitCandidate]) -> TraitCandidate:
    """The winner: most trusted tier, then newest, then the larger message id (a stable tie)."""
    return min(
        candidates,
        key=lambda c: (
            TIERS.index(c.tier),
            -c.observed_at.timestamp(),
            _desc(c.message_id),
            _desc(c.source),
        ),
    )


def _desc(text: str) -> tuple[int, ...]:
    return (*tuple(-ord(ch) for ch in text), 1)
