"""Replay dead letters through the pipeline, typically after the plan has been fixed.

A dead letter that now passes becomes events and is marked `replayed`; one that still fails
stays `pending` with its new reason. Both happen in one transaction with the new events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from kilde.pipeline.consent import ledger_statements
from kilde.pipeline.dead_letter import dead_letter_row
from kilde.pipeline.ingest import Pipeline
from kilde.pipeline.normalize import Envelope, batch_items
from kilde.store.writer import WriteBatch


@dataclass
class ReplayReport:
    replayed: int = 0
    still_failing: int = 0
    events_stored: int = 0
    duplicates: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _records_of(letter: dict[str, Any], envelope: dict[str, Any]) -> tuple[list[Any], str | None]:
    """The records a dead letter holds, and the message type they were sent as."""
    message_type = envelope.get("type")
    payload = orjson.loads(letter["payload"])  # raises for bodies that are still not JSON
    if envelope.get("raw") and isinstance(payload, dict):
        if message_type in ("batch", "import") or (message_type is None and "batch" in payload):
            if isinstance(payload.get("batch"), list):
                return batch_items(payload), None
            return [payload], None
        payload.pop("writeKey", None)
    return [payload], (None if message_type in ("batch", "import") else message_type)


def replay(pipeline: Pipeline, letters: list[dict[str, Any]]) -> ReplayReport:
    report = ReplayReport()
    batch = WriteBatch()
    now = datetime.now(UTC)
    for letter in letters:
        envelope = orjson.loads(letter["envelope"] or "{}")
        source = pipeline.plan.source(letter["source"] or "")
        reason: tuple[str, str | None] | None = None
        if source is None:
            reason = ("the source of this record is no longer in the collection plan", "source")
        else:
            try:
                records, message_type = _records_of(letter, envelope)
            except orjson.JSONDecodeError:
                reason = ("the payload is still not valid JSON", None)
            else:
                env = Envelope(
                    received_at=letter["received_at"].astimezone(UTC),
                    channel=letter["channel"],
                    ip=envelope.get("ip"),
                    user_agent=envelope.get("user_agent"),
                )
                prepared = pipeline.prepare(records, source, env, message_type)
                if prepared.rejections and len(prepared.rejections) == len(records):
                    first = prepared.rejections[0][1]
                    reason = (first.message, first.path)
                else:
                    batch.events.extend(prepared.rows)
                    # What ingesting them would have written beside them: consent ledger rows
                    # (idempotent per message) and the privacy screen's counts.
                    batch.statements.extend(
                        ledger_statements(prepared.rows, pipeline.plan, env.channel)
                    )
                    batch.statements.extend(
                        pipeline.privacy.statements(prepared.privacy, source.name, env)
                    )
                    # Items of a whole-body letter that still fail get letters of their own.
                    for index, rejection in prepared.rejections:
                        batch.dead_letters.append(
                            dead_letter_row(
                                records[index],
                                source=source.name,
                                env=env,
                                code=rejection.code,
                                reason=rejection.message,
                                path=rejection.path,
                                message_type=message_type,
                                ip_policy=pipeline.plan.privacy.ip,
                            )
                        )
        if reason is None:
            report.replayed += 1
            batch.statements.append(
                (
                    "UPDATE dead_letters SET status = 'replayed', replay_count = replay_count + 1, "
                    "last_replayed_at = ? WHERE id = ?",
                    [now, letter["id"]],
                )
            )
        else:
            report.still_failing += 1
            report.failures.append({"id": letter["id"], "reason": reason[0], "path": reason[1]})
            batch.statements.append(
                (
                    "UPDATE dead_letters SET reason = ?, path = ?, "
                    "replay_count = replay_count + 1, last_replayed_at = ? WHERE id = ?",
                    [reason[0], reason[1], now, letter["id"]],
                )
            )
    written = pipeline.writer.write_sync(batch)
    report.events_stored = written.stored
    report.duplicates = written.duplicates
    return report
