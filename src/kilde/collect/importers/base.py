"""What every importer shares: rows read from a file, row errors, records ready to ingest."""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from kilde.errors import KildeError

Kind = Literal["transactions", "contacts", "interactions", "broker", "social_login"]
KINDS: tuple[Kind, ...] = ("transactions", "contacts", "interactions", "broker", "social_login")
Tier = Literal["first_party", "broker"]

# uuid5 namespace of import message ids; never change it, or re-imports would store twice.
NAMESPACE = uuid.UUID("6b1f3c9e-2a47-5d0c-9e1b-4f6a8d2c7e30")


@functools.lru_cache(maxsize=100_000)
def email_anonymous_id(email: str) -> str:
    """The anonymous id of a person known only by this email address: every import of the
    address lands on it, and so do the consent choices of such a person (kilde.privacy.ledger).
    Remembered: imports and the consent gate ask for the same addresses again and again."""
    return str(uuid.uuid5(NAMESPACE, "email:" + email.strip().lower()))


_NAMESPACE_SQL = "'" + "".join(f"\\x{b:02x}" for b in NAMESPACE.bytes) + "'::BLOB"


def with_email_anonymous_id(relation: str, column: str) -> str:
    """SQL: the rows of `relation` (a query) with `email_anonymous_id` of their `column` (of
    normalised addresses, trimmed and lower-case, as identity_map keeps them) as
    `email_anonymous_id`."""
    digest = f"sha1({_NAMESPACE_SQL} || encode('email:' || {column}))"
    uuid = (
        "substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-5' || substr(h, 14, 3) || '-' || "
        "substr('89ab', (('0x' || substr(h, 17, 1))::INTEGER & 3) + 1, 1) || substr(h, 18, 3) "
        "|| '-' || substr(h, 21, 12)"
    )
    return (
        f"SELECT * EXCLUDE (h), {uuid} AS email_anonymous_id "
        f"FROM (SELECT *, {digest} AS h FROM ({relation}))"
    )


class ImportFailed(KildeError):
    """The file as a whole cannot be imported (unreadable, no usable columns, ...)."""


@dataclass
class RowError:
    """One row that cannot be imported, and why. Never holds the row's values."""

    line: int
    column: str | None
    code: str
    reason: str
    fix: str
    end_line: int | None = None  # when one broken row swallowed several lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "end_line": self.end_line,
            "column": self.column,
            "error": self.code,
            "reason": self.reason,
            "fix": self.fix,
        }


@dataclass(slots=True)
class Row:
    line: int
    values: dict[str, Any]
    # Kilde field -> value (blank cells left out, text stripped), filled once per row.
    fields: dict[str, Any] | None = None


@dataclass
class RowBatch:
    """Rows read from a file, in file order, with the rows that could not even be read."""

    rows: list[Row] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    position: int = 0  # bytes or rows done, for the progress bar


class Reader(Protocol):
    """A file opened for streaming: its columns and its rows in batches."""

    format: str
    columns: list[str]
    total: int | None  # what `RowBatch.position` counts up to, if known
    details: dict[str, str]  # e.g. detected encoding and delimiter, for the dry run

    def batches(self, size: int) -> Iterator[RowBatch]: ...

    def close(self) -> None: ...


@dataclass
class Record:
    """A Segment-spec message built from one or more rows (an order may span lines)."""

    line: int
    message: dict[str, Any]


@dataclass
class Converted:
    records: list[Record] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


_NAMESPACE_BYTES = NAMESPACE.bytes


def message_id(source: str, kind: str, key: str) -> str:
    """Deterministic: the same record from the same source always gets the same id.

    This is uuid5(NAMESPACE, "source\x1fkind\x1fkey"), computed without building UUID
    objects because it runs once per imported row.
    """
    digest = hashlib.sha1(
        _NAMESPACE_BYTES + f"{source}\x1f{kind}\x1f{key}".encode(), usedforsecurity=False
    ).digest()
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def content_key(values: dict[str, Any]) -> str:
    """A key for records without an id column: a hash of what they say."""
    raw = orjson.dumps(values, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return hashlib.blake2b(raw, digest_size=16).hexdigest()
