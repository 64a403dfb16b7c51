"""Do not sell or share (CCPA): a per-person flag, and excluding flagged people.

The flag is the person's latest decision for the plan's "sale or sharing" purposes (those with
`sale_or_sharing: true`; `sale_sharing` when the plan has none) in the consent ledger, so every
way a person can say it is one record of the same kind:

- Global Privacy Control (`navigator.globalPrivacyControl` in k.js, the `Sec-GPC` header):
  recorded by the pipeline as a denial with evidence `gpc`;
- the browser API (`kilde.consent({advertising: false})`) and forms' consent boxes;
- the admin API and `kilde privacy do-not-sell` (for requests by mail or phone).

A later grant lifts it. Partner exports and advertising audiences must leave flagged people
out: `excluded` answers which of a set of profiles are flagged, at the moment of use.
"""

from __future__ import annotations

from typing import Any

from kilde.pipeline.consent import GPC_FALLBACK_PURPOSE
from kilde.plan.models import Plan
from kilde.privacy.ledger import REFUSED, current, history, latest_by_profile
from kilde.privacy.subjects import Subject
from kilde.store.database import Store


def sale_purposes(plan: Plan) -> list[str]:
    return [p.id for p in plan.purposes if p.sale_or_sharing] or [GPC_FALLBACK_PURPOSE]


def status(store: Store, plan: Plan, subject: Subject) -> dict[str, Any]:
    """Whether the person opted out of sale or sharing, since when and how."""
    state = current(history(store, subject))
    purposes = sale_purposes(plan)
    refused = {p: state[p] for p in purposes if p in state and state[p]["state"] in REFUSED}
    first = min(refused.values(), key=lambda s: s["decided_at"]) if refused else None
    return {
        "do_not_sell": bool(refused),
        "purposes": purposes,
        "since": first["decided_at"] if first else None,
        "evidence": first["evidence"] if first else None,
        "channel": first["channel"] if first else None,
    }


def flagged_profiles(store: Store, plan: Plan) -> set[str]:
    """Every profile that opted out of sale or sharing, now."""
    latest = latest_by_profile(store, sale_purposes(plan))
    return {profile_id for (profile_id, _), state in latest.items() if state in REFUSED}


def excluded(store: Store, plan: Plan, profile_ids: list[str]) -> set[str]:
    """Those of `profile_ids` that must be left out of a sale or sharing (flagged)."""
    return flagged_profiles(store, plan) & set(profile_ids)
