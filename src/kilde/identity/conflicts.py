"""Merge conflicts: links the rules refused, with the reason an admin can read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

# reason code -> what it means (shown by the API, the CLI and the docs)
REASONS: dict[str, str] = {
    "limit_exceeded": "the link would give one profile more identifiers of a type than the "
    "plan's identity.limits allow",
    "alias_to_other_person": "an alias pointed at an id that already belongs to another known "
    "person (a different user id)",
    "circular_alias": "an alias pointed back at itself or reversed an earlier alias",
    "shared_identifier": "the identifier was seen with too many different people (a shared "
    "device, a kiosk or a bot) and links nobody",
    "unmerged": "an admin split these identifiers apart (kilde profile unmerge)",
}


@dataclass
class Conflict:
    closure_id: str
    reason: str
    id_type: str | None
    id_value: str | None
    kept_profile: str | None
    refused_profile: str | None
    source: str | None
    message_id: str | None
    at: datetime | None
    occurrences: int = 1
    detail: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "closure_id": self.closure_id,
            "reason": self.reason,
            "id_type": self.id_type,
            "id_value": self.id_value,
            "kept_profile": self.kept_profile,
            "refused_profile": self.refused_profile,
            "source": self.source,
            "message_id": self.message_id,
            "first_at": self.at,
            "occurrences": self.occurrences,
            "detail": self.detail,
        }


CONFLICT_COLUMNS = (
    "closure_id",
    "reason",
    "id_type",
    "id_value",
    "kept_profile",
    "refused_profile",
    "source",
    "message_id",
    "first_at",
    "occurrences",
    "detail",
)
