"""`kilde compute`: the batch compute on a chosen backend, through the same code either way.

What runs, in order: identity resolution (identifiers read from the events, the identity graph
stitched, profiles built with trait precedence and computed traits), the profile insights (RFM,
lifetime value, churn, preferences) and the segments (memberships, with Segment Entered and
Segment Exited events).

- `duckdb:PATH`: the engines `kilde serve` runs (IdentityEngine, InsightsEngine) on the data
  directory's store. The server must not be running (DuckDB has one writing process).
- `spark:MASTER`: the lake's events (kilde.store.lake) and the Parquet state tables next to
  them. The algorithms are the very functions the engines call: extraction (identity.extract,
  `extract_rich` inside Spark's Python workers), `stitch_outputs` (stitching, connected
  components, the greedy merge rules, profiles and traits), `scores.compute` (RFM, CLV, churn,
  preferences) and the segment compiler (`members`). Only where results are kept differs:
  Parquet state tables instead of the store, and segment events appended to the lake.

Retention and erasure of lake files are file rewrites (kilde.store.compaction), done with the
privacy module's own SQL per file.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ibis
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kilde.identity import extract
from kilde.identity.engine import (
    OBSERVATION_SCHEMA,
    RECORD_SCHEMA,
    extract_rich,
    rich_records,
    stitch_outputs,
)
from kilde.identity.identifiers import Identifier, Normaliser
from kilde.identity.stitching import Separation
from kilde.plan.models import IdentityRules, Plan
from kilde.store.backends import (
    SparkRunner,
    StateTables,
    conform,
    spark_ibis,
    spark_sql,
    table_schema,
)
from kilde.store.lake import EVENTS, Lake, LakeWriter, collector_store
from kilde.store.schema import EVENT_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from kilde.pipeline import Pipeline

STEPS = ("identity", "insights", "segments")

# The state Spark reads and writes: the store tables the compute reads or produces.
STATE_TABLES = (
    "identity_state",
    "identity_separations",
    "identity_records",
    "identity_observations",
    "identity_map",
    "identity_conflicts",
    "profiles",
    "profile_traits",
    "profile_ids",
    "profile_insights",
    "insight_state",
    "segment_definitions",
    "segment_memberships",
    "segment_runs",
    "consent_ledger",
)
# What the lake export copies from a store: what cannot be recomputed from the events.
KEPT_STATE = (
    "privacy_state",
    "suppression_list",
    "identity_state",
    "identity_separations",
    "profile_ids",
    "segment_definitions",
    "segment_memberships",
    "segment_runs",
    "consent_ledger",
)

Say = Callable[[str], None]


@dataclass
class ComputeReport:
    store: str
    now: datetime
    steps: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "now": self.now.isoformat(),
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
        }


def _timed(report: ComputeReport, name: str, work: Callable[[], Any]) -> None:
    started = time.perf_counter()
    result = work()
    report.steps[name] = {"seconds": round(time.perf_counter() - started, 3), "result": result}


def rules_hash(rules: IdentityRules) -> str:
    """The fingerprint of the plan's identity rules (as the identity engine keeps it)."""
    return hashlib.sha256(rules.model_dump_json().encode()).hexdigest()[:16]


# -- DuckDB: the server's engines on the store ---------------------------------------------------


def compute_duckdb(
    data_dir: Path,
    plan: Plan,
    *,
    now: datetime | None = None,
    steps: tuple[str, ...] = STEPS,
    say: Say | None = None,
) -> ComputeReport:
    """The compute on a data directory's DuckDB store (the server must be stopped)."""
    from kilde.identity.engine import IdentityEngine
    from kilde.insights.engine import InsightsEngine
    from kilde.pipeline import Pipeline
    from kilde.store import Store, Writer

    tell = say or (lambda _: None)
    now = now or datetime.now(UTC)
    started = time.perf_counter()
    report = ComputeReport(f"duckdb:{data_dir}", now)
    store = Store(data_dir)
    writer = Writer(store)
    try:
        pipeline = Pipeline(plan, writer)
        identity = IdentityEngine(store, writer, lambda: plan, data_dir)
        insights = InsightsEngine(store, writer, lambda: pipeline, data_dir)
        if "identity" in steps:
            tell("identity: stitching and building profiles")
            _timed(report, "identity", lambda: _plain(identity.rebuild().as_dict()))
        if "insights" in steps:
            tell("insights: RFM, lifetime value, churn, preferences")
            _timed(report, "insights", lambda: insights.refresh_profiles(now))
        if "segments" in steps:
            tell("segments: memberships")
            _timed(report, "segments", lambda: insights.refresh_segments(now=now))
        identity.stop()
    finally:
        writer.close()
        store.close()
    report.seconds = time.perf_counter() - started
    return report


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(value, default=str))  # type: ignore[no-any-return]


# -- Spark: the same functions over the lake ------------------------------------------------------

_COMBINED = pa.schema(
    [
        ("part", pa.string()),
        *RECORD_SCHEMA,
        *[f for f in OBSERVATION_SCHEMA if f.name not in RECORD_SCHEMA.names],
    ]
)


def _extract_partition(rules: dict[str, Any], batches: Iterator[pa.RecordBatch]) -> Iterator[Any]:
    """In a Spark Python worker: `extract_rich` on each batch, records and observations in one
    output (`part` says which)."""
    normaliser = Normaliser(IdentityRules.model_validate(rules))
    for batch in batches:
        records, observations = extract_rich(batch, normaliser).tables()
        n, m = records.num_rows, observations.num_rows
        out: dict[str, pa.Array] = {}
        for f in _COMBINED:
            if f.name == "part":
                out[f.name] = pa.array(["r"] * n + ["o"] * m, pa.string())
                continue
            left = records.column(f.name) if f.name in records.column_names else None
            right = observations.column(f.name) if f.name in observations.column_names else None
            parts = [
                (c.combine_chunks() if c is not None else pa.nulls(k, f.type)).cast(f.type)
                for c, k in ((left, n), (right, m))
            ]
            out[f.name] = pa.concat_arrays(parts)
        yield from pa.table(out, schema=_COMBINED).to_batches()


class LakeCompute:
    """The compute on Spark: lake events in, Parquet state tables in and out."""

    def __init__(
        self,
        spark: SparkSession,
        lake: Lake,
        plan: Plan,
        *,
        now: datetime | None = None,
        say: Say | None = None,
    ) -> None:
        self.spark = spark
        self.lake = lake.create()
        self.plan = plan
        self.now = now or datetime.now(UTC)
        self.say = say or (lambda _: None)
        self.state = StateTables(lake.state_dir)
        self.backend = spark_ibis(spark)
        self.run = SparkRunner(spark, self.backend)
        self._events: DataFrame | None = None
        self._pipeline: Pipeline | None = None
        self._local: Path | None = None
        for name in STATE_TABLES:
            self.state.ensure(name)

    # -- tables -------------------------------------------------------------------------------

    def _spark_schema(self, schema: pa.Schema) -> Any:
        from ibis.backends.pyspark.datatypes import PySparkSchema

        return PySparkSchema.from_ibis(ibis.Schema.from_pyarrow(schema))

    def register(self, *names: str) -> None:
        """(Re)name the state tables (all by default) and the lake's events as Spark views."""
        for name in names or STATE_TABLES:
            frame = self.spark.read.schema(self._spark_schema(table_schema(name))).parquet(
                str(self.state.path(name))
            )
            frame.createOrReplaceTempView(name)
        if not names or EVENTS in names:
            self._register_events()

    def _register_events(self) -> None:
        schema = self._spark_schema(EVENT_SCHEMA)
        if self.lake.files(EVENTS):
            raw = (
                self.spark.read.schema(schema)
                .option("basePath", str(self.lake.dataset(EVENTS)))
                .parquet(self.lake.glob(EVENTS))
            )
        else:
            raw = self.spark.createDataFrame([], schema)
        raw.createOrReplaceTempView("kilde_lake_events")
        # The same message from two collectors (a client retried): the first receipt counts.
        columns = ", ".join(f"`{name}`" for name in EVENT_SCHEMA.names)
        # write_seq numbers the store Writer's transactions; a lake has none (see migration 15)
        events = self.spark.sql(
            f"SELECT {columns}, CAST(NULL AS BIGINT) AS write_seq FROM (SELECT *, "
            "row_number() OVER (PARTITION BY source, "
            "message_id ORDER BY received_at, sent_at) AS kilde_rn FROM kilde_lake_events) "
            "WHERE kilde_rn = 1"
        )
        if self._events is not None:
            self._events.unpersist()
        self._events = events.persist()
        self._events.createOrReplaceTempView(EVENTS)

    def _state_value(self, key: str) -> str | None:
        table = self.state.read("identity_state")
        for row in table.to_pylist():
            if row["key"] == key:
                return str(row["value"])
        return None

    def _set_state(self, values: dict[str, str]) -> None:
        rows = {r["key"]: r["value"] for r in self.state.read("identity_state").to_pylist()}
        rows.update(values)
        self.state.write(
            "identity_state",
            pa.table({"key": list(rows), "value": list(rows.values())}),
        )

    def salt(self) -> str:
        salt = self._state_value("salt")
        if salt is None:
            salt = secrets.token_hex(16)
            self._set_state({"salt": salt})
        return salt

    def separations(self) -> list[Separation]:
        rows = self.state.read("identity_separations").to_pylist()
        rows.sort(key=lambda r: (r["created_at"], r["id"]))
        return [
            Separation(
                id=r["id"],
                keep=frozenset(Identifier(t, v) for t, v in orjson.loads(r["keep"])),
                split=frozenset(Identifier(t, v) for t, v in orjson.loads(r["split"])),
            )
            for r in rows
        ]

    # -- steps --------------------------------------------------------------------------------

    def compute(self, steps: tuple[str, ...] = STEPS) -> ComputeReport:
        started = time.perf_counter()
        report = ComputeReport(f"spark:{self.spark.sparkContext.master}", self.now)
        report.steps["statements"] = {"result": apply_statements(self.lake)}
        self.register()
        if "identity" in steps:
            self.say("identity: stitching and building profiles")
            _timed(report, "identity", self.identity)
        if "insights" in steps:
            self.say("insights: RFM, lifetime value, churn, preferences")
            _timed(report, "insights", self.insights)
        if "segments" in steps:
            self.say("segments: memberships")
            _timed(report, "segments", self.segments)
        report.seconds = time.perf_counter() - started
        return report

    def identity(self) -> dict[str, Any]:
        """Identifiers out of the events, then `stitch_outputs` (as the identity engine)."""
        run = self.run
        plan = self.plan
        normaliser = Normaliser(plan.identity)
        t0 = time.perf_counter()
        simple_records = run.make(
            "k_simple_records",
            "rebuild/records",
            lambda: extract.simple_records(
                extract.simple(run.source("events"), normaliser), normaliser
            ),
        )
        simple_observations = run.make(
            "k_simple_observations",
            "rebuild/observations",
            lambda: extract.simple_observations(extract.simple(run.source("events"), normaliser)),
        )
        rich = self.spark.sql(spark_sql(rich_records(run.source("events"))))
        combined = rich.mapInArrow(
            functools.partial(_extract_partition, plan.identity.model_dump(mode="json")),
            self._spark_schema(_COMBINED),
        ).localCheckpoint(eager=True)
        record_names = [f.name for f in RECORD_SCHEMA]
        observation_names = [f.name for f in OBSERVATION_SCHEMA]
        records = (
            self.spark.table("k_simple_records")
            .select(*record_names)
            .unionByName(combined.filter("part = 'r'").select(*record_names))
        )
        observations = (
            self.spark.table("k_simple_observations")
            .select(*observation_names)
            .unionByName(combined.filter("part = 'o'").select(*observation_names))
        )
        del simple_records, simple_observations
        self.state.write_frame("identity_records", records)
        self.state.write_frame("identity_observations", observations)
        self.register("identity_records", "identity_observations")
        extract_seconds = time.perf_counter() - t0
        scratch = Path(tempfile.mkdtemp(prefix="kilde-compute-"))
        try:
            result = stitch_outputs(
                run, plan, self.salt(), self.separations(), None, scratch, "rebuild"
            )
            self.state.write("identity_map", pq.read_table(scratch / "map.parquet"))
            self.state.write("profiles", pq.read_table(scratch / "profiles.parquet"))
            self.state.write("profile_traits", pq.read_table(scratch / "traits.parquet"))
            self.state.write("identity_conflicts", pq.read_table(scratch / "conflicts.parquet"))
            issued = pq.read_table(scratch / "ids.parquet")
            if issued.num_rows:
                known = self.state.read("profile_ids")
                self.state.write(
                    "profile_ids",
                    pa.concat_tables([known, conform(issued, known.schema)]),
                )
        finally:
            run.drop_temps()
            shutil.rmtree(scratch, ignore_errors=True)
        stats = self.spark.sql(
            "SELECT count(*) AS n, max(received_at) AS latest FROM identity_records"
        ).collect()[0]
        marks = {"rules": rules_hash(plan.identity)}
        if stats["latest"] is not None:
            marks["watermark"] = stats["latest"].replace(tzinfo=UTC).isoformat()
        self._set_state(marks)
        self.register(
            "identity_map", "profiles", "profile_traits", "identity_conflicts", "profile_ids"
        )
        out = result.as_dict()
        out["events_read"] = int(stats["n"])
        out["timings"]["extract"] = extract_seconds
        return _plain(out)

    def insights(self) -> dict[str, Any]:
        """`scores.compute` (RFM, CLV, churn, preferences) on Spark."""
        from kilde.insights.scores import compute

        scratch = Path(tempfile.mkdtemp(prefix="kilde-insights-"))
        try:
            out = scratch / "insights"
            info = compute(self.backend, self.now, out)
            self.state.write("profile_insights", pq.read_table(out))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows = [r for r in self.state.read("insight_state").to_pylist() if r["key"] != "models"]
        rows.append(
            {
                "key": "models",
                "value": orjson.dumps(info, default=str).decode(),
                "updated_at": self.now,
            }
        )
        self.state.write("insight_state", pa.Table.from_pylist(rows))
        self.register("profile_insights", "insight_state")
        return _plain(info)

    def definitions(self) -> list[Any]:
        """Every segment, the plan's first (as membership.definitions)."""
        from kilde.insights.segments.membership import SegmentDef

        found = {
            s.id: SegmentDef(s.id, s.name, s.description, dict(s.rule), "plan")
            for s in self.plan.segments.definitions
        }
        for row in sorted(
            self.state.read("segment_definitions").to_pylist(), key=lambda r: r["id"]
        ):
            if row["id"] not in found:
                found[row["id"]] = SegmentDef(
                    row["id"], row["name"], row["description"], orjson.loads(row["rule"]), "api"
                )
        return list(found.values())

    def segments(self) -> list[dict[str, Any]]:
        """Each segment's members by the segment compiler; who entered and left; their events."""
        from kilde.errors import KildeError
        from kilde.insights.segments.compiler import Context, check, members
        from kilde.insights.segments.membership import retired
        from kilde.insights.segments.rules import parse_rule

        now = self.now
        definitions = self.definitions()
        rules = {d.id: d.rule for d in definitions}
        memberships = self.state.read("segment_memberships")
        runs = self.state.read("segment_runs").to_pylist()
        results: list[dict[str, Any]] = []
        for segment in definitions:
            started = time.perf_counter()
            ctx = Context(self.backend, self.plan, now, rules)
            ctx._stack.append(segment.id)
            try:
                node = check(parse_rule(segment.rule, "rule"), ctx)
            except KildeError as exc:
                runs.append(_run_row(segment.id, now, 0, 0, 0, 0.0, exc.message))
                results.append({"segment_id": segment.id, "error": exc.message})
                continue
            found = self.backend.to_pyarrow(members(node, ctx).select("profile_id").distinct())
            new = set(found.column("profile_id").to_pylist())
            mine = pc.equal(memberships.column("segment_id"), segment.id)
            open_rows = pc.and_(mine, pc.is_null(memberships.column("exited_at")))
            current = set(memberships.filter(open_rows).column("profile_id").to_pylist())
            entered = sorted(new - current)
            exited = sorted(current - new)
            moved = {o: c for o, c in retired(self.backend, exited).items() if c in new}
            if moved:  # a merge retired their id: they stay, under the current one
                memberships = _moved_memberships(memberships, segment.id, moved, current, now)
                entered = [p for p in entered if p not in set(moved.values())]
                exited = [p for p in exited if p not in moved]
            if exited:
                leaving = pc.and_(
                    open_rows,
                    pc.is_in(memberships.column("profile_id"), pa.array(exited, pa.string())),
                )
                memberships = memberships.set_column(
                    memberships.schema.get_field_index("exited_at"),
                    "exited_at",
                    pc.if_else(
                        leaving,
                        pa.scalar(now, memberships.schema.field("exited_at").type),
                        memberships.column("exited_at"),
                    ),
                )
            if entered:
                fresh = pa.table(
                    {
                        "segment_id": [segment.id] * len(entered),
                        "profile_id": entered,
                        "entered_at": [now] * len(entered),
                        "exited_at": pa.nulls(
                            len(entered), memberships.schema.field("exited_at").type
                        ),
                    }
                )
                memberships = pa.concat_tables([memberships, conform(fresh, memberships.schema)])
            events, note = self._segment_events(segment, entered, exited)
            seconds = time.perf_counter() - started
            runs.append(
                _run_row(segment.id, now, len(new), len(entered), len(exited), seconds, note)
            )
            results.append(
                {
                    "segment_id": segment.id,
                    "members": len(new),
                    "entered": len(entered),
                    "exited": len(exited),
                    "events": events,
                    "seconds": round(seconds, 3),
                    "note": note,
                }
            )
        self.state.write("segment_memberships", memberships)
        self.state.write(
            "segment_runs", pa.Table.from_pylist(runs, schema=table_schema("segment_runs"))
        )
        self.register("segment_memberships", "segment_runs")
        return results

    def _segment_events(
        self, segment: Any, entered: list[str], exited: list[str]
    ) -> tuple[int, str | None]:
        """Segment Entered / Exited events, through the pipeline into the lake."""
        from kilde.insights.segments import membership
        from kilde.pipeline.normalize import Envelope

        plan = self.plan
        source = plan.source(plan.segments.events_source)
        if source is None:
            return 0, (
                f"no events emitted: the plan has no source {plan.segments.events_source!r} "
                "(segments.events_source)"
            )
        if not (entered or exited):
            return 0, None
        pipeline = self.pipeline()
        env = Envelope(received_at=self.now, channel=membership.CHANNEL)
        events = 0
        note = None
        for kind, ids in ((membership.ENTERED, entered), (membership.EXITED, exited)):
            if not ids:
                continue
            who = membership._who(
                self.backend, ibis.memtable(pa.table({"profile_id": pa.array(ids, pa.string())}))
            )
            rows = self.backend.to_pyarrow(who).to_pylist()
            for start in range(0, len(rows), membership.EVENT_CHUNK):
                chunk = rows[start : start + membership.EVENT_CHUNK]
                messages = list(membership._messages(chunk, segment, kind, self.now))
                result = pipeline.ingest_sync(messages, source, env)
                events += result.stored
                if result.dead_lettered and note is None:
                    note = (
                        f"{result.dead_lettered} segment events went to the dead letter: "
                        "declare Segment Entered and Segment Exited in the plan"
                    )
        return events, note

    def pipeline(self) -> Pipeline:
        """A pipeline whose writer appends to the lake (as a collector's does)."""
        if self._pipeline is None:
            from kilde.pipeline import Pipeline

            local = collector_store(self.lake)
            self._local = local.path.parent
            self._pipeline = Pipeline(self.plan, LakeWriter(self.lake, local))
        return self._pipeline

    def close(self) -> None:
        self.run.drop_temps()
        if self._events is not None:
            self._events.unpersist()
            self._events = None
        if self._pipeline is not None:
            writer = self._pipeline.writer
            writer.close()
            writer.store.close()
            self._pipeline = None
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


def _run_row(
    segment_id: str,
    now: datetime,
    members: int,
    entered: int,
    exited: int,
    seconds: float,
    error: str | None,
) -> dict[str, Any]:
    return {
        "segment_id": segment_id,
        "refreshed_at": now,
        "members": members,
        "entered": entered,
        "exited": exited,
        "seconds": seconds,
        "error": error,
    }


# -- what collectors could not write themselves ----------------------------------------------


def apply_statements(lake: Lake) -> int:
    """Bring the statements collectors kept (consent ledger rows) into the state tables.

    They run as they would have in the store, on a scratch store holding the state tables;
    the ledger's inserts are idempotent (INSERT OR IGNORE on the record's id), so every compute
    applies all of them again. Returns the number of statements run.
    """
    from kilde.store.compaction import scratch_store
    from kilde.store.lake import STATEMENTS, statement_params

    files = lake.files(STATEMENTS)
    if not files:
        return 0
    state = StateTables(lake.state_dir)
    ran = 0
    with scratch_store() as store:
        con = store.cursor()
        try:
            for path in files:
                for row in pq.read_table(path).to_pylist():
                    try:
                        con.execute(row["sql"], statement_params(row["params"]))
                        ran += 1
                    except Exception:  # a counter's statement the scratch store cannot run
                        continue
            fresh = con.sql("SELECT * FROM consent_ledger ORDER BY seq").to_arrow_table()
        finally:
            con.close()
    known = state.read("consent_ledger")
    seen = set(known.column("id").to_pylist())
    fresh = fresh.filter(pa.array([i not in seen for i in fresh.column("id").to_pylist()]))
    if fresh.num_rows:
        # Recorded after everything the state holds: numbered on from its last row.
        last = pc.max(known.column("seq")).as_py() or 0
        seq = pc.add(fresh.column("seq").cast(pa.int64()), last)
        fresh = fresh.set_column(fresh.schema.get_field_index("seq"), "seq", seq)
        state.write("consent_ledger", pa.concat_tables([known, conform(fresh, known.schema)]))
    return ran


# -- moving from DuckDB to the lake -----------------------------------------------------------


def export_store(data_dir: Path, lake: Lake, *, say: Say | None = None) -> dict[str, int]:
    """Copy a data directory's events into the lake and its kept state into the lake's state.

    The events become day partitions (by receipt day); identity_state (the profile id salt),
    unmerges, issued profile ids, segments saved through the API, memberships and the consent
    ledger become state tables. Everything else is recomputed by `kilde compute`.
    """
    import duckdb

    from kilde.store.ack_log import log_dir
    from kilde.store.database import DB_FILE, Store
    from kilde.store.lake import append

    tell = say or (lambda _: None)
    lake.create()
    state = StateTables(lake.state_dir)
    counts: dict[str, int] = {}
    if any(log_dir(data_dir).glob("*")):
        Store(data_dir).close()  # a crash left answered events in the log: insert them first
    con = duckdb.connect(str(data_dir / DB_FILE), read_only=True)
    try:
        tell("events")
        columns = ", ".join(f'"{n}"' for n in EVENT_SCHEMA.names)
        reader = con.sql(f"SELECT {columns} FROM events ORDER BY received_at").to_arrow_reader(
            500_000
        )
        total = 0
        for batch in reader:
            table = pa.Table.from_batches([batch])
            append(lake, EVENTS, table, durable=False)
            total += table.num_rows
        counts[EVENTS] = total
        for name in KEPT_STATE:
            tell(name)
            table = con.sql(f'SELECT * FROM "{name}"').to_arrow_table()
            state.write(name, table)
            counts[name] = table.num_rows
    finally:
        con.close()
    return counts


def new_run_id() -> str:
    return "cmp_" + uuid.uuid4().hex[:12]


def _moved_memberships(
    memberships: pa.Table,
    segment_id: str,
    moved: dict[str, str],
    current: set[str],
    now: datetime,
) -> pa.Table:
    """As membership's move statements: retired ids' open rows closed, the current id given one
    open row with the earliest entered time unless it has one already."""
    rows = memberships.to_pylist()
    earliest: dict[str, Any] = {}
    for row in rows:
        if row["segment_id"] == segment_id and row["exited_at"] is None:
            target = moved.get(row["profile_id"])
            if target is not None:
                row["exited_at"] = now
                if target not in current:
                    known = earliest.get(target)
                    earliest[target] = min(known, row["entered_at"]) if known else row["entered_at"]
    rows += [
        {"segment_id": segment_id, "profile_id": p, "entered_at": at, "exited_at": None}
        for p, at in sorted(earliest.items())
    ]
    return pa.Table.from_pylist(rows, schema=memberships.schema)
