"""The suppression list: salted hashes of people who must not be collected again.

An erasure puts a hash of every identifier of the person here (and an admin can add people
with `kilde privacy suppress`). From then on every record that carries one of them is dropped
at the door, whichever channel it came through (HTTP API, k.js, forms, imports, broker files,
email tracking), before anything of it is stored, even as a dead letter. Each drop is counted
per source and per list entry, so a company sees which system keeps sending an erased person.

The list holds hashes only (keyed BLAKE2b with a salt kept in the store), so it does not undo
the erasure it protects. The pipeline checks records in `Pipeline.prepare`; the writer checks
again, at commit, the batches screened before the latest addition (`epoch`), so a record that
was on its way during an erasure cannot slip in behind it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from kilde.identity.identifiers import Identifier, Normaliser
from kilde.privacy.subjects import RECIPIENT, Hasher
from kilde.store.database import Store
from kilde.store.writer import WriteBatch, Writer

_TRAIT_KEYS = (("email", "email"), ("phone", "phone"))
_HASHED_EMAIL_KEYS = ("email_sha256", "sha256_email", "hashed_email")
DIGEST_CACHE = 200_000  # identifiers whose hashes are kept at hand


def load_salt(store: Store, writer: Writer) -> str:
    """The privacy salt, made on first use."""
    salt = store.scalar("SELECT value FROM privacy_state WHERE key = 'salt'")
    if salt is None:
        writer.write_sync(
            WriteBatch(
                statements=[
                    (
                        "INSERT OR IGNORE INTO privacy_state VALUES ('salt', ?)",
                        [secrets.token_hex(32)],
                    )
                ]
            )
        )
        salt = store.scalar("SELECT value FROM privacy_state WHERE key = 'salt'")
    return str(salt)


def _obj(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        if not value.startswith("{"):
            return {}
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def raw_identifiers(record: Any, *, row: bool = False) -> Iterator[tuple[str, Any]]:
    """(type, raw value) of every identifier a record carries.

    `record` is a Segment message as sent (camelCase), or with `row=True` an events-table row
    (snake_case, JSON columns as text or objects).
    """
    if not isinstance(record, dict):
        return
    names = (
        ("user_id", "anonymous_id", "previous_id")
        if row
        else ("userId", "anonymousId", "previousId")
    )
    user, anonymous, previous = (record.get(n) for n in names)
    if user is not None:
        yield "user_id", user
    if anonymous is not None:
        yield "anonymous_id", anonymous
    if previous is not None:
        yield "user_id", previous
        yield "anonymous_id", previous
    context = _obj(record.get("context"))
    for traits in (_obj(record.get("traits")), _obj(context.get("traits"))):
        if not traits:
            continue
        for key, id_type in _TRAIT_KEYS:
            if traits.get(key) is not None:
                yield id_type, traits[key]
        for key in _HASHED_EMAIL_KEYS:
            if traits.get(key) is not None:
                yield "email_sha256", traits[key]
    external = context.get("externalIds")
    if isinstance(external, list):
        for entry in external[:50]:
            if isinstance(entry, dict):
                kind, value = entry.get("type"), entry.get("id")
                if isinstance(kind, str) and isinstance(value, str | int):
                    kind = kind.strip().lower()
                    if kind in ("email", "phone"):
                        yield kind, value
                    else:
                        yield "external_id", f"{kind}:{value}"
    device = context.get("device")
    if isinstance(device, dict) and device.get("advertisingId") is not None:
        yield "mobile_ad_id", device["advertisingId"]
    properties = _obj(record.get("properties"))
    recipient = properties.get("recipient")
    if isinstance(recipient, str):
        yield RECIPIENT, recipient


# What names a person in text that is not a readable record: email addresses, the id fields of
# a Segment message, phone numbers (normalised and hashed like any identifier, so text that
# only looks like one matches nothing).
_TEXT_EMAIL = re.compile(
    r"[^\s\"'<>(),;:{}\[\]\\]+@[^\s\"'<>(),;:{}\[\]\\]+\.[^\s\"'<>(),;:{}\[\]\\]+"
)
_TEXT_ID = re.compile(
    r'"(userId|anonymousId|previousId|user_id|anonymous_id)"\s*:\s*"((?:[^"\\]|\\.){1,512})"'
)
_TEXT_PHONE = re.compile(r"\+?\d[\d ().-]{5,20}\d")
_TEXT_LIMIT = 1_000_000  # characters looked at
_TEXT_IDS = {
    "userId": ("user_id",),
    "user_id": ("user_id",),
    "anonymousId": ("anonymous_id",),
    "anonymous_id": ("anonymous_id",),
    "previousId": ("user_id", "anonymous_id"),
}


def text_identifiers(text: str) -> Iterator[tuple[str, Any]]:
    """(type, raw value) of what looks like an identifier anywhere in a text."""
    text = text[:_TEXT_LIMIT]
    for match in _TEXT_EMAIL.finditer(text):
        yield "email", match.group(0)
    for match in _TEXT_ID.finditer(text):
        for id_type in _TEXT_IDS[match.group(1)]:
            yield id_type, match.group(2)
    for match in _TEXT_PHONE.finditer(text):
        yield "phone", match.group(0)


class SuppressionList:
    """The hashes in memory (for the door) and in the store (for restarts)."""

    def __init__(self, store: Store, writer: Writer, normaliser: Normaliser) -> None:
        self.store = store
        self.hasher = Hasher(load_salt(store, writer))
        self.normaliser = normaliser
        self._hashes: set[str] = {
            r["hash"] for r in store.query("SELECT hash FROM suppression_list")
        }
        self._lock = threading.Lock()
        self._digests: dict[tuple[str, Any], tuple[str, ...]] = {}
        self.epoch = 0  # goes up with every addition

    def use_normaliser(self, normaliser: Normaliser) -> None:
        """The plan's identity rules changed: normalise (and hash) anew."""
        self.normaliser = normaliser
        self._digests = {}

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, digest: object) -> bool:
        return digest in self._hashes

    def hashes_of(self, identifiers: Iterable[Identifier]) -> dict[str, str]:
        """hash -> identifier type."""
        return {self.hasher.ident(i): i.type for i in identifiers}

    def add(self, identifiers: Iterable[Identifier]) -> dict[str, str]:
        """Start dropping records of these identifiers now; the caller stores the rows."""
        new = self.hashes_of(identifiers)
        with self._lock:
            self._hashes.update(new)
            self.epoch += 1
        return new

    def forget(self, hashes: Iterable[str]) -> None:
        with self._lock:
            self._hashes.difference_update(hashes)
            self.epoch += 1

    def rows(
        self, hashes: dict[str, str], reason: str, erasure_id: str | None
    ) -> list[tuple[str, list[Any]]]:
        now = datetime.now(UTC)
        return [
            (
                "INSERT OR IGNORE INTO suppression_list (hash, id_type, added_at, reason, "
                "erasure_id) VALUES (?, ?, ?, ?, ?)",
                [digest, id_type, now, reason, erasure_id],
            )
            for digest, id_type in sorted(hashes.items())
        ]

    def hit(self, record: Any, *, row: bool = False) -> str | None:
        """The list entry a record matches, or None. Never raises."""
        if not self._hashes:
            return None
        return self._first_listed(raw_identifiers(record, row=row))

    def hit_text(self, text: str) -> str | None:
        """The list entry a text that is not a readable record names (a body cut off mid-way,
        kept whole as a dead letter), or None. Never raises."""
        if not self._hashes or not isinstance(text, str):
            return None
        return self._first_listed(text_identifiers(text))

    def _first_listed(self, pairs: Iterable[tuple[str, Any]]) -> str | None:
        try:
            digests = self._digests
            for id_type, raw in pairs:
                if not isinstance(raw, str | int | float):
                    continue
                key = (id_type, raw)
                found = digests.get(key)
                if found is None:
                    found = self._digests_of(id_type, raw)
                    if len(digests) >= DIGEST_CACHE:
                        digests.clear()
                    digests[key] = found
                for digest in found:
                    if digest in self._hashes:
                        return digest
        except Exception:  # a malformed record is the dead letter's business, not ours
            return None
        return None

    def _digests_of(self, id_type: str, raw: Any) -> tuple[str, ...]:
        """The hashes a raw identifier is listed under (the same ids come back all the time,
        so `hit` keeps these: normalising and hashing cost more than the lookup)."""
        value = raw if id_type == RECIPIENT else self.normaliser.normalise(id_type, raw)
        if not isinstance(value, str):
            return ()
        if id_type != "email":
            return (self.hasher.of(id_type, value),)
        hashed = hashlib.sha256(value.encode()).hexdigest()
        return (self.hasher.of(id_type, value), self.hasher.of("email_sha256", hashed))

    def count_statements(
        self, hits: Counter[str], source: str, channel: str, at: datetime
    ) -> list[tuple[str, list[Any]]]:
        """Count drops per source and day, and per list entry."""
        if not hits:
            return []
        statements: list[tuple[str, list[Any]]] = [
            (
                "INSERT INTO suppression_counts VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                "SET records = suppression_counts.records + excluded.records",
                [at.date(), source, channel, sum(hits.values())],
            )
        ]
        for digest, count in sorted(hits.items()):
            statements.append(
                (
                    "UPDATE suppression_list SET hits = hits + ?, last_hit_at = ? WHERE hash = ?",
                    [count, at, digest],
                )
            )
        return statements
