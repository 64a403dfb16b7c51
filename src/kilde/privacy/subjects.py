"""Who a privacy request is about: from what an admin typed to every identifier of the person.

A person is named by an email, a user id, a phone number, a profile id, or `type:value`. The
identity map (identity_map: identifier -> profile) gives their profiles, and the profiles give
every identifier they hold. Identifiers the identity rules found shared (a family tablet, a
kiosk) belong to several people, so they are never treated as this person's alone.

People are remembered in privacy tables only as salted hashes (`Hasher`), so the proof that a
request was handled does not itself hold the person's data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kilde.errors import KildeError
from kilde.identity.identifiers import Identifier, Normaliser, parse_identifier
from kilde.identity.keyed import ONE_IDENTIFIER
from kilde.plan.models import IDENTIFIER_TYPES
from kilde.store.database import Store

PROFILE_ID = re.compile(r"^p_[0-9a-f]{20}$")
# Extra identifier types the privacy module knows: pseudonyms of email recipients.
RECIPIENT = "email_recipient"
FIELDS = ("email", "user_id", "anonymous_id", "phone", "external_id", "profile_id")


class SubjectError(KildeError):
    """The person cannot be named or found as asked; carries an HTTP status and code."""

    def __init__(self, status: int, code: str, message: str, *, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.status = status
        self.code = code


class Hasher:
    """Salted (keyed) hashes of identifiers: equal inputs give equal hashes, nothing reverses."""

    def __init__(self, salt: str) -> None:
        self._key = bytes.fromhex(salt)

    def of(self, id_type: str, value: str) -> str:
        data = f"{id_type}:{value}".encode()
        return hashlib.blake2b(data, key=self._key, digest_size=20).hexdigest()

    def ident(self, ident: Identifier) -> str:
        return self.of(ident.type, ident.value)


@dataclass
class Subject:
    """A person as far as Kilde knows them."""

    given: list[Identifier]  # what the request named, normalised
    profile_ids: list[str] = field(default_factory=list)
    identifiers: list[Identifier] = field(default_factory=list)  # theirs alone, given included
    shared: list[Identifier] = field(default_factory=list)  # on their profiles, but shared

    @property
    def known(self) -> bool:
        return bool(self.profile_ids)

    def values(self, *types: str) -> list[str]:
        return sorted({i.value for i in self.identifiers if not types or i.type in types})


def parse_request(
    body: dict[str, Any], normaliser: Normaliser
) -> tuple[list[Identifier], str | None]:
    """(identifiers, profile id) named by a request body; SubjectError when there are none.

    Accepts {"identifier": "..."} (an email, phone, profile id, `type:value` or a bare id) or
    one of the fields email, user_id, anonymous_id, phone, external_id, profile_id. The values
    are never repeated in an error message.
    """
    found: list[Identifier] = []
    profile_id: str | None = None
    named = False
    for name in FIELDS:
        raw = body.get(name)
        if raw is None or raw == "":
            continue
        named = True
        if not isinstance(raw, str) or len(raw) > 1000:
            raise _invalid(name)
        if name == "profile_id":
            if not PROFILE_ID.match(raw.strip()):
                raise _invalid(name)
            profile_id = raw.strip()
            continue
        value = normaliser.normalise(name, raw)
        if value is None:
            raise _invalid(name)
        found.append(Identifier(name, value))
    text = body.get("identifier")
    if isinstance(text, str) and text.strip():
        named = True
        if len(text) > 1000:
            raise _invalid("identifier")
        if PROFILE_ID.match(text.strip()):
            profile_id = text.strip()
        else:
            parsed = parse_identifier(text, normaliser)
            if not parsed:
                raise _invalid("identifier")
            found.extend(parsed)
    elif text is not None and not isinstance(text, str):
        raise _invalid("identifier")
    if not named:
        raise SubjectError(
            400,
            "missing_identifier",
            "name the person: give an identifier",
            fix='send {"identifier": "<email, user id, phone or profile id>"} in the body',
        )
    return found, profile_id


def _invalid(name: str) -> SubjectError:
    return SubjectError(
        400,
        "invalid_identifier",
        f"the {name} given is not a complete, valid identifier",
        fix="give a whole email address, user id, phone number with country code, profile id "
        "(p_...) or type:value; parts of identifiers and placeholder values match nobody",
    )


def profiles_of(store: Store, identifiers: Iterable[Identifier]) -> dict[Identifier, list[str]]:
    """The profiles holding each identifier (empty when the identity map does not know it)."""
    out: dict[Identifier, list[str]] = {}
    for ident in identifiers:
        rows = store.query(
            f"{ONE_IDENTIFIER}SELECT DISTINCT profile_id, shared FROM held "
            "WHERE id_type = ? ORDER BY profile_id",
            [ident.value, ident.type],
        )
        out[ident] = [r["profile_id"] for r in rows]
    return out


def resolve(store: Store, given: list[Identifier], profile_id: str | None = None) -> Subject:
    """Every identifier of the person named; SubjectError if the name fits several people."""
    if profile_id is not None:
        current = store.scalar(
            "SELECT coalesce((SELECT profile_id FROM profiles WHERE profile_id = ?), "
            "(SELECT m.profile_id FROM profile_ids i JOIN identity_map m "
            " ON m.id_type = i.anchor_type AND m.id_value = i.anchor_value "
            " WHERE i.profile_id = ? LIMIT 1))",
            [profile_id, profile_id],
        )
        if current is None:
            raise SubjectError(
                404,
                "person_not_found",
                "there is no profile with that id",
                fix="look the person up by email or user id instead",
            )
        profiles = [str(current)]
    else:
        shared = _shared(store, given)
        if shared and len(shared) == len(given):
            raise SubjectError(
                409,
                "shared_identifier",
                "that identifier is shared by several people (for example a family device), "
                "so it does not name one person",
                fix="name the person by their email address or user id",
            )
        found = profiles_of(store, [g for g in given if g not in shared])
        profiles = sorted({p for ids in found.values() for p in ids})
        if len(profiles) > 1:
            raise SubjectError(
                409,
                "ambiguous_identifier",
                f"the identifier fits {len(profiles)} different profiles",
                fix="name the type as well, for example user_id:<id> or anonymous_id:<id>, or give "
                "the profile id",
            )
    subject = Subject(given=list(given), profile_ids=profiles)
    # Unknown to the identity map: the identifiers as given (events may still carry them).
    mine: set[Identifier] = set() if profiles else {g for g in given if g.type in IDENTIFIER_TYPES}
    shared_ids: set[Identifier] = set()
    if profiles:
        rows = store.query(
            "SELECT id_type, id_value, bool_or(shared) AS shared FROM identity_map "
            "WHERE list_contains(?, profile_id) GROUP BY ALL ORDER BY id_type, id_value",
            [profiles],
        )
        for row in rows:
            ident = Identifier(row["id_type"], row["id_value"])
            (shared_ids if row["shared"] else mine).add(ident)
    subject.identifiers = sorted(mine - shared_ids)
    subject.shared = sorted(shared_ids)
    return subject


def _shared(store: Store, given: list[Identifier]) -> set[Identifier]:
    out = set()
    for ident in given:
        if store.scalar(
            f"{ONE_IDENTIFIER}SELECT bool_or(shared) FROM held WHERE id_type = ?",
            [ident.value, ident.type],
        ):
            out.add(ident)
    return out


def expand(store: Store, subject: Subject) -> Subject:
    """The subject with every identifier of every profile that holds one of theirs now, and
    of every profile made only of records that carry one of theirs (for example a CRM row with
    their email that identity resolution kept apart because of a conflicting id)."""
    seeds = set(subject.identifiers)
    profiles = set(subject.profile_ids) | _made_of_their_records(store, seeds)
    for ident in seeds:
        profiles.update(
            r["profile_id"]
            for r in store.query(
                f"{ONE_IDENTIFIER}SELECT DISTINCT profile_id FROM held "
                "WHERE id_type = ? AND NOT shared",
                [ident.value, ident.type],
            )
        )
    mine, shared = set(seeds), set(subject.shared)
    if profiles:
        for row in store.query(
            "SELECT id_type, id_value, bool_or(shared) AS shared FROM identity_map "
            "WHERE list_contains(?, profile_id) GROUP BY ALL",
            [sorted(profiles)],
        ):
            ident = Identifier(row["id_type"], row["id_value"])
            (shared if row["shared"] else mine).add(ident)
    return Subject(
        given=subject.given,
        profile_ids=sorted(profiles),
        identifiers=sorted(mine - shared),
        shared=sorted(shared),
    )


def _made_of_their_records(store: Store, identifiers: set[Identifier]) -> set[str]:
    if not identifiers:
        return set()
    ids = sorted(identifiers)
    rows = store.query(
        "WITH ids AS (SELECT unnest(?::VARCHAR[]) AS id_type, unnest(?::VARCHAR[]) AS id_value), "
        "touched AS (SELECT DISTINCT o.source, o.message_id FROM identity_observations o "
        " JOIN ids ON o.id_type = ids.id_type AND o.id_value = ids.id_value), "
        "owners AS (SELECT DISTINCT m.profile_id FROM identity_records r "
        " JOIN touched t ON t.source = r.source AND t.message_id = r.message_id "
        " JOIN identity_map m ON m.id_type = r.primary_type AND m.id_value = r.primary_value "
        " WHERE NOT m.shared) "
        "SELECT o.profile_id FROM owners o WHERE NOT EXISTS ("
        " SELECT 1 FROM identity_map m JOIN identity_records r "
        " ON r.primary_type = m.id_type AND r.primary_value = m.id_value "
        " WHERE m.profile_id = o.profile_id AND NOT EXISTS ("
        "  SELECT 1 FROM touched t WHERE t.source = r.source AND t.message_id = r.message_id))",
        [[i.type for i in ids], [i.value for i in ids]],
    )
    return {r["profile_id"] for r in rows}
