"""Who may be sent where: consent for the destination's purpose, and do-not-sell.

Checked at the moment of use (each delivery, each audience sync), never cached from an earlier
run, so a withdrawal takes effect on the next send. A person is a profile: consent given on any
of their identifiers (a cookie before signup, the user id after) counts for the person, and the
latest decision across them wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import kilde.pipeline  # noqa: F401  (before kilde.privacy: the two import each other)
from kilde.identity.keyed import ONE_IDENTIFIER
from kilde.plan.models import Plan
from kilde.privacy.do_not_sell import flagged_profiles, sale_purposes
from kilde.privacy.ledger import REFUSED, latest_by_profile
from kilde.store import Store

# The latest decision per raw identifier, for people identity resolution has not seen yet.
_LATEST_IDS = """
SELECT key, state FROM (
    SELECT 'user_id:' || user_id AS key, state, decided_at, seq FROM consent_ledger
    WHERE purpose = ? AND user_id IS NOT NULL
    UNION ALL
    SELECT 'anonymous_id:' || anonymous_id, state, decided_at, seq FROM consent_ledger
    WHERE purpose = ? AND anonymous_id IS NOT NULL
)
QUALIFY row_number() OVER (PARTITION BY key ORDER BY decided_at DESC, seq DESC) = 1
"""


@dataclass(frozen=True)
class Permission:
    purpose: str
    needs_consent: bool
    decisions: dict[str, str]  # profile -> latest state for the purpose
    id_decisions: dict[str, str]  # "user_id:x" / "anonymous_id:y" -> latest state
    opted_out: frozenset[str]  # profiles and raw ids that opted out of sale or sharing

    def allows(
        self, profile_id: str | None, ids: tuple[str, ...] = (), *, sale: bool
    ) -> tuple[bool, str | None]:
        """(allowed, why not) for a person known by a profile and/or raw identifiers."""
        if sale and (profile_id in self.opted_out or any(i in self.opted_out for i in ids)):
            return False, "opted out of sale or sharing"
        if not self.needs_consent:
            return True, None
        state: str | None
        if profile_id is not None and profile_id in self.decisions:
            state = self.decisions[profile_id]
        else:  # not resolved yet: the person's own identifiers speak for them
            states = [self.id_decisions[i] for i in ids if i in self.id_decisions]
            state = "granted" if "granted" in states and len(set(states)) == 1 else None
        if state != "granted":
            return False, f"no consent for {self.purpose}"
        return True, None


def _table_exists(store: Store, name: str) -> bool:
    return bool(
        store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])
    )


def permission(
    store: Store, plan: Plan, purpose: str, *, require_consent: bool = False
) -> Permission:
    spec = next((p for p in plan.purposes if p.id == purpose), None)
    # An unknown purpose: refuse. A sale or sharing needs consent whatever the plan's basis.
    needs_consent = require_consent or spec is None or spec.legal_basis == "consent"
    decisions: dict[str, str] = {}
    id_decisions: dict[str, str] = {}
    opted_out: set[str] = set()
    if _table_exists(store, "consent_ledger") and _table_exists(store, "identity_map"):
        if needs_consent:
            latest = latest_by_profile(store, [purpose])
            decisions = {profile_id: state for (profile_id, _), state in latest.items()}
            id_decisions = {
                r["key"]: r["state"] for r in store.query(_LATEST_IDS, [purpose, purpose])
            }
        opted_out = flagged_profiles(store, plan)
        for sale_purpose in sale_purposes(plan):
            for row in store.query(_LATEST_IDS, [sale_purpose, sale_purpose]):
                if row["state"] in REFUSED:
                    opted_out.add(row["key"])
    return Permission(purpose, needs_consent, decisions, id_decisions, frozenset(opted_out))


def raw_ids(user_id: str | None, anonymous_id: str | None) -> tuple[str, ...]:
    return tuple(
        f"{kind}:{value}"
        for kind, value in (("user_id", user_id), ("anonymous_id", anonymous_id))
        if value
    )


def profile_of(store: Store, user_id: str | None, anonymous_id: str | None) -> str | None:
    for kind, value in (("user_id", user_id), ("anonymous_id", anonymous_id)):
        if value:
            found = store.scalar(
                f"{ONE_IDENTIFIER}SELECT profile_id FROM held WHERE id_type = ? LIMIT 1",
                [value, kind],
            )
            if found:
                return str(found)
    return None
