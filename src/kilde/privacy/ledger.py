"""The consent ledger read as the current state per person and purpose, and the admin API's way
of recording consent.

The ledger itself is append-only and written by the pipeline (kilde.pipeline.consent) from the
consent signals that come with records: k.js's `kilde.consent()`, forms' consent boxes and
double opt-in, Segment's `context.consent.categoryPreferences`, Global Privacy Control, email
unsubscribes, imports, and this module's admin endpoint (`POST /api/privacy/consent`), which
sends a `Consent Updated` record through the same pipeline under the source `admin`.

A person's state for a purpose is their latest decision on any of their identifiers (consent
given under a cookie id before signing up counts for the account after). `ConsentState` keeps
that in memory for the consent gate at collection; reads for people go to the store.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kilde.collect.importers.base import email_anonymous_id, with_email_anonymous_id
from kilde.plan.models import Source
from kilde.privacy.subjects import Subject
from kilde.store.database import Store

REFUSED = ("denied", "withdrawn")
ADMIN_SOURCE = Source(
    name="admin",
    kind="server",
    owner="the company's privacy team",
    tool="Kilde admin API (POST /api/privacy/consent, kilde privacy consent)",
    mode="strict",
)
_FIELDS = (
    "id, user_id, anonymous_id, purpose, state, decided_at, recorded_at, source, channel, "
    "evidence, ip, message_id"
)
_Key = tuple[str, str]  # ("u", user id) or ("a", anonymous id)


# The latest decision per profile and purpose over the profile's own identifiers; a shared device
# speaks for nobody. The one reading behind the check at use, activation and do-not-sell.
_LATEST_BY_PROFILE = """
WITH ids AS (
    SELECT id_type, id_value, profile_id FROM identity_map
    WHERE id_type IN ('user_id', 'anonymous_id') AND NOT shared {only}
    UNION ALL
    SELECT 'anonymous_id', email_anonymous_id, profile_id FROM ({emails})
), decisions AS (
    SELECT coalesce(u.profile_id, a.profile_id) AS profile_id, l.purpose, l.state,
           l.decided_at, l.seq
    FROM consent_ledger l
    LEFT JOIN ids u ON u.id_type = 'user_id' AND u.id_value = trim(l.user_id)
    LEFT JOIN ids a ON a.id_type = 'anonymous_id' AND a.id_value = trim(l.anonymous_id)
    WHERE list_contains(?, l.purpose)
)
SELECT profile_id, purpose, state FROM decisions WHERE profile_id IS NOT NULL
QUALIFY row_number() OVER (
    PARTITION BY profile_id, purpose ORDER BY decided_at DESC, seq DESC) = 1
"""
# A choice made for an email address before Kilde met the person is on the ledger under the
# address's anonymous id (`person_ids`); the profile that has the address has it too.
_PROFILE_EMAILS = with_email_anonymous_id(
    "SELECT id_value, profile_id FROM identity_map WHERE id_type = 'email' AND NOT shared {only}",
    "id_value",
)


def latest_by_profile(
    store: Store, purposes: Sequence[str], profile_ids: Sequence[str] | None = None
) -> dict[tuple[str, str], str]:
    """{(profile id, purpose): latest state}, for every profile or only `profile_ids`."""
    if profile_ids is None:
        emails = _PROFILE_EMAILS.format(only="")
        sql, params = _LATEST_BY_PROFILE.format(only="", emails=emails), [list(purposes)]
    else:
        only = "AND list_contains(?, profile_id)"
        emails = _PROFILE_EMAILS.format(only=only)
        sql = _LATEST_BY_PROFILE.format(only=only, emails=emails)
        params = [list(profile_ids), list(profile_ids), list(purposes)]
    return {(r["profile_id"], r["purpose"]): r["state"] for r in store.query(sql, params)}


@dataclass
class _Person:
    keys: set[_Key] = field(default_factory=set)
    choices: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    def take(self, purpose: str, state: str, at: datetime) -> None:
        known = self.choices.get(purpose)
        if known is None or at >= known[1]:
            self.choices[purpose] = (state, at)


def _keys(user_id: str | None, anonymous_id: str | None) -> list[_Key]:
    keys = []
    if user_id:
        keys.append(("u", str(user_id).strip()))
    if anonymous_id:
        keys.append(("a", str(anonymous_id).strip()))
    return keys


class ConsentState:
    """Each person's latest decision per purpose, in memory, for the gate at collection.

    Only people with a ledger entry take memory. Identifiers are linked when a record carries
    both a user id and an anonymous id, and on every `load` from the identity map.
    """

    def __init__(self) -> None:
        self._people: dict[_Key, _Person] = {}
        self._lock = threading.Lock()
        self._journal: list[tuple[str | None, str | None, str, str, datetime]] | None = None

    def __len__(self) -> int:
        return len({id(p) for p in self._people.values()})

    def state(self, user_id: str | None, anonymous_id: str | None, purpose: str) -> str | None:
        best: tuple[str, datetime] | None = None
        for key in _keys(user_id, anonymous_id):
            person = self._people.get(key)
            if person is None:
                continue
            choice = person.choices.get(purpose)
            if choice is not None and (best is None or choice[1] >= best[1]):
                best = choice
        return best[0] if best else None

    def note(
        self, user_id: str | None, anonymous_id: str | None, purpose: str, state: str, at: datetime
    ) -> None:
        """A decision just made (called as the record is screened, before it is written)."""
        keys = _keys(user_id, anonymous_id)
        if not keys:
            return
        with self._lock:
            if self._journal is not None:
                self._journal.append((user_id, anonymous_id, purpose, state, at))
            self._note(self._people, keys, purpose, state, at)

    @staticmethod
    def _note(
        people: dict[_Key, _Person], keys: list[_Key], purpose: str, state: str, at: datetime
    ) -> None:
        person = _merge(people, keys) or _Person()
        for key in keys:
            if people.get(key) is not person:
                people[key] = person
                person.keys.add(key)
        person.take(purpose, state, at)

    def link(self, user_id: str | None, anonymous_id: str | None, email: str | None = None) -> None:
        """One record carried these ids: they are one person (only matters if one is known).
        An email address counts by its anonymous id, under which a choice made for the address
        before the person was met is recorded (`person_ids`)."""
        keys = _keys(user_id, anonymous_id)
        if email:
            keys.append(("a", email_anonymous_id(email)))
        if len(keys) < 2:
            return
        people = self._people
        first = people.get(keys[0])
        if all(people.get(key) is first for key in keys[1:]):
            return
        with self._lock:
            person = _merge(people, keys)
            assert person is not None
            for key in keys:
                people[key] = person
                person.keys.add(key)

    def link_all(self, user_ids: list[str], anonymous_ids: list[str]) -> None:
        """All these ids are one person (e.g. every id of a profile the admin acted on)."""
        keys = [("u", u.strip()) for u in user_ids] + [("a", a.strip()) for a in anonymous_ids]
        with self._lock:
            person = _merge(self._people, keys)
            if person is None:
                return
            for key in keys:
                self._people[key] = person
                person.keys.add(key)

    def forget(self, user_ids: list[str], anonymous_ids: list[str]) -> None:
        """Drop what is known of these ids (after an erasure)."""
        keys = [("u", u.strip()) for u in user_ids] + [("a", a.strip()) for a in anonymous_ids]
        with self._lock:
            for key in keys:
                person = self._people.pop(key, None)
                if person is not None:
                    person.keys.discard(key)

    def load(self, store: Store) -> None:
        """Rebuild from the ledger and the identity map; keeps decisions noted meanwhile."""
        with self._lock:
            self._journal = []
        people: dict[_Key, _Person] = {}
        try:
            links = store.query(_LINKS.format(emails=_PROFILE_EMAILS.format(only="")))
            by_profile: dict[str, list[_Key]] = {}
            for row in links:
                key = ("u" if row["id_type"] == "user_id" else "a", row["id_value"])
                by_profile.setdefault(row["profile_id"], []).append(key)
            for keys in by_profile.values():
                # Profiles sharing an id (an email address's anonymous id is on the profile
                # of the choice made for the address and on the person's own) are one person.
                person = _merge(people, keys) or _Person()
                for key in keys:
                    people[key] = person
                    person.keys.add(key)
            for row in store.query(
                "SELECT user_id, anonymous_id, purpose, state, decided_at FROM consent_ledger "
                "ORDER BY decided_at, seq"
            ):
                keys = _keys(row["user_id"], row["anonymous_id"])
                if keys:
                    self._note(people, keys, row["purpose"], row["state"], row["decided_at"])
        finally:
            with self._lock:
                journal, self._journal = self._journal or [], None
                for user_id, anonymous_id, purpose, state, at in journal:
                    self._note(people, _keys(user_id, anonymous_id), purpose, state, at)
                self._people = people


# The user and anonymous ids of every profile the ledger speaks of, for `ConsentState.load`;
# an email address counts by its anonymous id (see _PROFILE_EMAILS).
_LINKS = """
WITH ids AS (
    SELECT profile_id, id_type, id_value FROM identity_map
    WHERE id_type IN ('user_id', 'anonymous_id') AND NOT shared
    UNION ALL
    SELECT profile_id, 'anonymous_id', email_anonymous_id FROM ({emails})
), touched AS (
    SELECT DISTINCT m.profile_id FROM consent_ledger l JOIN ids m ON
        (m.id_type = 'user_id' AND m.id_value = trim(l.user_id)) OR
        (m.id_type = 'anonymous_id' AND m.id_value = trim(l.anonymous_id))
)
SELECT DISTINCT profile_id, id_type, id_value FROM ids JOIN touched USING (profile_id)
"""


def _merge(people: dict[_Key, _Person], keys: list[_Key]) -> _Person | None:
    """The one person all `keys` belong to after merging those known (None if none is)."""
    found: list[_Person] = []
    for key in keys:
        person = people.get(key)
        if person is not None and all(person is not f for f in found):
            found.append(person)
    if not found:
        return None
    keep = max(found, key=lambda p: len(p.keys))
    for other in found:
        if other is keep:
            continue
        for key in other.keys:
            people[key] = keep
        keep.keys |= other.keys
        for purpose, (state, at) in other.choices.items():
            keep.take(purpose, state, at)
    return keep


# -- reading a person's ledger ----------------------------------------------------------------


def person_ids(subject: Subject) -> tuple[list[str], list[str]]:
    """The user ids and anonymous ids the ledger knows the person by.

    An import gives a person it knows only by email an anonymous id made from the address
    (`email_anonymous_id`), so a choice of a person Kilde has not met yet (an opt-out sent
    in advance) is recorded under that id and holds for the files that bring them later.
    """
    made = {email_anonymous_id(email) for email in subject.values("email")}
    return subject.values("user_id"), sorted(set(subject.values("anonymous_id")) | made)


def history(store: Store, subject: Subject) -> list[dict[str, Any]]:
    """Every ledger row of the person, oldest first: the evidence of their choices."""
    users, anonymous = person_ids(subject)
    if not users and not anonymous:
        return []
    return store.query(
        f"SELECT {_FIELDS} FROM consent_ledger "
        "WHERE list_contains(?, trim(user_id)) OR list_contains(?, trim(anonymous_id)) "
        "ORDER BY decided_at, seq",
        [users, anonymous],
    )


def current(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest decision per purpose of `history` rows."""
    state: dict[str, dict[str, Any]] = {}
    for row in rows:
        state[row["purpose"]] = {
            "state": row["state"],
            "decided_at": row["decided_at"],
            "source": row["source"],
            "channel": row["channel"],
            "evidence": row["evidence"],
        }
    return state


def consent_message(
    choices: dict[str, bool | str],
    user_id: str | None,
    anonymous_id: str | None,
    *,
    evidence: str,
    at: str,
) -> dict[str, Any]:
    """A `Consent Updated` record as the admin API sends it through the pipeline."""
    message: dict[str, Any] = {
        "type": "track",
        "event": "Consent Updated",
        "properties": {"purposes": choices, "banner_version": evidence},
        "timestamp": at,
    }
    if user_id:
        message["userId"] = user_id
    if anonymous_id:
        message["anonymousId"] = anonymous_id
    return message
