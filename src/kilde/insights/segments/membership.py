"""Segment definitions, memberships with entered/exited times, and refreshing them.

A refresh evaluates a segment's rule, compares the result with the current members, records who
entered and who left (closing or opening membership rows) and emits `Segment Entered` and
`Segment Exited` events for them through the pipeline, under the plan's
`segments.events_source`, so destinations and the profiles' timelines see them like any event.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ibis
import ibis.expr.types as ir
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from kilde.errors import KildeError
from kilde.insights.data import backend_of
from kilde.insights.segments.compiler import Context, check, members
from kilde.insights.segments.rules import RuleError, parse_rule
from kilde.pipeline import Pipeline
from kilde.pipeline.normalize import Envelope
from kilde.plan.models import Plan
from kilde.plan.segments import SEGMENT_ID
from kilde.store.database import Store
from kilde.store.writer import WriteBatch, Writer

ENTERED = "Segment Entered"
EXITED = "Segment Exited"
EVENT_CHUNK = 2_000
CHANNEL = "segments"


class SegmentNotFoundError(KildeError):
    """No segment has the id asked for."""


@dataclass(frozen=True)
class SegmentDef:
    id: str
    name: str
    description: str | None
    rule: dict[str, Any]
    origin: str  # "plan" or "api"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "rule": self.rule,
            "origin": self.origin,
        }


def definitions(store: Store, plan: Plan) -> dict[str, SegmentDef]:
    """Every segment: the plan's first, then those saved through the API."""
    found = {
        s.id: SegmentDef(s.id, s.name, s.description, dict(s.rule), "plan")
        for s in plan.segments.definitions
    }
    for row in store.query(
        "SELECT id, name, description, rule FROM segment_definitions ORDER BY id"
    ):
        if row["id"] not in found:
            found[row["id"]] = SegmentDef(
                row["id"], row["name"], row["description"], orjson.loads(row["rule"]), "api"
            )
    return found


def get(store: Store, plan: Plan, segment_id: str) -> SegmentDef:
    found = definitions(store, plan).get(segment_id)
    if found is None:
        raise SegmentNotFoundError(
            f"there is no segment {segment_id!r}",
            fix="list them with `kilde segment list`; define one in the plan or save one with "
            "`kilde segment save`",
        )
    return found


def context(store: Store, plan: Plan, now: datetime | None = None) -> Context:
    rules = {d.id: d.rule for d in definitions(store, plan).values()}
    return Context(backend_of(store), plan, now or datetime.now(UTC), rules)


def validate(store: Store, plan: Plan, rule: Any, segment_id: str | None = None) -> None:
    """Raise RuleError at the first wrong part of `rule` (shape, names, types, cycles)."""
    ctx = context(store, plan)
    if segment_id is not None:
        ctx.segments = {**ctx.segments, segment_id: rule}
        ctx._stack.append(segment_id)
    check(parse_rule(rule, "rule"), ctx)


def save(
    store: Store,
    writer: Writer,
    plan: Plan,
    segment_id: str,
    name: str,
    description: str | None,
    rule: dict[str, Any],
) -> SegmentDef:
    """Create or replace a segment defined through the API."""
    if not SEGMENT_ID.match(segment_id):
        raise RuleError(
            "id",
            "a segment id uses lower-case letters, digits, '-' and '_' (at most 64)",
            fix="for example high-value-at-risk",
        )
    if plan.segments.get(segment_id) is not None:
        raise RuleError(
            "id",
            f"segment {segment_id!r} is defined in the plan",
            fix="change it in kilde.yaml, or save this one under another id",
        )
    validate(store, plan, rule, segment_id)
    now = datetime.now(UTC)
    writer.write_sync(
        WriteBatch(
            statements=[
                (
                    "INSERT INTO segment_definitions VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) "
                    "DO UPDATE SET name = excluded.name, description = excluded.description, "
                    "rule = excluded.rule, updated_at = excluded.updated_at",
                    [segment_id, name, description, orjson.dumps(rule).decode(), now, now],
                )
            ]
        )
    )
    return SegmentDef(segment_id, name, description, rule, "api")


def delete(store: Store, writer: Writer, plan: Plan, segment_id: str) -> None:
    found = get(store, plan, segment_id)
    if found.origin == "plan":
        raise RuleError("id", "this segment is defined in the plan", fix="remove it there")
    now = datetime.now(UTC)
    writer.write_sync(
        WriteBatch(
            statements=[
                ("DELETE FROM segment_definitions WHERE id = ?", [segment_id]),
                (
                    "UPDATE segment_memberships SET exited_at = ? "
                    "WHERE segment_id = ? AND exited_at IS NULL",
                    [now, segment_id],
                ),
            ]
        )
    )


# -- reading memberships ----------------------------------------------------------------------


def counts(store: Store) -> dict[str, dict[str, Any]]:
    """Current members and the latest run of every segment that has been refreshed."""
    rows = store.query(
        "SELECT segment_id, count(*) FILTER (WHERE exited_at IS NULL) AS members "
        "FROM segment_memberships GROUP BY ALL"
    )
    out: dict[str, dict[str, Any]] = {r["segment_id"]: {"members": r["members"]} for r in rows}
    for run in store.query(
        "SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (PARTITION BY segment_id "
        "ORDER BY refreshed_at DESC) AS rn FROM segment_runs) WHERE rn = 1"
    ):
        out.setdefault(run["segment_id"], {"members": 0})["last_run"] = run
    return out


def history(store: Store, segment_id: str, limit: int = 50) -> list[dict[str, Any]]:
    return store.query(
        "SELECT refreshed_at, members, entered, exited, seconds, error FROM segment_runs "
        "WHERE segment_id = ? ORDER BY refreshed_at DESC LIMIT ?",
        [segment_id, limit],
    )


WHY_COLUMNS = (
    "rfm_group",
    "rfm_score",
    "clv",
    "p_alive",
    "churn_risk",
    "churn_flag",
    "orders",
    "total_revenue",
    "last_order_at",
)


def member_rows(
    store: Store, segment_id: str, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Current members with when they entered and why (RFM, CLV, churn, orders)."""
    backend = backend_of(store)
    memberships = backend.table("segment_memberships")
    current = memberships.filter(
        (memberships.segment_id == segment_id) & memberships.exited_at.isnull()
    )
    total = int(current.count().to_pyarrow().as_py() or 0)
    insights = backend.table("profile_insights").select(
        "profile_id", "rfm_group", "rfm_score", "clv", "p_alive", "churn_risk", "churn_flag"
    )
    profiles = backend.table("profiles").select(
        "profile_id", "orders", "total_revenue", "last_order_at"
    )
    joined = (
        current.select("profile_id", "entered_at")
        .left_join(insights, "profile_id")
        .drop("profile_id_right")
        .left_join(profiles, "profile_id")
        .drop("profile_id_right")
    )
    page = joined.order_by([ibis.desc("clv", nulls_first=False), "profile_id"]).limit(
        limit, offset=offset
    )
    rows: list[dict[str, Any]] = page.to_pyarrow().to_pylist()
    return [_rounded(r) for r in rows], total


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("clv", "p_alive", "churn_risk", "total_revenue"):
        if isinstance(row.get(key), float):
            row[key] = round(row[key], 4 if key in ("p_alive", "churn_risk") else 2)
    return row


def profile_segments(store: Store, profile_id: str) -> list[str]:
    rows = store.query(
        "SELECT DISTINCT segment_id FROM segment_memberships "
        "WHERE profile_id = ? AND exited_at IS NULL ORDER BY segment_id",
        [profile_id],
    )
    return [r["segment_id"] for r in rows]


# -- preview and refresh ----------------------------------------------------------------------

SAMPLE_COLUMNS = ("profile_id", *WHY_COLUMNS)


def preview(store: Store, plan: Plan, rule: Any, sample: int = 10) -> dict[str, Any]:
    """How many profiles a rule selects now, and a sample of them with why."""
    ctx = context(store, plan)
    node = check(parse_rule(rule, "rule"), ctx)
    selected = members(node, ctx)
    count = int(selected.count().to_pyarrow().as_py())
    rows = (
        selected.select(*SAMPLE_COLUMNS)
        .order_by([ibis.desc("clv"), "profile_id"])
        .limit(sample)
        .to_pyarrow()
        .to_pylist()
    )
    profiles = int(store.scalar("SELECT count(*) FROM profiles") or 0)
    computed = store.scalar("SELECT max(computed_at) FROM profile_insights")
    return {
        "count": count,
        "profiles": profiles,
        "share": round(count / profiles, 4) if profiles else 0.0,
        "sample": [_rounded(r) for r in rows],
        "insights_computed_at": computed,
    }


@dataclass
class RunResult:
    segment_id: str
    members: int
    entered: int
    exited: int
    events: int
    seconds: float
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _message_id(segment_id: str, profile_id: str, kind: str, at: datetime) -> str:
    digest = hashlib.sha256(f"{segment_id}|{profile_id}|{kind}|{at.isoformat()}".encode())
    return "seg-" + digest.hexdigest()[:32]


def _who(backend: Any, profiles: ir.Table) -> ir.Table:
    """profile_id, id_type, id_value: the identifier to send each profile's events under."""
    idmap = backend.table("identity_map")
    ids = idmap.filter(idmap.id_type.isin(["user_id", "anonymous_id"]))
    ids = ids.semi_join(profiles, "profile_id")
    ranked = ids.mutate(
        _rn=ibis.row_number().over(
            group_by=ids.profile_id,
            order_by=[
                ibis.desc(ids.id_type == "user_id"),
                ibis.desc(ids.last_seen),
                ids.id_value,
            ],
        )
    )
    result: ir.Table = ranked.filter(ranked._rn == 0).select("profile_id", "id_type", "id_value")
    return result


def _messages(
    rows: list[dict[str, Any]], segment: SegmentDef, kind: str, at: datetime
) -> Iterator[dict[str, Any]]:
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for row in rows:
        who = {"userId" if row["id_type"] == "user_id" else "anonymousId": row["id_value"]}
        yield {
            "type": "track",
            "event": kind,
            "messageId": _message_id(segment.id, row["profile_id"], kind, at),
            "timestamp": stamp,
            **who,
            "properties": {
                "segment": segment.id,
                "segment_name": segment.name,
                "profile_id": row["profile_id"],
            },
            "context": {"library": {"name": "kilde-segments"}},
        }


def retired(backend: Any, exited: list[str]) -> dict[str, str]:
    """{retired id: current id} for those of `exited` whose profile id a merge retired: the
    profile their anchor identifier lives in now.

    If that profile is a member, the person neither left nor entered: no Segment Exited or
    Entered for them; their membership moves to the current id and keeps its entered time.
    """
    if not exited:
        return {}
    ids = backend.table("profile_ids")
    idmap = backend.table("identity_map")
    old = ids.filter(ids.profile_id.isin(exited)).select(
        old_id=ids.profile_id, id_type=ids.anchor_type, id_value=ids.anchor_value
    )
    now = old.join(idmap.select("id_type", "id_value", "profile_id"), ["id_type", "id_value"])
    now = now.filter(now.profile_id != now.old_id).select("old_id", "profile_id").distinct()
    return {r["old_id"]: r["profile_id"] for r in backend.to_pyarrow(now).to_pylist()}


def refresh(
    store: Store,
    writer: Writer,
    pipeline: Pipeline,
    segment: SegmentDef,
    scratch: Path,
    now: datetime | None = None,
) -> RunResult:
    """Evaluate one segment, store who entered and left, and emit their events."""
    started = time.perf_counter()
    plan = pipeline.plan
    now = now or datetime.now(UTC)
    ctx = context(store, plan, now)
    ctx._stack.append(segment.id)
    backend = ctx.backend
    try:
        node = check(parse_rule(segment.rule, "rule"), ctx)
    except RuleError as exc:
        writer.write_sync(
            WriteBatch(statements=[_run_row(segment.id, now, 0, 0, 0, 0.0, exc.message)])
        )
        raise
    new_path = scratch / f"{segment.id}-members.parquet"
    backend.to_parquet(members(node, ctx).select("profile_id").distinct(), new_path)
    new = backend.read_parquet(str(new_path))
    memberships = backend.table("segment_memberships")
    current = memberships.filter(
        (memberships.segment_id == segment.id) & memberships.exited_at.isnull()
    ).select("profile_id")
    leaving = current.anti_join(new, "profile_id")
    moved = retired(backend, backend.to_pyarrow(leaving).column("profile_id").to_pylist())
    if moved:
        still = new.filter(new.profile_id.isin(sorted(set(moved.values()))))
        kept = set(backend.to_pyarrow(still).column("profile_id").to_pylist())
        moved = {old: current for old, current in moved.items() if current in kept}
    moved_path = scratch / f"{segment.id}-moved.parquet"
    pq.write_table(
        pa.table(
            {"old_id": list(moved), "profile_id": list(moved.values())},
            pa.schema([("old_id", pa.string()), ("profile_id", pa.string())]),
        ),
        moved_path,
    )
    moves = backend.read_parquet(str(moved_path))
    entered = new.anti_join(current, "profile_id").anti_join(moves, "profile_id")
    exited = leaving.anti_join(moves.select(profile_id=moves.old_id), "profile_id")
    entered_path = scratch / f"{segment.id}-entered.parquet"
    exited_path = scratch / f"{segment.id}-exited.parquet"
    backend.to_parquet(entered, entered_path)
    backend.to_parquet(exited, exited_path)
    n_members = pq.read_metadata(new_path).num_rows
    n_entered = pq.read_metadata(entered_path).num_rows
    n_exited = pq.read_metadata(exited_path).num_rows
    note = None
    events = 0
    source = plan.source(plan.segments.events_source)
    if source is None:
        note = (
            f"no events emitted: the plan has no source {plan.segments.events_source!r} "
            "(segments.events_source)"
        )
    elif n_entered or n_exited:
        env = Envelope(received_at=now, channel=CHANNEL)
        for kind, path in ((ENTERED, entered_path), (EXITED, exited_path)):
            who = _who(backend, backend.read_parquet(str(path)))
            for batch in who.to_pyarrow().to_batches(max_chunksize=EVENT_CHUNK):
                messages = list(_messages(batch.to_pylist(), segment, kind, now))
                if messages:
                    result = pipeline.ingest_sync(messages, source, env)
                    events += result.stored
                    if result.dead_lettered and note is None:
                        note = (
                            f"{result.dead_lettered} segment events went to the dead letter: "
                            "declare Segment Entered and Segment Exited in the plan"
                        )
    seconds = time.perf_counter() - started
    writer.write_sync(
        WriteBatch(
            statements=[
                *_move_statements(segment.id, now, str(moved_path)),
                (
                    "UPDATE segment_memberships SET exited_at = ? WHERE segment_id = ? "
                    "AND exited_at IS NULL AND profile_id IN "
                    "(SELECT profile_id FROM read_parquet(?))",
                    [now, segment.id, str(exited_path)],
                ),
                (
                    "INSERT INTO segment_memberships SELECT ?, profile_id, ?, NULL "
                    "FROM read_parquet(?)",
                    [segment.id, now, str(entered_path)],
                ),
                _run_row(segment.id, now, n_members, n_entered, n_exited, seconds, note),
            ]
        )
    )
    return RunResult(segment.id, n_members, n_entered, n_exited, events, seconds, note)


def _move_statements(segment_id: str, now: datetime, moved: str) -> list[tuple[str, list[Any]]]:
    """Retired ids' rows are closed; the current id gets one open row with the earliest entered
    time, unless it already has one (two members merged)."""
    return [
        (
            "INSERT INTO segment_memberships "
            "SELECT ?, m.profile_id, min(s.entered_at), NULL FROM read_parquet(?) m "
            "JOIN segment_memberships s ON s.segment_id = ? AND s.profile_id = m.old_id "
            "AND s.exited_at IS NULL "
            "WHERE m.profile_id NOT IN (SELECT profile_id FROM segment_memberships "
            "WHERE segment_id = ? AND exited_at IS NULL) GROUP BY m.profile_id",
            [segment_id, moved, segment_id, segment_id],
        ),
        (
            "UPDATE segment_memberships SET exited_at = ? WHERE segment_id = ? "
            "AND exited_at IS NULL AND profile_id IN (SELECT old_id FROM read_parquet(?))",
            [now, segment_id, moved],
        ),
    ]


def _run_row(
    segment_id: str,
    now: datetime,
    members_: int,
    entered: int,
    exited: int,
    seconds: float,
    error: str | None,
) -> tuple[str, list[Any]]:
    return (
        "INSERT INTO segment_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
        [segment_id, now, members_, entered, exited, seconds, error],
    )
