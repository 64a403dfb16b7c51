"""Import runs in the server: start, take chunks (into `Pipeline.ingest`), finish.

The admin API endpoints and dashboard uploads both call these functions, so a chunk takes the
same way into the store whoever sends it.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson

from kilde.collect.importers.base import KINDS, ImportFailed
from kilde.collect.importers.broker import broker_provenance
from kilde.collect.importers.engine import ChunkResult, RunInfo
from kilde.collect.importers.mapping import BrokerTerms
from kilde.pipeline import Envelope, Pipeline
from kilde.pipeline.dead_letter import dead_letter_row, payload_field
from kilde.plan.models import Source
from kilde.store import Store, WriteBatch, Writer
from kilde.store.writer import recent_key

CHANNEL = "import"
_PREVIEW_COLUMNS = (
    "message_id",
    "type",
    "event",
    "user_id",
    "anonymous_id",
    "timestamp",
    "properties",
    "traits",
    "context",
    "plan_status",
    "plan_issues",
)


@dataclass
class Services:
    """What the run functions need from the server."""

    pipeline: Pipeline
    store: Store
    writer: Writer


def source_for(services: Services, name: str, kind: str) -> Source:
    if kind not in KINDS:
        raise ImportFailed(
            f"{kind!r} is not a kind of import", fix="use one of: " + ", ".join(KINDS)
        )
    source = services.pipeline.plan.source(name)
    if source is None:
        raise ImportFailed(
            f"the plan has no source named {name!r}",
            fix="add it to the plan's sources (kind import, or broker for bought data)",
        )
    if (source.kind == "broker") != (kind == "broker"):
        raise ImportFailed(
            f"source {name!r} is of kind {source.kind}; "
            + (
                "only broker files go there"
                if source.kind == "broker"
                else "broker files need a broker source"
            ),
            fix="import bought data with `kilde import broker` into a source of kind broker, and "
            "first-party data into any other source",
        )
    return source


def start_run(services: Services, info: RunInfo) -> str:
    source = source_for(services, info.source, info.kind)
    provenance: dict[str, Any] = {}
    if info.kind == "broker":
        terms = BrokerTerms(
            name=info.provenance.get("broker"),
            acquired=_date(info.provenance.get("acquired_on")),
            licence_expires=_date(info.provenance.get("licence_expires_on")),
            purpose=info.provenance.get("purpose"),
        )
        provenance = broker_provenance(terms, services.pipeline.plan, source)
        if provenance != info.provenance:
            raise ImportFailed(
                "the broker terms changed while the import started",
                fix="run the import again",
            )
    run_id = "imp_" + uuid.uuid4().hex[:20]
    services.writer.write_sync(
        WriteBatch(
            statements=[
                (
                    "INSERT INTO import_runs (id, kind, source, file_name, file_format, "
                    "file_bytes, tier, broker, acquired_on, licence_expires_on, purpose, "
                    "lawful_basis, started_at, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                    [
                        run_id,
                        info.kind,
                        info.source,
                        info.file_name[:500],
                        info.file_format,
                        info.file_bytes,
                        info.tier,
                        provenance.get("broker"),
                        provenance.get("acquired_on"),
                        provenance.get("licence_expires_on"),
                        provenance.get("purpose"),
                        provenance.get("lawful_basis"),
                        datetime.now(UTC),
                    ],
                )
            ]
        )
    )
    return run_id


def _date(value: Any) -> date | None:
    return date.fromisoformat(value) if isinstance(value, str) else None


def run_row(services: Services, run_id: str) -> dict[str, Any] | None:
    rows = services.store.query("SELECT * FROM import_runs WHERE id = ?", [run_id])
    if not rows:
        return None
    row = rows[0]
    if row.get("summary"):
        row["summary"] = orjson.loads(row["summary"])
    return row


def finish_run(services: Services, run_id: str, summary: dict[str, Any]) -> None:
    status = summary.get("status") if summary.get("status") in ("done", "failed") else "done"
    services.writer.write_sync(
        WriteBatch(
            statements=[
                (
                    "UPDATE import_runs SET finished_at = ?, status = ?, rows_read = ?, "
                    "records = ?, stored = ?, duplicates = ?, flagged = ?, rejected = ?, "
                    "summary = ? WHERE id = ?",
                    [
                        datetime.now(UTC),
                        status,
                        _count(summary, "rows_read"),
                        _count(summary, "records"),
                        _count(summary, "stored"),
                        _count(summary, "duplicates"),
                        _count(summary, "flagged"),
                        _count(summary, "rejected"),
                        orjson.dumps(_summary_kept(summary)).decode(),
                        run_id,
                    ],
                )
            ]
        )
    )


def _count(summary: dict[str, Any], key: str) -> int:
    value = summary.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _summary_kept(summary: dict[str, Any]) -> dict[str, Any]:
    # Errors hold line numbers, columns and reasons only; never cell values.
    keep = (
        "reasons",
        "first_errors",
        "details",
        "mapping",
        "ignored_columns",
        "seconds",
        "reject_file",
    )
    return {k: summary[k] for k in keep if k in summary}


def ingest_chunk(
    services: Services,
    *,
    source_name: str,
    kind: str,
    records: list[Any],
    rejects: list[dict[str, Any]],
    dry_run: bool = False,
    preview: int = 0,
) -> ChunkResult:
    """Store one chunk: records through `Pipeline.ingest`, unreadable rows as dead letters."""
    source = source_for(services, source_name, kind)
    env = Envelope(received_at=datetime.now(UTC), channel=CHANNEL)
    pipeline = services.pipeline
    result = ChunkResult()
    if dry_run:
        prepared = pipeline.prepare(records, source, env)
        for outcome in prepared.outcomes:
            if outcome.status == "dead_lettered":
                result.rejected.append(_rejection(outcome.index, outcome))
            elif outcome.status == "suppressed":
                result.suppressed += 1
            elif outcome.status == "withheld":
                result.withheld += 1
            else:
                result.stored += 1
                result.flagged += outcome.status == "flagged"
        result.preview = [_shown(row) for row in prepared.rows[:preview]]
        return result

    waiting = _pending_message_ids(services, source.name, records)
    stored_before = _stored_message_ids(services, source.name, records)
    fresh: list[Any] = []
    positions: list[int] = []
    for index, record in enumerate(records):
        message_id = record.get("messageId") if isinstance(record, dict) else None
        if message_id in stored_before:
            result.duplicates += 1
        elif message_id in waiting:
            result.rejected.append(
                {
                    "index": index,
                    "error": "already_dead_lettered",
                    "message": "an earlier import put this record in the dead letter, where it "
                    "still waits",
                    "path": None,
                    "fix": "fix the plan and run `kilde bad-events replay`, or correct the row",
                }
            )
        else:
            fresh.append(record)
            positions.append(index)
    if fresh:
        ingested = pipeline.ingest_sync(fresh, source, env)
        result.stored += ingested.stored
        result.duplicates += ingested.duplicates
        for outcome in ingested.outcomes:
            if outcome.status == "flagged":
                result.flagged += 1
            elif outcome.status == "suppressed":
                result.suppressed += 1
            elif outcome.status == "withheld":
                result.withheld += 1
            elif outcome.status == "dead_lettered":
                result.rejected.append(_rejection(positions[outcome.index], outcome))
    if rejects:
        _dead_letter_rows(services, source.name, rejects)
    return result


def _rejection(index: int, outcome: Any) -> dict[str, Any]:
    return {
        "index": index,
        "error": outcome.code,
        "message": outcome.reason,
        "path": outcome.path,
        "fix": outcome.fix,
    }


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    shown = {k: row.get(k) for k in _PREVIEW_COLUMNS}
    for key in ("properties", "traits", "context", "plan_issues"):
        value = shown[key]
        if isinstance(value, str):
            shown[key] = orjson.loads(value)
    if isinstance(shown["timestamp"], datetime):
        shown["timestamp"] = shown["timestamp"].isoformat()
    return shown


def _ids(records: list[Any]) -> list[str]:
    return [
        r["messageId"]
        for r in records
        if isinstance(r, dict) and isinstance(r.get("messageId"), str)
    ]


def _stored_message_ids(services: Services, source: str, records: list[Any]) -> set[str]:
    """Ids of this chunk already stored, beyond what the writer remembers.

    The writer keeps the most recent ids in memory; a re-run of a big file reaches further
    back than that, so the rest are looked up in the store.
    """
    recent = getattr(services.writer, "recent", None)
    unknown = _ids(records)
    if recent is not None:
        known = recent.seen([recent_key(source, i) for i in unknown])
        unknown = [i for i, k in zip(unknown, known, strict=True) if not k]
    if not unknown:
        return set()
    capacity = getattr(recent, "capacity", 0)
    if capacity and services.store.scalar("SELECT count(*) FROM events") < capacity:
        return set()  # the writer still remembers every stored id: nothing to look up
    rows = services.store.query(
        "SELECT message_id FROM events WHERE source = ? "
        "AND message_id IN (SELECT unnest(?::VARCHAR[]))",
        [source, unknown],
    )
    return {r["message_id"] for r in rows}


def _pending_message_ids(services: Services, source: str, records: list[Any]) -> set[str]:
    """Ids of this chunk that wait in the dead letter from an earlier import."""
    pending = services.store.scalar(
        "SELECT count(*) FROM dead_letters WHERE source = ? AND channel = ? AND status = 'pending'",
        [source, CHANNEL],
    )
    if not pending:
        return set()
    rows = services.store.query(
        "SELECT DISTINCT " + payload_field("$.messageId") + " AS id FROM dead_letters "
        "WHERE source = ? AND channel = ? AND status = 'pending' "
        "AND " + payload_field("$.messageId") + " IN (SELECT unnest(?::VARCHAR[]))",
        [source, CHANNEL, _ids(records)],
    )
    return {r["id"] for r in rows}


def _dead_letter_rows(services: Services, source: str, rejects: list[dict[str, Any]]) -> None:
    """Rows that never became records; the same row rejected again is kept once."""
    env = Envelope(received_at=datetime.now(UTC), channel=CHANNEL)
    rows = []
    for reject in rejects:
        row = dead_letter_row(
            reject.get("payload"),
            source=source,
            env=env,
            code=str(reject.get("error") or "invalid_row"),
            reason=str(reject.get("reason") or "the row cannot be imported"),
            path=reject.get("column"),
            message_type="import_row",
        )
        rows.append(row)
    digests = [hashlib.md5(r["payload"].encode()).hexdigest() for r in rows]
    known = services.store.query(
        "SELECT DISTINCT md5(payload) AS digest FROM dead_letters "
        "WHERE source = ? AND channel = ? AND status = 'pending' "
        "AND md5(payload) IN (SELECT unnest(?::VARCHAR[]))",
        [source, CHANNEL, digests],
    )
    seen = {r["digest"] for r in known}
    new_rows = []
    for row, digest in zip(rows, digests, strict=True):
        if digest not in seen:
            seen.add(digest)
            new_rows.append(row)
    if new_rows:
        services.writer.write_sync(WriteBatch(dead_letters=new_rows))
