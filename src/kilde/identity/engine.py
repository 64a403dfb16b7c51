"""The identity engine: reads new events, stitches the closures they touch, keeps profiles fresh.

Runs in a background thread of the server. Every tick it reads the events stored since its
watermark, extracts their identifiers, recomputes the closures they touch with the same function
a full rebuild uses, and writes the result through the Writer (the store's only writer) as one
transaction. A full rebuild recomputes everything from the events.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ibis.expr.types as ir
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from kilde.errors import KildeError
from kilde.identity.conflicts import CONFLICT_COLUMNS
from kilde.identity.identifiers import Identifier, Normaliser
from kilde.identity.runner import Runner
from kilde.identity.stitching import SCOPE_SCHEMA, Separation, StitchResult, stitch
from kilde.plan.models import Plan
from kilde.profiles.build import computed_traits, trait_rows
from kilde.store.database import Store
from kilde.store.writer import WriteBatch, Writer

log = logging.getLogger("kilde.identity")

UTC_US = pa.timestamp("us", tz="UTC")
RECORD_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("message_id", pa.string()),
        ("ts", UTC_US),
        ("received_at", UTC_US),
        ("kind", pa.string()),
        ("primary_type", pa.string()),
        ("primary_value", pa.string()),
        ("dropped", pa.string()),
    ]
)
OBSERVATION_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("message_id", pa.string()),
        ("ts", UTC_US),
        ("id_type", pa.string()),
        ("id_value", pa.string()),
        ("role", pa.string()),
    ]
)
# Events that arrive later than this after their receipt time was stamped are still found.
WATERMARK_SLACK = timedelta(seconds=60)
TICK_BATCH = 20_000
REBUILD_BACKLOG = 200_000  # more unread events than this: rebuild instead of increments
_EXTRACT_COLUMNS = (
    "source, message_id, type, user_id, anonymous_id, previous_id, timestamp, received_at, "
    "CASE WHEN type = 'identify' THEN traits END AS traits, "
    "CASE WHEN contains(context, '\"traits\"') OR contains(context, '\"externalIds\"') "
    "OR contains(context, '\"advertisingId\"') THEN context END AS context"
)


class UnmergeError(KildeError):
    """An unmerge that cannot be done as asked."""


@dataclass
class Extracted:
    records: dict[str, list[Any]] = field(
        default_factory=lambda: {f.name: [] for f in RECORD_SCHEMA}
    )
    observations: dict[str, list[Any]] = field(
        default_factory=lambda: {f.name: [] for f in OBSERVATION_SCHEMA}
    )
    touched: set[Identifier] = field(default_factory=set)
    new_values: set[str] = field(default_factory=set)  # user/anonymous id values seen
    max_received: datetime | None = None
    count: int = 0

    def add(self, row: dict[str, Any], normaliser: Normaliser) -> None:
        if row["traits"] is None and row["context"] is None and row["type"] != "alias":
            # The common case (page views, tracks): only the user and anonymous ids.
            found = []
            dropped: list[tuple[str, str]] = []
            for id_type, field_name, column in (
                ("user_id", "userId", "user_id"),
                ("anonymous_id", "anonymousId", "anonymous_id"),
            ):
                raw = row[column]
                if raw is None:
                    continue
                value = normaliser.normalise(id_type, raw)
                if value is None:
                    dropped.append((field_name, "junk"))
                else:
                    found.append(Identifier(id_type, value))
            if len(found) == 2 and normaliser.rank["anonymous_id"] < normaliser.rank["user_id"]:
                found.reverse()
            self._append(row, found, None, dropped)
            return
        ids = normaliser.of_record(row)
        self._append(row, ids.own, ids.previous, ids.dropped)

    def _append(
        self,
        row: dict[str, Any],
        own: list[Identifier],
        previous: str | None,
        dropped: list[tuple[str, str]],
    ) -> None:
        primary = own[0] if own else None
        self.count += 1
        rec = self.records
        rec["source"].append(row["source"])
        rec["message_id"].append(row["message_id"])
        rec["ts"].append(row["timestamp"])
        rec["received_at"].append(row["received_at"])
        rec["kind"].append(row["type"])
        rec["primary_type"].append(primary.type if primary else None)
        rec["primary_value"].append(primary.value if primary else None)
        rec["dropped"].append(orjson.dumps(dropped).decode() if dropped else None)
        obs = self.observations
        found = [(i.type, i.value, "self") for i in own]
        if previous is not None:
            found += [
                ("user_id", previous, "previous"),
                ("anonymous_id", previous, "previous"),
            ]
        for id_type, value, role in found:
            obs["source"].append(row["source"])
            obs["message_id"].append(row["message_id"])
            obs["ts"].append(row["timestamp"])
            obs["id_type"].append(id_type)
            obs["id_value"].append(value)
            obs["role"].append(role)
            self.touched.add(Identifier(id_type, value))
            if id_type in ("user_id", "anonymous_id"):
                self.new_values.add(value)
        received = row["received_at"]
        if self.max_received is None or received > self.max_received:
            self.max_received = received

    def tables(self) -> tuple[pa.Table, pa.Table]:
        return (
            pa.table(self.records, schema=RECORD_SCHEMA),
            pa.table(self.observations, schema=OBSERVATION_SCHEMA),
        )


@dataclass
class RunReport:
    mode: str
    events_read: int = 0
    identifiers: int = 0
    profiles: int = 0
    conflicts: int = 0
    dirty_closures: int = 0
    rounds: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class IdentityEngine:
    """Owns identity and profile computation for one store; thread-safe."""

    def __init__(
        self, store: Store, writer: Writer, plan: Callable[[], Plan], work_dir: Path
    ) -> None:
        self.store = store
        self.writer = writer
        self.plan = plan
        self.work_dir = work_dir
        self.lock = threading.RLock()
        self._runner: Runner | None = None
        self._runner_key = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.last_tick: datetime | None = None
        self.interval = 0.05

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        """The compute runner; compiled stages depend on the rules and salt, so a change of
        either starts a fresh one."""
        key = f"{self.rules_hash()}/{self.salt()}"
        if self._runner is None or self._runner_key != key:
            if self._runner is not None:
                self._runner.close()
            self._runner = Runner(self.store.cursor())
            self._runner_key = key
        return self._runner

    def _state(self, key: str) -> str | None:
        value = self.store.scalar("SELECT value FROM identity_state WHERE key = ?", [key])
        return None if value is None else str(value)

    def _set_state(self, key: str, value: str) -> tuple[str, list[Any]]:
        return ("INSERT OR REPLACE INTO identity_state VALUES (?, ?)", [key, value])

    def salt(self) -> str:
        salt = self._state("salt")
        if salt is None:
            salt = secrets.token_hex(16)
            self.writer.write_sync(WriteBatch(statements=[self._set_state("salt", salt)]))
            salt = self._state("salt") or salt
        return salt

    def rules_hash(self) -> str:
        raw = self.plan().identity.model_dump_json()
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def separations(self) -> list[Separation]:
        rows = self.store.query(
            "SELECT id, keep, split FROM identity_separations ORDER BY created_at, id"
        )
        return [
            Separation(
                id=r["id"],
                keep=frozenset(Identifier(t, v) for t, v in orjson.loads(r["keep"])),
                split=frozenset(Identifier(t, v) for t, v in orjson.loads(r["split"])),
            )
            for r in rows
        ]

    def _scratch(self) -> Path:
        path = self.work_dir / "identity-work" / uuid.uuid4().hex
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- reading new events ---------------------------------------------------------------------

    def _unread(self, limit: int) -> list[dict[str, Any]]:
        mark = self._state("watermark")
        since = (
            datetime.fromisoformat(mark) - WATERMARK_SLACK
            if mark
            else datetime(1970, 1, 1, tzinfo=UTC)
        )
        return self.store.query(
            f"SELECT {_EXTRACT_COLUMNS} FROM events e WHERE e.received_at >= ? AND NOT EXISTS ("
            "SELECT 1 FROM identity_records r WHERE r.received_at >= ? "
            "AND r.source = e.source AND r.message_id = e.message_id) "
            "ORDER BY e.received_at LIMIT ?",
            [since, since, limit],
        )

    def backlog(self) -> int:
        mark = self._state("watermark")
        if mark is None:
            return int(self.store.scalar("SELECT count(*) FROM events") or 0)
        since = datetime.fromisoformat(mark) - WATERMARK_SLACK
        return int(
            self.store.scalar("SELECT count(*) FROM events WHERE received_at >= ?", [since]) or 0
        )

    # -- one incremental step -----------------------------------------------------------------

    def step(self) -> RunReport | None:
        """Process what arrived since the last step; None if nothing did."""
        with self.lock:
            if self._state("rules") != self.rules_hash():
                return self.rebuild()
            if self.backlog() > REBUILD_BACKLOG:
                return self.rebuild()
            rows = self._unread(TICK_BATCH)
            if not rows:
                return None
            started = time.perf_counter()
            normaliser = Normaliser(self.plan().identity)
            found = Extracted()
            for row in rows:
                found.add(row, normaliser)
            return self._apply(found, started)

    def _apply(self, found: Extracted, started: float) -> RunReport:
        scratch = self._scratch()
        try:
            records, observations = found.tables()
            pq.write_table(records, scratch / "records.parquet")
            pq.write_table(observations, scratch / "observations.parquet")
            # 1. the records themselves (so the stitching below reads them)
            self.writer.write_sync(
                WriteBatch(
                    statements=[
                        (
                            "INSERT INTO identity_records BY NAME SELECT * FROM read_parquet(?)",
                            [str(scratch / "records.parquet")],
                        ),
                        (
                            "INSERT INTO identity_observations BY NAME "
                            "SELECT * FROM read_parquet(?)",
                            [str(scratch / "observations.parquet")],
                        ),
                    ]
                )
            )
            # 2. the scope: the closures touched, whole
            scope = self._scope(found.touched, found.new_values)
            report = self._stitch_and_write(scope, scratch, "incremental", found.max_received)
            report.events_read = found.count
            report.seconds = time.perf_counter() - started
            return report
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _scope(self, seeds_in: set[Identifier], values: set[str]) -> pa.Table:
        run = self.runner
        touched = sorted(seeds_in)
        for value in sorted(values):  # the other reading of an alias's previousId
            touched.append(Identifier("user_id", value))
            touched.append(Identifier("anonymous_id", value))
        run.put(
            "k_seeds",
            pa.table(
                {"id_type": [i.type for i in touched], "id_value": [i.value for i in touched]},
                schema=SCOPE_SCHEMA,
            ),
        )

        def scope_expr() -> ir.Table:
            t = run.temp("k_seeds")
            obs = run.source("identity_observations")
            # aliases whose previousId is one of the new ids: their records join the scope
            prev = obs.filter(obs.role == "previous").semi_join(t, ["id_type", "id_value"])
            records = prev.select("source", "message_id").distinct()
            alias_ids = obs.semi_join(records, ["source", "message_id"])
            seeds = t.union(alias_ids.select("id_type", "id_value"))
            idmap = run.source("identity_map")
            closures = idmap.semi_join(seeds, ["id_type", "id_value"]).select("closure_id")
            members = idmap.semi_join(closures, "closure_id").select("id_type", "id_value")
            return seeds.union(members).distinct()

        return run.arrow("scope", scope_expr)

    # -- the shared core of increments and rebuilds -------------------------------------------

    def _stitch_and_write(
        self, scope: pa.Table | None, scratch: Path, mode: str, max_received: datetime | None
    ) -> RunReport:
        plan = self.plan()
        run = self.runner
        now = datetime.now(UTC)
        try:
            result: StitchResult = stitch(
                run, plan.identity, self.salt(), scope, self.separations()
            )
            t0 = time.perf_counter()
            identities = result.identities
            pq.write_table(
                run.arrow(
                    "out/map",
                    lambda: identities.select(
                        "id_type",
                        "id_value",
                        "profile_id",
                        "closure_id",
                        "first_seen",
                        "last_seen",
                        "shared",
                    ),
                ),
                scratch / "map.parquet",
            )
            pq.write_table(computed_traits(run, identities, now), scratch / "profiles.parquet")
            pq.write_table(trait_rows(run, plan, identities), scratch / "traits.parquet")
            conflict_rows = [c.row() for c in result.conflicts]
            pq.write_table(
                pa.Table.from_pylist(conflict_rows, schema=_CONFLICT_SCHEMA)
                if conflict_rows
                else _CONFLICT_SCHEMA.empty_table(),
                scratch / "conflicts.parquet",
            )

            def issued() -> ir.Table:
                fresh = identities.select("profile_id", "anchor_type", "anchor_value").distinct()
                return fresh.anti_join(run.source("profile_ids"), "profile_id")

            pq.write_table(run.arrow("out/issued", issued), scratch / "ids.parquet")

            def closures_expr() -> ir.Table:
                mine = identities.select("closure_id")
                if scope is None:
                    return mine.distinct()
                idm = run.source("identity_map")
                old = idm.semi_join(run.temp("k_scope"), ["id_type", "id_value"])
                return mine.union(old.select("closure_id")).distinct()

            pq.write_table(
                run.arrow(f"out/closures/{scope is None}", closures_expr),
                scratch / "closures.parquet",
            )
            timings = dict(result.timings)
            timings["profiles"] = time.perf_counter() - t0
        finally:
            run.drop_temps()
        statements = self._replace_statements(scratch, full=scope is None)
        if max_received is not None:
            mark = max_received.isoformat()
            previous = self._state("watermark")
            if previous is None or previous < mark:
                statements.append(self._set_state("watermark", mark))
        statements.append(self._set_state("rules", self.rules_hash()))
        t0 = time.perf_counter()
        self.writer.write_sync(WriteBatch(statements=statements))
        timings["write"] = time.perf_counter() - t0
        counts = pq.read_metadata(scratch / "map.parquet").num_rows
        return RunReport(
            mode=mode,
            identifiers=counts,
            profiles=pq.read_metadata(scratch / "profiles.parquet").num_rows,
            conflicts=len(result.conflicts),
            dirty_closures=result.dirty_closures,
            rounds=result.rounds,
            timings=timings,
        )

    def _replace_statements(self, scratch: Path, *, full: bool) -> list[tuple[str, list[Any]]]:
        def p(name: str) -> list[Any]:
            return [str(scratch / name)]

        closures = "SELECT closure_id FROM read_parquet(?)"
        deletes: list[tuple[str, list[Any]]]
        if full:
            deletes = [
                ("DELETE FROM identity_map", []),
                ("DELETE FROM identity_conflicts", []),
                ("DELETE FROM profiles", []),
                ("DELETE FROM profile_traits", []),
            ]
        else:
            deletes = [
                (
                    f"DELETE FROM identity_map WHERE closure_id IN ({closures})",
                    p("closures.parquet"),
                ),
                (
                    f"DELETE FROM identity_conflicts WHERE closure_id IN ({closures})",
                    p("closures.parquet"),
                ),
                (f"DELETE FROM profiles WHERE closure_id IN ({closures})", p("closures.parquet")),
                (
                    f"DELETE FROM profile_traits WHERE closure_id IN ({closures})",
                    p("closures.parquet"),
                ),
            ]
        return [
            *deletes,
            (
                "INSERT INTO identity_map BY NAME SELECT * FROM read_parquet(?)",
                p("map.parquet"),
            ),
            (
                "INSERT INTO identity_conflicts BY NAME SELECT * FROM read_parquet(?)",
                p("conflicts.parquet"),
            ),
            ("INSERT INTO profiles BY NAME SELECT * FROM read_parquet(?)", p("profiles.parquet")),
            (
                "INSERT INTO profile_traits BY NAME SELECT * FROM read_parquet(?)",
                p("traits.parquet"),
            ),
            ("INSERT INTO profile_ids BY NAME SELECT * FROM read_parquet(?)", p("ids.parquet")),
        ]

    # -- unmerge --------------------------------------------------------------------------------

    def unmerge(self, profile_id: str, split: list[Identifier], reason: str | None) -> RunReport:
        """Split identifiers off a profile for good: rebuilds and increments respect it."""
        with self.lock:
            started = time.perf_counter()
            members = {
                Identifier(r["id_type"], r["id_value"])
                for r in self.store.query(
                    "SELECT id_type, id_value FROM identity_map WHERE profile_id = ?", [profile_id]
                )
            }
            wanted = {i for i in split if i in members}
            if not wanted:
                raise UnmergeError(
                    "none of the given identifiers belongs to this profile",
                    fix="list the profile's identities with `kilde profile show ID` and pass "
                    "some of them as TYPE:VALUE",
                )
            if wanted == members:
                raise UnmergeError(
                    "splitting every identifier off leaves nothing to split from",
                    fix="name only the identifiers that belong to the other person",
                )
            keep = sorted(members - wanted)
            record = (
                "INSERT INTO identity_separations VALUES (?, ?, ?, ?, ?, ?)",
                [
                    "unm_" + uuid.uuid4().hex[:16],
                    datetime.now(UTC),
                    profile_id,
                    orjson.dumps([[i.type, i.value] for i in keep]).decode(),
                    orjson.dumps([[i.type, i.value] for i in sorted(wanted)]).decode(),
                    reason,
                ],
            )
            self.writer.write_sync(WriteBatch(statements=[record]))
            scratch = self._scratch()
            try:
                scope = self._scope(members, set())
                report = self._stitch_and_write(scope, scratch, "unmerge", None)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            report.seconds = time.perf_counter() - started
            return report

    # -- full rebuild ---------------------------------------------------------------------------

    def rebuild(self, progress: Callable[[str], None] | None = None) -> RunReport:
        """Recompute identities and profiles from every stored event."""
        with self.lock:
            started = time.perf_counter()
            say = progress or (lambda _: None)
            scratch = self._scratch()
            try:
                say("reading identifiers from the events")
                normaliser = Normaliser(self.plan().identity)
                t0 = time.perf_counter()
                count, max_received = self._extract_all(normaliser, scratch)
                extract_seconds = time.perf_counter() - t0
                self.writer.write_sync(
                    WriteBatch(
                        statements=[
                            ("DELETE FROM identity_records", []),
                            ("DELETE FROM identity_observations", []),
                            (
                                "INSERT INTO identity_records BY NAME "
                                "SELECT * FROM read_parquet(?)",
                                [str(scratch / "records-*.parquet")],
                            ),
                            (
                                "INSERT INTO identity_observations BY NAME "
                                "SELECT * FROM read_parquet(?)",
                                [str(scratch / "observations-*.parquet")],
                            ),
                        ]
                    )
                )
                say("stitching identities and building profiles")
                report = self._stitch_and_write(None, scratch, "rebuild", max_received)
                report.events_read = count
                report.timings["extract"] = extract_seconds
                report.seconds = time.perf_counter() - started
                return report
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def _extract_all(self, normaliser: Normaliser, scratch: Path) -> tuple[int, datetime | None]:
        cur = self.store.cursor()
        count = 0
        max_received: datetime | None = None
        part = 0
        try:
            reader = cur.sql(f"SELECT {_EXTRACT_COLUMNS} FROM events").to_arrow_reader(100_000)
            for batch in reader:
                found = Extracted()
                columns = batch.to_pydict()
                names = list(columns)
                for values in zip(*columns.values(), strict=True):
                    found.add(dict(zip(names, values, strict=True)), normaliser)
                self._write_part(found, scratch, part)
                part += 1
                count += found.count
                if found.max_received and (
                    max_received is None or found.max_received > max_received
                ):
                    max_received = found.max_received
            if part == 0:
                self._write_part(Extracted(), scratch, part)
        finally:
            cur.close()
        return count, max_received

    @staticmethod
    def _write_part(found: Extracted, scratch: Path, part: int) -> None:
        records, observations = found.tables()
        pq.write_table(records, scratch / f"records-{part:05d}.parquet")
        pq.write_table(observations, scratch / f"observations-{part:05d}.parquet")

    # -- background thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kilde-identity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self._runner.close()
            self._runner = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.step()
                self.last_error = None
                self.last_tick = datetime.now(UTC)
            except Exception as exc:  # keep running; the error is visible in the status
                log.error("identity update failed: %s", type(exc).__name__)
                log.debug("identity update failed", exc_info=True)
                self.last_error = type(exc).__name__
                report = None
                self._stop.wait(1.0)
            if report is None:
                self._stop.wait(self.interval)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Process everything stored so far (for commands that want fresh profiles)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.step() is None:
                return True
        return False


_CONFLICT_SCHEMA = pa.schema(
    [
        ("closure_id", pa.string()),
        ("reason", pa.string()),
        ("id_type", pa.string()),
        ("id_value", pa.string()),
        ("kept_profile", pa.string()),
        ("refused_profile", pa.string()),
        ("source", pa.string()),
        ("message_id", pa.string()),
        ("first_at", UTC_US),
        ("occurrences", pa.int32()),
        ("detail", pa.string()),
    ]
)
assert tuple(f.name for f in _CONFLICT_SCHEMA) == CONFLICT_COLUMNS
_IDS_SCHEMA = pa.schema(
    [("profile_id", pa.string()), ("anchor_type", pa.string()), ("anchor_value", pa.string())]
)
