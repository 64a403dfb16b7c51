"""Who may be sent where: consent for the destination's purpose, and do-not-sell.

Checked at the moment of use (each delivery, each audience sync), never cached from an earlier
run, so a withdrawal takes effect on the next send. A person is a profile: consent given on any
of their identifiers (a cookie before signup, the user id after) counts for the person, and the
latest decision across them wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from kilde.plan.models import Plan
from kilde.store import Store

# The latest ledger decision per profile and purpose, over all the profile's identifiers.
_LATEST = """
WITH ids AS (
    SELECT id_value, id_type, profile_id FROM identity_map
    WHERE id_type IN ('user_id', 'anonymous_id')
), decisions AS (
    SELECT coalesce(u.profile_id, a.profile_id) AS profile_id, l.state, l.decided_at, l.seq
    FROM consent_ledger l
    LEFT JOIN ids u ON u.id_type = 'user_id' AND u.id_value = l.user_id
    LEFT JOIN ids a ON a.id_type = 'anonymous_id' AND a.id_value = l.anonymous_id
    WHERE l.purpose = ?
)
SELECT profile_id FROM decisions WHERE profile_id IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY profile_id ORDER BY decided_at DESC, seq DESC) = 1
    AND state = ?
"""


@dataclass(frozen=True)
class Permission:
    purpose: str
    needs_consent: bool
    consented: frozenset[str]  # profiles whose latest decision for the purpose is granted
    opted_out: frozenset[str]  # profiles that opted out of sale or sharing

    def allows(self, profile_id: str | None, *, sale: bool) -> tuple[bool, str | None]:
        """(allowed, why not) for one profile."""
        if profile_id is None:
            return (not self.needs_consent and not sale), "the person is not known yet"
        if sale and profile_id in self.opted_out:
            return False, "opted out of sale or sharing"
        if self.needs_consent and profile_id not in self.consented:
            return False, f"no consent for {self.purpose}"
        return True, None


def _table_exists(store: Store, name: str) -> bool:
    return bool(
        store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])
    )


def permission(store: Store, plan: Plan, purpose: str) -> Permission:
    spec = next((p for p in plan.purposes if p.id == purpose), None)
    needs_consent = spec is None or spec.legal_basis == "consent"  # unknown purpose: refuse
    consented: set[str] = set()
    opted_out: set[str] = set()
    if _table_exists(store, "consent_ledger") and _table_exists(store, "identity_map"):
        if needs_consent:
            rows = store.query(_LATEST, [purpose, "granted"])
            consented = {r["profile_id"] for r in rows}
        for sale_purpose in (p.id for p in plan.purposes if p.sale_or_sharing):
            for state in ("denied", "withdrawn"):
                rows = store.query(_LATEST, [sale_purpose, state])
                opted_out.update(r["profile_id"] for r in rows)
    return Permission(purpose, needs_consent, frozenset(consented), frozenset(opted_out))


def profile_of(store: Store, user_id: str | None, anonymous_id: str | None) -> str | None:
    for kind, value in (("user_id", user_id), ("anonymous_id", anonymous_id)):
        if value:
            found = store.scalar(
                "SELECT profile_id FROM identity_map WHERE id_type = ? AND id_value = ? LIMIT 1",
                [kind, value],
            )
            if found:
                return str(found)
    return None
