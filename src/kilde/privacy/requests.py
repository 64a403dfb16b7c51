"""The request tracker: data subject requests from receipt to answer, within the legal deadline.

Kinds: access (GDPR Art. 15/20, CCPA right to know), erasure (Art. 17, CCPA delete),
correction (Art. 16, CCPA correct) and opt_out (Art. 21 objection, CCPA do not sell or share).
Each request has the date it was received, the verification of the requester's identity
(pending, verified, failed, and how), a legal deadline (GDPR: one month, counted as 30 days,
extendable by two more months; CCPA: 45 days, extendable by 45 more), a state (open,
in_progress, done, refused) and an outcome.

Who the request is about is kept only as a salted hash of the identifier the person gave, so
the tracker holds no personal data and survives the erasure it records. `kilde privacy export
--request ID` and `erase --request ID` check that the person named matches the request and that
the requester was verified, and close the request with the outcome.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from kilde.errors import KildeError
from kilde.privacy.services import Privacy
from kilde.privacy.subjects import Subject, parse_request
from kilde.store.writer import WriteBatch

KINDS = ("access", "erasure", "correction", "opt_out")
DEADLINE_DAYS = {"gdpr": 30, "ccpa": 45}
EXTENSION_DAYS = {"gdpr": 60, "ccpa": 45}
STATES = ("open", "in_progress", "done", "refused")
VERIFICATION = ("pending", "verified", "failed")
_FIELDS = (
    "id, kind, law, subject IS NOT NULL AS subject_recorded, received_at, due_at, extended, "
    "verification, verification_method, verified_at, state, outcome, closed_at, note, updated_at"
)


class RequestError(KildeError):
    def __init__(self, status: int, code: str, message: str, *, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.status = status
        self.code = code


def create(
    privacy: Privacy,
    *,
    kind: str,
    law: str,
    person: dict[str, Any] | None = None,
    received_at: datetime | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Log a request as received; the deadline runs from `received_at` (default now)."""
    received = (received_at or datetime.now(UTC)).astimezone(UTC)
    if received > datetime.now(UTC) + timedelta(minutes=5):
        raise RequestError(
            400,
            "invalid_date",
            "the request cannot be received in the future",
            fix="give the date the request reached the company",
        )
    subject = None
    if person:
        given, profile_id = parse_request(person, privacy.normaliser())
        subject = (
            privacy.hasher.ident(given[0])
            if given
            else privacy.hasher.of("profile_id", profile_id or "")
        )
    request_id = "req_" + uuid.uuid4().hex[:12]
    now = datetime.now(UTC)
    privacy.writer.write_sync(
        WriteBatch(
            statements=[
                (
                    "INSERT INTO privacy_requests (id, kind, law, subject, received_at, due_at, "
                    "verification, state, note, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'pending', 'open', ?, ?)",
                    [
                        request_id,
                        kind,
                        law,
                        subject,
                        received,
                        received + timedelta(days=DEADLINE_DAYS[law]),
                        note,
                        now,
                    ],
                )
            ]
        )
    )
    return get(privacy, request_id)


def get(privacy: Privacy, request_id: str) -> dict[str, Any]:
    rows = privacy.store.query(f"SELECT {_FIELDS} FROM privacy_requests WHERE id = ?", [request_id])
    if not rows:
        raise RequestError(
            404,
            "request_not_found",
            "there is no request with that id",
            fix="list them with `kilde privacy requests`",
        )
    return _shown(rows[0])


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    open_ = row["state"] in ("open", "in_progress")
    left = (row["due_at"] - now).total_seconds() / 86400
    row["days_left"] = round(left, 1) if open_ else None
    row["overdue"] = open_ and left < 0
    return row


def listing(
    privacy: Privacy, *, state: str = "open", overdue: bool = False, limit: int = 200
) -> list[dict[str, Any]]:
    """Requests, the most urgent first; state `open` means open or in progress."""
    where, params = [], []
    if state == "open":
        where.append("state IN ('open', 'in_progress')")
    elif state != "all":
        where.append("state = ?")
        params.append(state)
    sql = f"SELECT {_FIELDS} FROM privacy_requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY due_at, received_at LIMIT ?"
    rows = [_shown(r) for r in privacy.store.query(sql, [*params, limit])]
    return [r for r in rows if r["overdue"]] if overdue else rows


def update(
    privacy: Privacy,
    request_id: str,
    *,
    verification: str | None = None,
    verification_method: str | None = None,
    state: str | None = None,
    outcome: str | None = None,
    extend: bool = False,
    note: str | None = None,
) -> dict[str, Any]:
    """Record progress; closing (done, refused) stamps the time and needs an outcome."""
    row = get(privacy, request_id)
    now = datetime.now(UTC)
    sets: list[str] = ["updated_at = ?"]
    params: list[Any] = [now]
    if verification is not None:
        sets += ["verification = ?", "verified_at = ?"]
        params += [verification, now if verification == "verified" else None]
    if verification_method is not None:
        sets.append("verification_method = ?")
        params.append(verification_method)
    if extend:
        if row["extended"]:
            raise RequestError(
                409,
                "already_extended",
                "the deadline of this request was already extended",
                fix="the law allows one extension; answer the request",
            )
        sets += ["extended = true", "due_at = due_at + ?"]
        params.append(timedelta(days=EXTENSION_DAYS[row["law"]]))
    if state is not None:
        if state in ("done", "refused") and not (outcome or row["outcome"]):
            raise RequestError(
                400,
                "missing_outcome",
                "closing a request needs its outcome",
                fix='give the outcome, for example --outcome "exported and sent by mail"',
            )
        sets.append("state = ?")
        params.append(state)
        sets.append("closed_at = ?")
        params.append(now if state in ("done", "refused") else None)
    if outcome is not None:
        sets.append("outcome = ?")
        params.append(outcome)
    if note is not None:
        sets.append("note = ?")
        params.append(note)
    privacy.writer.write_sync(
        WriteBatch(
            statements=[
                (
                    f"UPDATE privacy_requests SET {', '.join(sets)} WHERE id = ?",
                    [*params, request_id],
                )
            ]
        )
    )
    return get(privacy, request_id)


def check_for(privacy: Privacy, request_id: str, kind: str, subject: Subject) -> dict[str, Any]:
    """The request an export or erasure answers: of that kind, verified, about this person."""
    row = privacy.store.query(
        "SELECT id, kind, subject, verification, state FROM privacy_requests WHERE id = ?",
        [request_id],
    )
    if not row:
        raise RequestError(
            404,
            "request_not_found",
            "there is no request with that id",
            fix="list them with `kilde privacy requests`",
        )
    found = row[0]
    if found["kind"] != kind:
        raise RequestError(
            409,
            "wrong_request_kind",
            f"request {request_id} is a {found['kind']} request",
            fix=f"name a {kind} request, or log one with `kilde privacy requests add`",
        )
    if found["state"] in ("done", "refused"):
        raise RequestError(
            409,
            "request_closed",
            f"request {request_id} is already closed",
            fix="log a new request if the person asked again",
        )
    if found["verification"] != "verified":
        raise RequestError(
            409,
            "not_verified",
            "the requester's identity has not been verified",
            fix=f"verify it, then `kilde privacy requests update {request_id} --verified`",
        )
    if found["subject"] is not None:
        mine = {privacy.hasher.ident(i) for i in [*subject.given, *subject.identifiers]}
        mine |= {privacy.hasher.of("profile_id", p) for p in subject.profile_ids}
        if found["subject"] not in mine:
            raise RequestError(
                409,
                "other_person",
                "the person named is not the one the request is about",
                fix="name the person with the identifier given when the request was logged",
            )
    return found


def close_statement(request_id: str, outcome: str) -> tuple[str, list[Any]]:
    now = datetime.now(UTC)
    return (
        "UPDATE privacy_requests SET state = 'done', outcome = ?, closed_at = ?, updated_at = ? "
        "WHERE id = ?",
        [outcome, now, now, request_id],
    )
