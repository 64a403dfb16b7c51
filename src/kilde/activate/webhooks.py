"""Webhook destinations: signed JSON POSTs, at least once, in order per person.

An outbox table holds every delivery. Events are copied into it from the events table (never
from the collection path, so a destination that is down cannot slow collection), idempotently:
a delivery's id derives from the destination and the event. A dispatcher sends what is due,
oldest first, holding back a person's later deliveries while an earlier one is still failing;
failures are retried with exponential backoff and jitter until `max_attempts`, then the delivery
is dead and can be replayed. Every attempt is written to the delivery log.

Each request carries `Kilde-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "t.body">` and
`Kilde-Delivery-Id`, so a receiver can verify the sender, reject replays and drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from kilde.activate.permissions import Permission, permission, profile_of, raw_ids
from kilde.activate.segments import missing_segment_message, segment_exists
from kilde.plan.destinations import Destination
from kilde.plan.models import Plan
from kilde.store import Store, WriteBatch, Writer

log = logging.getLogger("kilde.activate")

RESCAN = timedelta(seconds=60)  # events may commit slightly out of arrival order
UNKNOWN_GRACE = timedelta(minutes=5)  # how long to wait for identity resolution to see someone
BATCH = 200
SALE_KINDS = ("google_customer_match", "meta_custom_audience", "partner_export")
_FIELDS = ("message_id", "source", "type", "event", "user_id", "anonymous_id", "timestamp")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    """What a receiver does: check the HMAC and that the timestamp is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def backoff(attempt: int) -> float:
    """Seconds before the next attempt: 1, 2, 4, ... capped at an hour, with jitter."""
    base: float = min(3600.0, 2.0 ** max(0, attempt - 1))
    return base * random.uniform(0.5, 1.0)


def _path(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def payload_of(destination: Destination, event: dict[str, Any]) -> dict[str, Any]:
    """The JSON a receiver gets: the mapped fields, or the event without its context."""
    if destination.mapping:
        body = {out: _path(event, source) for out, source in destination.mapping.items()}
    else:
        body = {k: event[k] for k in (*_FIELDS, "properties", "traits") if k in event}
    return body


# Answers where sending the same request again can succeed; any other 4xx cannot (a wrong
# secret or credentials, an unknown path, a rejected body), so the delivery goes to the dead
# letters at once, to be replayed once the receiver or the plan is fixed.
RETRYABLE_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to, in words the delivery log can show."""

    status: int | None
    error: str | None
    retryable: bool
    retry_after: float | None  # seconds the receiver asked us to wait (429, 503)


def transport_error(exc: httpx.HTTPError, timeout: float) -> str:
    """A clear reason for a request that got no answer (never the URL: it may hold a token)."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"{name}: no answer within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"{name}: the receiver is unreachable (connection failed)"
    return f"{name}: the request failed in transit"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return min(3600.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


def outcome_of(response: httpx.Response) -> Outcome:
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(code, None, True, None)
    if code >= 500 or code in RETRYABLE_STATUS:
        return Outcome(code, f"HTTP {code}: the receiver failed", True, _retry_after(response))
    if code in (401, 403):
        reason = "the receiver refused our credentials or signature; check the secret, then replay"
    else:
        reason = "the receiver rejected the request; retrying cannot help; fix it, then replay"
    return Outcome(code, f"HTTP {code}: {reason}", False, None)


@dataclass
class RunReport:
    enqueued: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


class WebhookDispatcher:
    """Moves events into the outbox and delivers them; one per server."""

    def __init__(self, store: Store, writer: Writer, plan: Plan) -> None:
        self.store = store
        self.writer = writer
        self.plan = plan
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill)
        self._reported: set[tuple[str, str]] = set()  # (destination, missing segment) logged

    # -- outbox -------------------------------------------------------------------------------

    def enqueue_statement(self, destination: Destination, now: datetime) -> tuple[str, list[Any]]:
        """One INSERT ... SELECT that copies new matching events into the outbox."""
        marks = ", ".join("?" for _ in destination.events) or "NULL"
        segment_filter = ""
        params: list[Any] = [destination.name, destination.name, now, *destination.events]
        if destination.segments:
            seg_marks = ", ".join("?" for _ in destination.segments)
            segment_filter = (
                " OR (event IN ('Segment Entered', 'Segment Exited') AND "
                f"json_extract_string(properties, '$.segment') IN ({seg_marks}))"
            )
            params.extend(destination.segments)
        params.extend([destination.name, now - RESCAN])
        sql = f"""
            INSERT OR IGNORE INTO deliveries
                (id, destination, person, seq, event, state, attempts, next_attempt_at,
                 created_at)
            SELECT md5(? || '/' || source || '/' || message_id), ?,
                   coalesce(user_id, anonymous_id), nextval('delivery_seq'),
                   json_object('message_id', message_id, 'source', source, 'type', type,
                               'event', event, 'user_id', user_id,
                               'anonymous_id', anonymous_id, 'timestamp', timestamp,
                               'properties', properties, 'traits', traits),
                   'pending', 0, ?, now()
            FROM (
                SELECT * FROM events
                WHERE (event IN ({marks}){segment_filter})
                  AND received_at >= coalesce(
                      (SELECT watermark FROM destination_state WHERE destination = ?), ?)
                ORDER BY received_at, message_id
            )
        """
        return sql, params

    def enqueue(self, destination: Destination) -> int:
        now = datetime.now(UTC)
        before = self._count(destination.name)
        sql, params = self.enqueue_statement(destination, now)
        watermark = now - RESCAN
        state = (
            "INSERT OR REPLACE INTO destination_state (destination, watermark, last_run_at) "
            "VALUES (?, ?, ?)"
        )
        self.writer.write_sync(
            WriteBatch(statements=[(sql, params), (state, [destination.name, watermark, now])])
        )
        return self._count(destination.name) - before

    def _count(self, name: str) -> int:
        return int(
            self.store.scalar("SELECT count(*) FROM deliveries WHERE destination = ?", [name])
        )

    def due(self, destination: Destination, limit: int = BATCH) -> list[dict[str, Any]]:
        """Pending deliveries whose time has come, each person's oldest only."""
        return self.store.query(
            """
            SELECT d.* FROM deliveries d
            WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at <= now()
              AND NOT EXISTS (
                  SELECT 1 FROM deliveries e
                  WHERE e.destination = d.destination AND e.person = d.person
                    AND e.state = 'pending' AND e.seq < d.seq)
            ORDER BY d.seq LIMIT ?
            """,
            [destination.name, limit],
        )

    # -- sending ------------------------------------------------------------------------------

    async def _take_token(self, destination: Destination) -> None:
        rate = destination.rate_limit
        while True:
            tokens, last = self._buckets.get(destination.name, (rate, time.monotonic()))
            now = time.monotonic()
            tokens = min(rate, tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[destination.name] = (tokens - 1, now)
                return
            self._buckets[destination.name] = (tokens, now)
            await asyncio.sleep((1 - tokens) / rate)

    async def _send(
        self, client: httpx.AsyncClient, destination: Destination, delivery: dict[str, Any]
    ) -> tuple[Outcome, float]:
        assert destination.url and destination.secret
        event = orjson.loads(delivery["event"])
        for key in ("properties", "traits"):
            if isinstance(event.get(key), str):
                event[key] = orjson.loads(event[key])
        body = orjson.dumps(
            {
                "id": delivery["id"],
                "destination": destination.name,
                "attempt": delivery["attempts"] + 1,
                "data": payload_of(destination, event),
            }
        )
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Kilde-Webhooks/1",
            "Kilde-Delivery-Id": delivery["id"],
            "Kilde-Signature": sign(destination.secret, stamp, body),
        }
        await self._take_token(destination)
        started = time.perf_counter()
        try:
            response = await client.post(
                destination.url, content=body, headers=headers, timeout=destination.timeout
            )
        except httpx.HTTPError as exc:
            return Outcome(None, transport_error(exc, destination.timeout), True, None), (
                time.perf_counter() - started
            )
        return outcome_of(response), time.perf_counter() - started

    async def deliver(self, destination: Destination) -> RunReport:
        """Send every due delivery of one destination once; record the outcomes."""
        report = RunReport()
        async with httpx.AsyncClient() as client:
            while True:
                # Reads run in a thread: the event loop serves collection meanwhile.
                due = await asyncio.to_thread(self.due, destination)
                if not due:
                    break
                # Checked at the moment of use: a withdrawal counts from the next round on.
                allowed = await asyncio.to_thread(
                    permission, self.store, self.plan, destination.purpose
                )
                statements = await self._round(client, destination, due, allowed, report)
                # Failed deliveries are due again only after their backoff, so this ends.
                await self.writer.write(WriteBatch(statements=statements))
        return report

    async def _round(
        self,
        client: httpx.AsyncClient,
        destination: Destination,
        due: list[dict[str, Any]],
        allowed: Permission,
        report: RunReport,
    ) -> list[tuple[str, list[Any]]]:
        sendable, statements = await asyncio.to_thread(
            self._screen, destination, due, allowed, report
        )
        return await self._send_all(client, destination, sendable, statements, report)

    def _screen(
        self,
        destination: Destination,
        due: list[dict[str, Any]],
        allowed: Permission,
        report: RunReport,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, list[Any]]]]:
        """Who may be sent now; the others wait for identity resolution or are skipped."""
        statements: list[tuple[str, list[Any]]] = []
        sendable = []
        now = datetime.now(UTC)
        for delivery in due:
            event = orjson.loads(delivery["event"])
            profile = profile_of(self.store, event.get("user_id"), event.get("anonymous_id"))
            ids = raw_ids(event.get("user_id"), event.get("anonymous_id"))
            ok, why = allowed.allows(profile, ids, sale=destination.kind in SALE_KINDS)
            if ok:
                sendable.append(delivery)
            elif profile is None and now - delivery["created_at"] < UNKNOWN_GRACE:
                # Identity resolution has not seen this person yet: ask again shortly.
                statements.append(
                    (
                        "UPDATE deliveries SET next_attempt_at = ? WHERE id = ?",
                        [now + timedelta(seconds=2), delivery["id"]],
                    )
                )
            else:
                report.skipped += 1
                statements.append(
                    (
                        "UPDATE deliveries SET state = 'skipped', last_error = ? WHERE id = ?",
                        [why, delivery["id"]],
                    )
                )
        return sendable, statements

    async def _send_all(
        self,
        client: httpx.AsyncClient,
        destination: Destination,
        sendable: list[dict[str, Any]],
        statements: list[tuple[str, list[Any]]],
        report: RunReport,
    ) -> list[tuple[str, list[Any]]]:
        results = await asyncio.gather(*(self._send(client, destination, d) for d in sendable))
        now = datetime.now(UTC)
        for delivery, (outcome, elapsed) in zip(sendable, results, strict=True):
            status, error = outcome.status, outcome.error
            attempt = delivery["attempts"] + 1
            statements.append(
                (
                    "INSERT INTO delivery_log (delivery_id, destination, attempt, attempted_at, "
                    "status, error, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [delivery["id"], destination.name, attempt, now, status, error, elapsed * 1000],
                )
            )
            if error is None:
                report.delivered += 1
                statements.append(
                    (
                        "UPDATE deliveries SET state = 'delivered', attempts = ?, "
                        "last_status = ?, last_error = NULL, delivered_at = ? WHERE id = ?",
                        [attempt, status, now, delivery["id"]],
                    )
                )
            elif attempt >= destination.max_attempts or not outcome.retryable:
                report.dead += 1
                report.errors.append(error)
                statements.append(
                    (
                        "UPDATE deliveries SET state = 'dead', attempts = ?, last_status = ?, "
                        "last_error = ? WHERE id = ?",
                        [attempt, status, error, delivery["id"]],
                    )
                )
            else:
                report.failed += 1
                report.errors.append(error)
                statements.append(
                    (
                        "UPDATE deliveries SET state = 'pending', attempts = ?, last_status = ?, "
                        "last_error = ?, next_attempt_at = ? WHERE id = ?",
                        [
                            attempt,
                            status,
                            error,
                            now
                            + timedelta(seconds=max(backoff(attempt), outcome.retry_after or 0.0)),
                            delivery["id"],
                        ],
                    )
                )
        return statements

    async def run_once(self, destination: Destination) -> RunReport:
        problems = await asyncio.to_thread(self._missing_segments, destination)
        enqueued = await asyncio.to_thread(self.enqueue, destination)
        report = await self.deliver(destination)
        report.enqueued = enqueued
        report.errors[:0] = problems
        return report

    def _missing_segments(self, destination: Destination) -> list[str]:
        """Segments the webhook names that no longer exist: said once in the delivery log."""
        problems = []
        statements: list[tuple[str, list[Any]]] = []
        for segment in destination.segments:
            if segment_exists(self.store, self.plan, segment):
                self._reported.discard((destination.name, segment))
                continue
            message = f"{missing_segment_message(segment)}; its changes cannot be sent"
            problems.append(message)
            if (destination.name, segment) not in self._reported:
                self._reported.add((destination.name, segment))
                statements.append(
                    (
                        "INSERT INTO delivery_log (delivery_id, destination, attempt, "
                        "attempted_at, status, error, duration_ms) "
                        "VALUES (?, ?, 1, ?, NULL, ?, NULL)",
                        [f"segment:{segment}", destination.name, datetime.now(UTC), message],
                    )
                )
        if statements:
            self.writer.write_sync(WriteBatch(statements=statements))
        return problems

    def replay_statement(self, name: str) -> tuple[str, list[Any]]:
        """Dead deliveries of a destination become due again."""
        return (
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = now() "
            "WHERE destination = ? AND state = 'dead'",
            [name],
        )
