"""The identity engine: reads new events, stitches the closures they touch, keeps profiles fresh.

Runs in a background thread of the server. Every tick it reads the events written since the
last Writer transaction it read (events.write_seq), extracts their identifiers, recomputes the
closures they touch with the same function a full rebuild uses, and writes the result through
the Writer (the store's only writer). A full rebuild recomputes everything from the events.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ibis
import ibis.expr.types as ir
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kilde.errors import KildeError
from kilde.identity import extract, keyed
from kilde.identity.conflicts import CONFLICT_COLUMNS
from kilde.identity.identifiers import Identifier, Normaliser
from kilde.identity.known import Attach, Key, KnownIdentities, Pair
from kilde.identity.runner import Runner
from kilde.identity.stitching import (
    SCOPE_SCHEMA,
    Separation,
    StitchResult,
    profile_id_expr,
    stitch,
)
from kilde.plan.models import IDENTIFIER_TYPES, IdentityRules, Plan
from kilde.profiles.build import computed_traits, keyed_profile_events, trait_rows
from kilde.store.database import Store
from kilde.store.writer import WriteBatch, Writer
from kilde.thread_names import NamedThread

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
        ("write_seq", pa.int64()),
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
# identity_map's indexes (migration 16): a full rebuild drops them and makes them again after
# rewriting the map, which is much quicker than keeping them up to date row by row.
MAP_INDEXES = {"identity_map_value": "id_value", "identity_map_closure": "closure_id"}
TICK_BATCH = 20_000
# More unread events than both of these: rebuild instead of increments. Catching up in
# increments costs per unread event, a rebuild per stored event, about eight times less:
# after 20 s of bench/ingest.py on 32 connections, increments read 198,600 events in 13.1 s
# (66 us each), where in another such run a rebuild of all 380,000 took 3.0 s (8 us each).
# So a rebuild pays once the unread events are over about a tenth of the store: a small
# store rebuilds soon, and a large one is not rebuilt for a burst.
REBUILD_BACKLOG = 50_000
REBUILD_SHARE = 0.1  # of the events stored
# seconds: quiet profiles are refreshed together at most this far apart (a second made a page
# view reach its profile's counts after 0.8 s, median, under a light load; this, after 0.55 s)
REFRESH_EVERY = 0.25
# ... unless refreshing takes long (it reads every event of the profiles): then the background
# thread waits this many times the last refresh's duration, so refreshes use at most a fifth
# of the time and the machine's cores stay with ingestion and new links.
REFRESH_SHARE = 4.0
# When building the profiles of stitched closures took longer than this (they read every event
# of the closures), the background thread writes new links first and leaves those profiles to
# the refresh thread, right after; below it, links and profiles are written together.
DEFER_PROFILES_AFTER = 0.3  # seconds
SLOW_TICK = 1.0  # seconds: ticks slower than this are logged with their stages
# After a tick that read events, the background thread waits as long as the tick took (at most
# TICK_PAUSE_MAX): under load, ticks then take at most about half of the time and each reads
# more events, so a tick's fixed costs (planning its queries, its temporary tables, its
# transactions) are shared by more of them. The price is lag at peak load: bench/ingest.py
# collected about a sixth more events/s with identity up to 2.5 s behind, where it was 0.2 s
# behind without the pause; at 5,000 events/s links still showed after about 0.27 s (median).
# A rebuild to catch up (see REBUILD_SHARE) is paused after for as long as it took, without
# the cap: it means identity is far behind already, and it took 3 to 4 s at a time during
# bench/ingest.py, so with the cap identity's DuckDB work held a core nearly all the time
# during a burst (with it: 20,481 to 21,536 events/s, identity up to about 150,000 events
# behind; without it: 21,489 to 24,353, up to about 280,000 behind, caught up as soon after).
TICK_PAUSE_SHARE = 1.0
TICK_PAUSE_MAX = 0.5  # seconds
# identity_map rows of identifiers added without a stitch (see KnownIdentities.classify)
ATTACHED_SCHEMA = pa.schema(
    [
        ("id_type", pa.string()),
        ("id_value", pa.string()),
        ("profile_id", pa.string()),
        ("closure_id", pa.string()),
        ("first_seen", UTC_US),
        ("last_seen", UTC_US),
        ("shared", pa.bool_()),
    ]
)
# An identity_map row as the engine writes it.
MAP_COLUMNS = (
    "id_type",
    "id_value",
    "profile_id",
    "closure_id",
    "first_seen",
    "last_seen",
    "shared",
)
RICH_COLUMNS = (
    "source",
    "message_id",
    "type",
    "user_id",
    "anonymous_id",
    "previous_id",
    "timestamp",
    "received_at",
    "traits",
    "context",
    "write_seq",
)


class UnmergeError(KildeError):
    """An unmerge that cannot be done as asked."""


@dataclass
class Extracted:
    """Records and observations read from events, and what they touch."""

    records: dict[str, list[Any]] = field(
        default_factory=lambda: {f.name: [] for f in RECORD_SCHEMA}
    )
    observations: dict[str, list[Any]] = field(
        default_factory=lambda: {f.name: [] for f in OBSERVATION_SCHEMA}
    )
    arrow: list[tuple[pa.Table, pa.Table]] = field(default_factory=list)
    touched: set[Identifier] = field(default_factory=set)
    new_values: set[str] = field(default_factory=set)  # user/anonymous id values seen
    max_seq: int | None = None  # the largest write_seq read
    upto: int | None = None  # every event up to this write_seq is read (see _read_new)
    count: int = 0
    read_seconds: float = 0.0

    def add_tables(self, records: pa.Table, observations: pa.Table) -> None:
        """Records read set-based (see extract.py)."""
        if not records.num_rows:
            return
        records = records.cast(RECORD_SCHEMA)
        observations = observations.cast(OBSERVATION_SCHEMA)
        self.arrow.append((records, observations))
        self.count += records.num_rows
        pairs = observations.group_by(["id_type", "id_value"]).aggregate([])
        for id_type, value in zip(
            pairs.column("id_type").to_pylist(), pairs.column("id_value").to_pylist(), strict=True
        ):
            self.touched.add(Identifier(id_type, value))
            self.new_values.add(value)
        self._saw(pc.max(records.column("write_seq")).as_py())

    def _saw(self, seq: int | None) -> None:
        if seq is not None and (self.max_seq is None or seq > self.max_seq):
            self.max_seq = seq

    def add(self, row: dict[str, Any], normaliser: Normaliser) -> None:
        """A record read in Python (identify, alias, rich context)."""
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
        rec["write_seq"].append(row.get("write_seq"))
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
        self._saw(row.get("write_seq"))

    def tables(self) -> tuple[pa.Table, pa.Table]:
        records = [pa.table(self.records, schema=RECORD_SCHEMA)]
        observations = [pa.table(self.observations, schema=OBSERVATION_SCHEMA)]
        for rec, obs in self.arrow:
            records.append(rec)
            observations.append(obs)
        return pa.concat_tables(records), pa.concat_tables(observations)


@dataclass
class RunReport:
    mode: str
    events_read: int = 0
    identifiers: int = 0
    profiles: int = 0
    conflicts: int = 0
    dirty_closures: int = 0
    rounds: int = 0
    attached: int = 0  # new identifiers added to known profiles without a stitch
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
        self._guard = threading.Lock()
        self._runner: Runner | None = None
        self._rules_for: Plan | None = None
        self._rules_hash = ""
        self._news_cursor: Any = None
        self._runner_key = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.last_tick: datetime | None = None
        self.interval = 0.1
        self._rebuild: concurrent.futures.Future[RunReport] | None = None
        self.progress = ""
        self.last_rebuild: RunReport | None = None
        # quiet identifiers whose profiles wait for their refresh (see _hold_quiet)
        self._quiet: dict[tuple[str, str], dict[str, Any]] = {}
        self._quiet_since: float | None = None
        # the background thread's refresh of quiet profiles runs beside the ticks (see
        # _start_refresh); closures stitched meanwhile are kept out of its result
        self._refreshing: threading.Thread | None = None
        self._finishers = 0  # steps waiting to finish everything (see _lock_with_no_refresh)
        self._refresh_runner: Runner | None = None
        self._refresh_runner_key = ""
        self._stitch_seq = 0
        self._stitched_at: dict[str, int] = {}
        self._epoch = 0  # a rebuild makes any refresh in flight pointless
        self._refresh_seconds = 0.0  # how long the last one took
        # closures the background thread stitched whose profiles wait for the refresh thread
        self._pending: set[str] = set()
        self._profiles_seconds = 0.0  # how long the stitched profiles took, last time
        self.known = KnownIdentities()
        self._salt: str | None = None  # see salt()

    # -- plumbing -----------------------------------------------------------------------------

    def _compile_key(self) -> str:
        kinds = ",".join(f"{s.name}={s.kind}" for s in self.plan().sources)
        return f"{self.rules_hash()}/{self.salt()}/{kinds}"

    @property
    def runner(self) -> Runner:
        """The compute runner; compiled stages depend on the rules and salt, so a change of
        either starts a fresh one."""
        key = self._compile_key()
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
        """The salt of profile and closure ids: made once per store, then never changed (kept
        in memory while the engine runs: `runner` asks for it many times a tick)."""
        if self._salt is None:
            salt = self._state("salt")
            if salt is None:
                salt = secrets.token_hex(16)
                self.writer.write_sync(WriteBatch(statements=[self._set_state("salt", salt)]))
                salt = self._state("salt") or salt
            self._salt = salt
        return self._salt

    def rules_hash(self) -> str:
        plan = self.plan()
        if self._rules_for is not plan:  # plans are immutable: hash each one once
            raw = plan.identity.model_dump_json()
            self._rules_hash = hashlib.sha256(raw.encode()).hexdigest()[:16]
            self._rules_for = plan
        return self._rules_hash

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

    def _states(self) -> dict[str, str]:
        """All of identity_state, in one read (a tick's first step)."""
        rows = self.store.query("SELECT key, value FROM identity_state")
        return {str(r["key"]): str(r["value"]) for r in rows if r["value"] is not None}

    def _read_new(self, normaliser: Normaliser, mark: int) -> Extracted:
        """Identifiers of up to TICK_BATCH events not read yet (set-based where simple); every
        event up to write_seq `mark` has been read."""
        run = self.runner
        # Write_seqs become visible in order (the writer's applier inserts logged groups in
        # order, and every other commit waits for it), so a read that starts after this and
        # is not cut short by TICK_BATCH has read every event up to `visible`, including
        # events that carry no identifier and the rest of a transaction read in part before.
        visible = self.store.scalar("SELECT max(write_seq) FROM events WHERE write_seq > ?", [mark])
        run.put("k_since", pa.table({"since": pa.array([mark], pa.int64())}))

        def unread_expr() -> ir.Table:
            ev = run.source("events")
            rec = run.source("identity_records")
            since = run.temp("k_since")
            recent = ev.cross_join(since)
            recent = recent.filter(recent.write_seq > recent.since).select(*RICH_COLUMNS)
            # the rows of a transaction a limited tick read in part
            done = rec.cross_join(since)
            done = done.filter(done.write_seq > done.since).select("source", "message_id")
            return recent.anti_join(done, ["source", "message_id"])

        # read once; the simple and the rich records are taken from it
        unread = run.make("k_unread", "read/unread", unread_expr)

        def simple_new() -> ir.Table:
            ids = extract.simple(unread, normaliser)
            return ids.order_by("write_seq", "source", "message_id").limit(TICK_BATCH)

        ids = run.make("k_new_simple", "read/simple", simple_new)
        found = Extracted()
        simple_records = run.arrow(
            "read/simple/records", lambda: extract.simple_records(ids, normaliser)
        )
        found.add_tables(
            simple_records,
            run.arrow("read/simple/observations", lambda: extract.simple_observations(ids)),
        )

        def rich_new() -> ir.Table:
            ev = unread
            return (
                ev.filter(extract.is_rich(ev))
                .select(*RICH_COLUMNS)
                .order_by("write_seq", "source", "message_id")
                .limit(TICK_BATCH)
            )

        rich = run.arrow("read/rich", rich_new)
        for row in rich.to_pylist():
            found.add(row, normaliser)
        # A read that hit the limit covers its transactions up to the last one it reached,
        # which it may have read in part; one that did not covers everything written.
        found.upto = max(found.max_seq or mark, int(visible or mark))
        for table in (simple_records, rich):
            if table.num_rows >= TICK_BATCH:
                last = pc.max(table.column("write_seq")).as_py()
                found.upto = min(found.upto or last, last - 1)
        return found

    def unread(self) -> int:
        """Events stored that identity resolution has not read yet: how far it is behind."""
        mark = self._state("write_seq")
        if mark is None:  # nothing read yet (or read before write_seq existed)
            return self._stored()
        return self.backlog(int(mark))

    def _stored(self) -> int:
        """Events in the store (DuckDB keeps the count in its metadata)."""
        return int(self.store.scalar("SELECT count(*) FROM events") or 0)

    def _rebuild_pays(self, mark: int) -> bool:
        """Whether a rebuild catches up sooner than increments (see REBUILD_BACKLOG)."""
        unread = self.backlog(mark)  # reads only the newest row groups
        if unread <= REBUILD_BACKLOG:
            return False
        return unread > REBUILD_SHARE * self._stored()

    def backlog(self, mark: int) -> int:
        """Events not read yet, when every event up to write_seq `mark` has been."""
        return int(
            self.store.scalar("SELECT count(*) FROM events WHERE write_seq > ?", [mark]) or 0
        )

    # -- one incremental step -----------------------------------------------------------------

    def step(self, defer_quiet: bool = False) -> RunReport | None:
        """Process what arrived since the last step; None if nothing did.

        `defer_quiet` (the background thread): hold the refresh of quiet profiles for up to
        REFRESH_EVERY (see _hold_quiet); otherwise everything read is done on return."""
        with self.lock if defer_quiet else self._lock_with_no_refresh():
            state = self._states()
            # new rules, or a store whose events were read before write_seq existed
            if state.get("rules") != self.rules_hash() or "write_seq" not in state:
                if not self._stored():
                    # nothing to rebuild from: just remember the rules
                    statements = self._state_statements(None, state.get("write_seq"))
                    self.writer.write_sync(WriteBatch(statements=statements))
                    return None
                return self.rebuild()
            mark = int(state["write_seq"])
            if self._rebuild_pays(mark):
                return self.rebuild(after=mark)
            started = time.perf_counter()
            found = self._read_new(Normaliser(self.plan().identity), mark)
            found.read_seconds = time.perf_counter() - started
            if not found.count:
                self.runner.drop_temps()
                if found.upto is not None and found.upto > mark:
                    # nothing new to link, but the mark moves on: `unread` says 0 again
                    statements = self._state_statements(found.upto, str(mark))
                    self.writer.write_sync(WriteBatch(statements=statements))
                if not (self._quiet or self._pending):
                    return None
                if not defer_quiet:
                    return self._refresh_held(started)
                self._start_refresh(quiet=True)
                return None
            return self._apply(found, started, defer_quiet, mark)

    def _apply(self, found: Extracted, started: float, defer_quiet: bool, mark: int) -> RunReport:
        scratch = self._scratch()
        try:
            records, observations = found.tables()
            pq.write_table(records, scratch / "records.parquet")
            pq.write_table(observations, scratch / "observations.parquet")
            insert_records = [
                _insert_file("identity_records", scratch / "records.parquet"),
                _insert_file("identity_observations", scratch / "observations.parquet"),
            ]
            # 1. Records that link nothing new (one known identifier, not earlier than it was
            # first seen) leave their closure as it is: only their profiles are refreshed.
            # The others' closures are stitched again, whole.
            t0 = time.perf_counter()
            run = self.runner
            run.put("k_new_obs", observations)
            rules = self.plan().identity
            strong = frozenset(t for t in IDENTIFIER_TYPES if rules.limit(t) == 1)
            answer = self.known.classify(
                observations, strong, self._load_homes, self._load_partners, self._attach(rules)
            )
            classified = answer.rows
            seeds = {Identifier(r["id_type"], r["id_value"]) for r in classified if r["linking"]}
            statements: list[tuple[str, list[Any]]] = []
            report = RunReport(mode="incremental", attached=len(answer.attached))
            report.timings["read"] = found.read_seconds
            report.timings["classify"] = time.perf_counter() - t0
            if answer.attached:
                # written with the records, so a stitch of the same closures reads them
                pq.write_table(
                    pa.Table.from_pylist(answer.attached, schema=ATTACHED_SCHEMA),
                    scratch / "attached.parquet",
                )
                insert_records.append(_insert_file("identity_map", scratch / "attached.parquet"))
            # 2. The records themselves: before a stitch (which reads them) in a transaction
            # of their own; else with the tick's last one.
            if seeds:
                t0 = time.perf_counter()
                self.writer.write_sync(WriteBatch(statements=insert_records))
                report.timings["insert"] = time.perf_counter() - t0
            else:
                statements += insert_records
            stitched: set[str] = set()
            if seeds:
                values = {i.value for i in seeds if i.type in ("user_id", "anonymous_id")}
                t0 = time.perf_counter()
                scope = self._scope(seeds, values)
                scoped = time.perf_counter() - t0
                stitch_dir = scratch / "stitch"
                stitch_dir.mkdir()
                timings = report.timings
                # The background thread leaves the stitched profiles' traits to the refresh
                # thread (see _start_refresh): the links show without waiting for them.
                defer = defer_quiet and self._profiles_seconds > DEFER_PROFILES_AFTER
                statements, report = self._stitch_outputs(
                    scope, stitch_dir, "incremental", profiles=not defer
                )
                if not defer:
                    self._profiles_seconds = report.timings.get("profiles", 0.0)
                report.timings = {**timings, "scope": scoped, **report.timings}
                # New links first, in their own transaction: a lookup shows them before the
                # (larger) refresh of the quiet profiles below is done.
                t0 = time.perf_counter()
                self.writer.write_sync(WriteBatch(statements=statements))
                stitched = self._stitched(stitch_dir)
                if defer:
                    self._pending |= stitched
                report.timings["write_links"] = time.perf_counter() - t0
                report.timings["links_ready"] = time.perf_counter() - started
                statements = []
            quiet = [r for r in classified if not r["linking"] and r["closure_id"] not in stitched]
            self._hold_quiet(quiet, stitched)
            statements += self._state_statements(found.upto, str(mark))
            t0 = time.perf_counter()
            self.writer.write_sync(WriteBatch(statements=statements))
            report.timings["write"] = time.perf_counter() - t0
            # 3. Profile refreshes read the records just written.
            if not defer_quiet:
                refresh: list[tuple[str, list[Any]]] = []
                self._add_refresh(refresh, scratch, report)
                if refresh:
                    self.writer.write_sync(WriteBatch(statements=refresh))
                    self._release_quiet()
            elif self._pending or self._quiet_due():
                self._start_refresh(quiet=self._quiet_due())
            report.events_read = found.count
            report.seconds = time.perf_counter() - started
            return report
        except BaseException:
            # classify remembered this tick's pairs and new identifiers: the tick is read again
            self.known.clear()
            raise
        finally:
            self.runner.drop_temps()
            shutil.rmtree(scratch, ignore_errors=True)

    # -- quiet profiles: refreshed together, at most REFRESH_EVERY apart ------------------------
    #
    # Records that link nothing only change their profiles' computed traits and last-seen
    # times. Recomputing those reads every event of the profiles, so under a steady load it is
    # done for all quiet profiles at once, REFRESH_EVERY after the first was held (longer when
    # refreshing is slow, see REFRESH_SHARE; at once when no new events wait), while new links
    # go on being stitched tick by tick. A closure stitched meanwhile has its profiles
    # recomputed whole, so its held rows are dropped.

    def _hold_quiet(self, quiet: list[dict[str, Any]], stitched: set[str]) -> None:
        if stitched:
            self._quiet = {k: r for k, r in self._quiet.items() if r["closure_id"] not in stitched}
        for row in quiet:
            key = (row["id_type"], row["id_value"])
            held = self._quiet.get(key)
            if held is None or row["ts"] > held["ts"]:
                self._quiet[key] = row
        if not self._quiet:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = time.monotonic()

    def _quiet_due(self) -> bool:
        since = self._quiet_since
        wait = max(REFRESH_EVERY, REFRESH_SHARE * self._refresh_seconds)
        return since is not None and time.monotonic() - since >= wait

    def _add_refresh(
        self, statements: list[tuple[str, list[Any]]], scratch: Path, report: RunReport
    ) -> int:
        """Append the refresh of every held quiet profile (and of the profiles of closures
        stitched without them) to `statements`; the number of profiles."""
        closures, self._pending = self._pending, set()
        quiet = [r for r in self._quiet.values() if r["closure_id"] not in closures]
        if not quiet and not closures:
            return 0
        t0 = time.perf_counter()
        statements += self._refresh_parts(quiet, closures, scratch, self.runner)[0]
        count = len({r["profile_id"] for r in quiet})
        if closures:
            count += pq.read_metadata(scratch / "closures" / "profiles.parquet").num_rows
        report.profiles += count
        report.timings["refresh"] = time.perf_counter() - t0
        return count

    def _release_quiet(self) -> None:
        """After the refresh is written."""
        self._quiet = {}
        self._quiet_since = None

    # The background thread hands the held rows to a refresh of its own, so new links go on
    # being stitched while the (slower) refresh reads the profiles' events. A closure stitched
    # after the refresh started has its profiles recomputed whole by that stitch: the refresh
    # leaves those profiles alone when it writes.

    def _start_refresh(self, quiet: bool) -> None:
        """Hand the pending closures (and with `quiet` the held quiet rows) to a refresh
        thread, unless one runs: then they go with the next."""
        if self._refresh_running() or self._finishers:
            return
        closures, self._pending = self._pending, set()
        rows: list[dict[str, Any]] = []
        if quiet:
            rows = [r for r in self._quiet.values() if r["closure_id"] not in closures]
            self._release_quiet()
        if not rows and not closures:
            return
        self._stitch_seq += 1
        self._refreshing = NamedThread(
            target=self._refresh_beside,
            args=(rows, closures, self._stitch_seq, self._epoch, self._compile_key()),
            name="kilde-refresh",
            daemon=True,
            background=True,
        )
        self._refreshing.start()

    def _finish_refresh(self) -> None:
        thread = self._refreshing
        if thread is not None:
            thread.join()

    def _refresh_running(self) -> bool:
        return self._refreshing is not None and self._refreshing.is_alive()

    @contextlib.contextmanager
    def _lock_with_no_refresh(self) -> Iterator[None]:
        """The lock, once no refresh thread runs. Joining first is not enough: the background
        thread can start a refresh between the join and the lock, and a step that then finds
        nothing left would report everything done while that refresh still writes. While a
        step waits here the background thread starts no new refresh (so a steady stream of
        them cannot keep it waiting): the held rows stay for this step to refresh itself."""
        with self.lock:
            self._finishers += 1
        try:
            while True:
                self._finish_refresh()  # outside the lock: the refresh takes it to write
                with self.lock:
                    if not self._refresh_running():
                        yield
                        return
        finally:
            with self.lock:
                self._finishers -= 1

    def _refresh_beside(
        self, rows: list[dict[str, Any]], closures: set[str], seq: int, epoch: int, key: str
    ) -> None:
        scratch = self._scratch()
        run: Runner | None = None
        try:
            run = self._refresh_runner
            if run is None or self._refresh_runner_key != key:
                if run is not None:
                    run.close()
                run = self._refresh_runner = Runner(self.store.cursor())
                self._refresh_runner_key = key
            statements, closure_seconds, quiet_seconds = self._refresh_parts(
                rows, closures, scratch, run
            )
            with self.lock:
                if epoch != self._epoch:
                    return  # rebuilt meanwhile: every profile is fresh
                stale = {c for c, at in self._stitched_at.items() if at >= seq}
                if stale and rows:
                    _keep_profiles(
                        scratch / "quiet",
                        {r["profile_id"] for r in rows if r["closure_id"] not in stale},
                    )
                if stale and closures:
                    _drop_closures(scratch / "closures", stale)
                self.writer.write_sync(WriteBatch(statements=statements))
                self._stitched_at = {}
                if closures:
                    self._profiles_seconds = closure_seconds
                if rows:
                    self._refresh_seconds = quiet_seconds
        except Exception as exc:
            log.error("profile refresh failed: %s", type(exc).__name__)
            log.debug("profile refresh failed", exc_info=True)
            self.last_error = type(exc).__name__
        finally:
            if run is not None:
                with contextlib.suppress(Exception):
                    run.drop_temps()
            shutil.rmtree(scratch, ignore_errors=True)

    def _refresh_parts(
        self, rows: list[dict[str, Any]], closures: set[str], scratch: Path, run: Runner
    ) -> tuple[list[tuple[str, list[Any]]], float, float]:
        """The profiles of pending closures (in scratch/closures) and of held quiet rows (in
        scratch/quiet), the statements that replace them, and the seconds each part took."""
        statements: list[tuple[str, list[Any]]] = []
        started = time.perf_counter()
        if closures:
            (scratch / "closures").mkdir()
            statements += self._closure_outputs(closures, scratch / "closures", run)
        closure_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if rows:
            (scratch / "quiet").mkdir()
            statements += self._refresh_outputs(rows, scratch / "quiet", run)
        return statements, closure_seconds, time.perf_counter() - started

    def _closure_outputs(
        self, closures: set[str], scratch: Path, run: Runner
    ) -> list[tuple[str, list[Any]]]:
        """The profiles of closures stitched without them: computed from the identity map
        (written by the stitch), replacing the rows of those closures and of the ones they
        replaced."""
        plan = self.plan()
        salt = self.salt()
        mapped = _map_of_closures(run, closures, "k_w_closures", "k_w_map")
        identities = run.make(
            "k_w_identities", "closures/identities", lambda: _anchored(mapped, salt)
        )
        _write_profiles(run, plan, identities, "closures", scratch)
        pq.write_table(
            run.arrow("closures/list", lambda: run.temp("k_w_closures")),
            scratch / "closures.parquet",
        )
        gone = "SELECT closure_id FROM read_parquet(?)"

        def p(name: str) -> list[Any]:
            return [str(scratch / name)]

        return [
            (f"DELETE FROM profiles WHERE closure_id IN ({gone})", p("closures.parquet")),
            (f"DELETE FROM profile_traits WHERE closure_id IN ({gone})", p("closures.parquet")),
            *_profile_inserts(scratch),
        ]

    def _stitched(self, stitch_dir: Path) -> set[str]:
        """After a stitch is written: what the engine remembers, and what a refresh in flight
        must leave alone. The closures it replaced."""
        closures = set(
            pq.read_table(stitch_dir / "closures.parquet").column("closure_id").to_pylist()
        )
        self.known.forget_closures(closures)
        self.known.remember(
            pq.read_table(
                stitch_dir / "map.parquet",
                columns=["id_type", "id_value", "profile_id", "closure_id", "first_seen", "shared"],
            )
        )
        if self._refresh_running():
            for closure in closures:
                self._stitched_at[closure] = self._stitch_seq
        return closures

    # -- misses of the engine's memory (see known.py) -------------------------------------------

    def _load_homes(self, keys: set[Key]) -> pa.Table:
        run = self.runner
        run.put("k_kn_keys", _keys_table(keys))
        homes = keyed.lookup(
            run,
            "k_kn_homes",
            run.source("identity_map"),
            "id_value",
            run.temp("k_kn_keys"),
            ["id_type", "id_value"],
        )
        return run.arrow(
            "known/homes",
            lambda: homes.select(
                "id_type", "id_value", "profile_id", "closure_id", "first_seen", "shared"
            ),
        )

    def _attach(self, rules: IdentityRules) -> Attach:
        """What `KnownIdentities.classify` needs to add new identifiers without a stitch."""

        def separated() -> frozenset[Key]:
            return frozenset(
                (i.type, i.value) for s in self.separations() for i in (*s.keep, *s.split)
            )

        return Attach(
            rules=rules,
            separated=separated,
            previous_values=self._previous_values,
            load_counts=self._load_counts,
        )

    def _load_counts(self, closures: set[str]) -> list[tuple[str, str, str, int]]:
        """(closure_id, profile_id, id_type, identifiers) of every profile of these closures."""
        run = self.runner
        members = _map_of_closures(run, closures, "k_kn_closures", "k_kn_members")

        def counts_expr() -> ir.Table:
            return members.group_by("closure_id", "profile_id", "id_type").aggregate(
                n=members.count()
            )

        table = run.arrow("known/counts", counts_expr)
        columns = ("closure_id", "profile_id", "id_type", "n")
        return list(zip(*(table.column(c).to_pylist() for c in columns), strict=True))

    def _load_partners(self, keys: set[Key]) -> list[Pair]:
        """(strong, other) pairs of the stored records carrying these identifiers, except the
        records of this tick (k_new_obs)."""
        run = self.runner
        run.put("k_kn_strong", _keys_table(keys))
        past = run.source("identity_observations")
        strong = run.temp("k_kn_strong")
        mine = keyed.lookup(run, "k_kn_with", past, "id_value", strong, ["id_type", "id_value"])
        history = keyed.lookup(
            run,
            "k_kn_history",
            past,
            "message_id",
            mine.select("source", "message_id"),
            ["source", "message_id"],
        )

        def pairs_expr() -> ir.Table:
            h = history.anti_join(
                run.temp("k_new_obs").select("source", "message_id"), ["source", "message_id"]
            )
            h1, h2 = h.view(), h.view()
            pairs = h1.join(h2, [h1.source == h2.source, h1.message_id == h2.message_id]).select(
                s_type=h1.id_type, s_value=h1.id_value, o_type=h2.id_type, o_value=h2.id_value
            )
            pairs = pairs.filter((pairs.s_type != pairs.o_type) | (pairs.s_value != pairs.o_value))
            wanted = strong.select(s_type=strong.id_type, s_value=strong.id_value)
            return pairs.semi_join(wanted, ["s_type", "s_value"]).distinct()

        table = run.arrow("known/partners", pairs_expr)
        return list(
            zip(
                *(table.column(c).to_pylist() for c in ("s_type", "s_value", "o_type", "o_value")),
                strict=True,
            )
        )

    def _refresh_held(self, started: float) -> RunReport:
        """Nothing new to read: refresh the held quiet profiles now."""
        scratch = self._scratch()
        try:
            report = RunReport(mode="refresh")
            statements: list[tuple[str, list[Any]]] = []
            self._add_refresh(statements, scratch, report)
            t0 = time.perf_counter()
            self.writer.write_sync(WriteBatch(statements=statements))
            report.timings["write"] = time.perf_counter() - t0
            self._release_quiet()
            report.seconds = time.perf_counter() - started
            return report
        finally:
            self.runner.drop_temps()
            shutil.rmtree(scratch, ignore_errors=True)

    def _refresh_outputs(
        self, quiet: list[dict[str, Any]], scratch: Path, run: Runner | None = None
    ) -> list[tuple[str, list[Any]]]:
        """Profiles whose identities did not change: new last-seen times and computed traits."""
        run = run or self.runner
        plan = self.plan()
        run.put(
            "k_quiet",
            pa.table(
                {
                    "id_type": [r["id_type"] for r in quiet],
                    "id_value": [r["id_value"] for r in quiet],
                    "ts": pa.array([r["ts"] for r in quiet], UTC_US),
                    "profile_id": [r["profile_id"] for r in quiet],
                }
            ),
        )
        refreshed = _refreshed(run)  # runs its keyed stages
        identities = run.make("k_identities", "refresh/identities", lambda: refreshed)
        _write_profiles(run, plan, identities, "refresh", scratch)
        pq.write_table(
            pa.table({"profile_id": sorted({r["profile_id"] for r in quiet})}),
            scratch / "quiet.parquet",
        )
        pq.write_table(run.arrow("refresh/seen", lambda: _last_seen(run)), scratch / "seen.parquet")
        quiet_ids = "SELECT profile_id FROM read_parquet(?)"

        def p(name: str) -> list[Any]:
            return [str(scratch / name)]

        return [
            (
                "UPDATE identity_map SET last_seen = s.ts FROM read_parquet(?) s "
                "WHERE identity_map.id_type = s.id_type AND identity_map.id_value = s.id_value "
                "AND s.ts > identity_map.last_seen",
                p("seen.parquet"),
            ),
            (f"DELETE FROM profiles WHERE profile_id IN ({quiet_ids})", p("quiet.parquet")),
            (f"DELETE FROM profile_traits WHERE profile_id IN ({quiet_ids})", p("quiet.parquet")),
            *_profile_inserts(scratch),
        ]

    def _state_statements(
        self, upto: int | None, previous: str | None
    ) -> list[tuple[str, list[Any]]]:
        """Remember the rules, and that every event up to `upto` is read (`previous`: what
        identity_state says now)."""
        statements = []
        if previous is None or (upto is not None and upto > int(previous)):
            statements.append(self._set_state("write_seq", str(max(upto or 0, 0))))
        statements.append(self._set_state("rules", self.rules_hash()))
        return statements

    def _scope(self, seeds_in: set[Identifier], values: set[str]) -> pa.Table:
        run = self.runner
        touched = sorted(seeds_in)
        for value in sorted(values):  # the other reading of an alias's previousId
            touched.append(Identifier("user_id", value))
            touched.append(Identifier("anonymous_id", value))
        if not values & self._previous_values():
            return self._scope_known(touched)
        run.put(
            "k_seeds",
            pa.table(
                {"id_type": [i.type for i in touched], "id_value": [i.value for i in touched]},
                schema=SCOPE_SCHEMA,
            ),
        )

        # keyed stages: every lookup reads only the rows of the identifiers concerned
        t = run.temp("k_seeds")
        obs = run.source("identity_observations")
        idmap = run.source("identity_map")
        # aliases whose previousId is one of the new ids: their records join the scope
        prev = keyed.lookup(run, "k_s_prev", obs, "id_value", t, ["id_type", "id_value"])
        prev = prev.filter(prev.role == "previous").select("source", "message_id")
        alias_ids = keyed.lookup(
            run, "k_s_alias", obs, "message_id", prev, ["source", "message_id"]
        )
        seeds = run.make(
            "k_s_seeds",
            "scope/seeds",
            lambda: t.union(alias_ids.select("id_type", "id_value")).distinct(),
        )
        homes = keyed.lookup(run, "k_s_homes", idmap, "id_value", seeds, ["id_type", "id_value"])
        closures = homes.select("closure_id")
        members = keyed.lookup(run, "k_s_members", idmap, "closure_id", closures, ["closure_id"])

        def scope_expr() -> ir.Table:
            return seeds.union(members.select("id_type", "id_value")).distinct()

        return run.arrow("scope", scope_expr)

    def _previous_values(self) -> set[str]:
        known = self.known.previous_values
        if known is None:
            known = self.known.previous_values = {
                r["id_value"]
                for r in self.store.query(
                    "SELECT DISTINCT id_value FROM identity_observations WHERE role = 'previous'"
                )
            }
        return known

    def _scope_known(self, touched: list[Identifier]) -> pa.Table:
        """`_scope` when no alias names one of the touched values as previousId: the homes of
        the touched identifiers come from the engine's memory, their closures' members from
        one lookup."""
        run = self.runner
        keys = {(i.type, i.value) for i in touched}
        homes = self.known.homes_of(keys, self._load_homes)
        run.put(
            "k_s_homes",
            pa.table(
                {
                    "id_type": [k[0] for k in homes],
                    "id_value": [k[1] for k in homes],
                    "closure_id": [h[1] for h in homes.values()],
                },
                schema=pa.schema([*SCOPE_SCHEMA, ("closure_id", pa.string())]),
            ),
        )
        homes_t = run.temp("k_s_homes")
        idmap = run.source("identity_map")
        members = keyed.lookup(
            run, "k_s_members", idmap, "closure_id", homes_t.select("closure_id"), ["closure_id"]
        )
        found = run.arrow("scope/members", lambda: members.select("id_type", "id_value"))
        mine = _keys_table(keys)
        return (
            pa.concat_tables([mine, found.cast(SCOPE_SCHEMA)])
            .group_by(["id_type", "id_value"])
            .aggregate([])
        )

    # -- the shared core of increments and rebuilds -------------------------------------------

    def _stitch_and_write(
        self, scope: pa.Table | None, scratch: Path, mode: str, upto: int | None
    ) -> RunReport:
        try:
            statements, report = self._stitch_outputs(scope, scratch, mode)
        finally:
            self.runner.drop_temps()
        statements += self._state_statements(upto, self._state("write_seq"))
        t0 = time.perf_counter()
        self.writer.write_sync(WriteBatch(statements=statements))
        report.timings["write"] = time.perf_counter() - t0
        return report

    def _stitch_outputs(
        self, scope: pa.Table | None, scratch: Path, mode: str, profiles: bool = True
    ) -> tuple[list[tuple[str, list[Any]]], RunReport]:
        """Stitch (all, or the closures of `scope`) into parquet files and the statements
        that replace the old results with them."""
        run = self.runner
        report = stitch_outputs(
            run,
            self.plan(),
            self.salt(),
            self.separations(),
            scope,
            scratch,
            mode,
            # made by _scope, which every scoped caller runs first
            None if scope is None else run.temp("k_s_homes"),
            profiles=profiles,
        )
        return self._replace_statements(scratch, full=scope is None, profiles=profiles), report

    def _replace_statements(
        self, scratch: Path, *, full: bool, profiles: bool = True
    ) -> list[tuple[str, list[Any]]]:
        """Replace the results of the stitched closures (of everything when `full`); without
        `profiles` the profiles and their traits are left to `_closure_outputs`."""

        def p(name: str) -> list[Any]:
            return [str(scratch / name)]

        tables = ["identity_map", "identity_conflicts"]
        if profiles:
            tables += ["profiles", "profile_traits"]
        closures = "SELECT closure_id FROM read_parquet(?)"
        deletes: list[tuple[str, list[Any]]] = [
            (f"DELETE FROM {table}", [])
            if full
            else (f"DELETE FROM {table} WHERE closure_id IN ({closures})", p("closures.parquet"))
            for table in tables
        ]
        files = {
            "identity_map": "map.parquet",
            "identity_conflicts": "conflicts.parquet",
            "profiles": "profiles.parquet",
            "profile_traits": "traits.parquet",
            "profile_ids": "ids.parquet",
        }
        inserts = [_insert_file(t, scratch / files[t]) for t in [*tables, "profile_ids"]]
        return [*deletes, *inserts]

    def _map_indexes(self, present: bool) -> None:
        """Drop identity_map's indexes, or make them if missing; each in a transaction of its
        own (dropped in the transaction that rewrites the map, DuckDB still updates them row
        by row when it commits)."""
        statements: list[tuple[str, list[Any]]] = [
            (f"CREATE INDEX IF NOT EXISTS {name} ON identity_map ({column})", [])
            if present
            else (f"DROP INDEX IF EXISTS {name}", [])
            for name, column in MAP_INDEXES.items()
        ]
        self.writer.write_sync(WriteBatch(statements=statements))

    # -- unmerge --------------------------------------------------------------------------------

    def unmerge(self, profile_id: str, split: list[Identifier], reason: str | None) -> RunReport:
        """Split identifiers off a profile for good: rebuilds and increments respect it."""
        with self.lock:
            started = time.perf_counter()
            if self._quiet or self._pending:
                self._refresh_held(started)
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
                self._stitched(scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            report.seconds = time.perf_counter() - started
            return report

    # -- full rebuild ---------------------------------------------------------------------------

    def start_rebuild(self) -> concurrent.futures.Future[RunReport]:
        """Run a rebuild in its own thread (one at a time); the future gives its report."""
        with self._guard:
            if self._rebuild is not None and not self._rebuild.done():
                return self._rebuild
            future: concurrent.futures.Future[RunReport] = concurrent.futures.Future()

            def work() -> None:
                try:
                    report = self.rebuild(self._say)
                    self.last_rebuild = report
                    future.set_result(report)
                except Exception as exc:
                    log.error("rebuild failed: %s", type(exc).__name__)
                    future.set_exception(exc)
                finally:
                    self.progress = ""

            self._rebuild = future
            NamedThread(target=work, name="kilde-rebuild", daemon=True).start()
            return future

    @property
    def rebuilding(self) -> bool:
        return self._rebuild is not None and not self._rebuild.done()

    def _say(self, text: str) -> None:
        self.progress = text

    def rebuild(
        self, progress: Callable[[str], None] | None = None, after: int | None = None
    ) -> RunReport:
        """Recompute identities and profiles from every stored event.

        `after`: every event up to this write_seq was read under the plan's current rules, so
        the identifiers read from them are kept and only later events are read again (a
        rebuild to catch up, see REBUILD_SHARE; reading the events was about half of it)."""
        with self.lock, self.store.analytics_memory():
            started = time.perf_counter()
            self._release_quiet()  # recomputed below with everything else
            self._pending = set()
            self._epoch += 1
            self.known.clear()
            say = progress or (lambda _: None)
            scratch = self._scratch()
            try:
                say("reading identifiers from the events")
                # Events written from here on are read again by the ticks, which skip those
                # this rebuild has read (identity_records).
                upto = int(self.store.scalar("SELECT coalesce(max(write_seq), 0) FROM events") or 0)
                normaliser = Normaliser(self.plan().identity)
                t0 = time.perf_counter()
                count = self._extract_rich(normaliser, scratch, after)
                rich_seconds = time.perf_counter() - t0
                self._extract_simple(normaliser, scratch, after)
                parts = [
                    ("identity_records", "records-*.parquet"),
                    ("identity_observations", "observations-*.parquet"),
                    ("identity_records", "simple-records.parquet"),
                    ("identity_observations", "simple-observations.parquet"),
                ]
                self.writer.write_sync(
                    WriteBatch(
                        statements=[
                            *_forget_records(after),
                            *[_insert_file(table, scratch / name) for table, name in parts],
                        ]
                    )
                )
                extract_seconds = time.perf_counter() - t0
                total = int(self.store.scalar("SELECT count(*) FROM identity_records") or 0)
                say("stitching identities and building profiles")
                self._map_indexes(present=False)
                try:
                    report = self._stitch_and_write(None, scratch, "rebuild", upto)
                finally:
                    self._map_indexes(present=True)
                report.events_read = total
                report.timings["extract"] = extract_seconds
                report.timings["extract_python"] = rich_seconds
                report.timings["extract_python_records"] = count
                report.seconds = time.perf_counter() - started
                return report
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def _extract_simple(self, normaliser: Normaliser, scratch: Path, after: int | None) -> None:
        """Records normalised set-based, in one pass over the events (those after write_seq
        `after`), as two parquet files.

        The stages are materialised one after the other (see `extract.simple_raw`).
        """
        run = self.runner
        variant, events = self._events_after(after)
        run.make("k_x_raw", "rebuild/raw" + variant, lambda: extract.simple_raw(events))
        run.make(
            "k_x_texts",
            "rebuild/texts",
            lambda: extract.simple_texts(run.temp("k_x_raw"), normaliser),
        )
        run.drop("k_x_raw")
        ids = run.make(
            "k_x_ids",
            "rebuild/ids",
            lambda: extract.simple_emails(run.temp("k_x_texts"), normaliser),
        )
        run.drop("k_x_texts")
        run.parquet(
            "rebuild/records",
            lambda: extract.simple_records(ids, normaliser),
            str(scratch / "simple-records.parquet"),
        )
        run.parquet(
            "rebuild/observations",
            lambda: extract.simple_observations(ids),
            str(scratch / "simple-observations.parquet"),
        )
        run.drop("k_x_ids")

    def _extract_rich(self, normaliser: Normaliser, scratch: Path, after: int | None) -> int:
        """Records that need the Python normaliser (of events after write_seq `after`),
        written as parquet parts."""
        run = self.runner

        variant, events = self._events_after(after)
        sql, _ = run.sql("rebuild/rich" + variant, lambda: rich_records(events))
        count = 0
        part = 0
        # on the runner's connection, which holds k_after; nothing else runs on it meanwhile
        for batch in run.con.sql(sql).to_arrow_reader(100_000):
            found = extract_rich(batch, normaliser)
            self._write_part(found, scratch, part)
            part += 1
            count += found.count
        if part == 0:
            self._write_part(Extracted(), scratch, part)
        return count

    def _events_after(self, after: int | None) -> tuple[str, ir.Table]:
        """The events after write_seq `after` (all without it), and the key of a stage that
        reads them: the runner compiles a stage once, so `after` is read from a table."""
        run = self.runner
        events = run.source("events")
        if after is None:
            return "", events
        since = run.put("k_after", pa.table({"after": pa.array([after], pa.int64())}))
        return "/after", events.filter(events.write_seq > since.after.max().as_scalar())

    @staticmethod
    def _write_part(found: Extracted, scratch: Path, part: int) -> None:
        records, observations = found.tables()
        pq.write_table(records, scratch / f"records-{part:05d}.parquet")
        pq.write_table(observations, scratch / f"observations-{part:05d}.parquet")

    # -- background thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.known.clear()  # whoever stopped the engine may have rewritten its tables
        self._salt = None
        self._map_indexes(present=True)  # a rebuild stopped half-way leaves them dropped
        self._stop.clear()
        self._thread = NamedThread(
            target=self._run, name="kilde-identity", daemon=True, background=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._finish_refresh()
        if self._pending or self._quiet:  # what the background thread left for its refresh
            try:
                with self.lock:
                    self._refresh_held(time.perf_counter())
            except Exception as exc:  # stopping goes on; a rebuild repairs the profiles
                log.error("profile refresh at stop failed: %s", type(exc).__name__)
        self.known.clear()
        self._salt = None
        if self._refresh_runner is not None:
            with contextlib.suppress(Exception):
                self._refresh_runner.close()
            self._refresh_runner = None
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self._runner.close()
            self._runner = None
        if self._news_cursor is not None:
            with contextlib.suppress(Exception):
                self._news_cursor.close()
            self._news_cursor = None

    def _news(self) -> tuple[int, str]:
        """A cheap fingerprint of what could need work: the events' row count (kept in
        DuckDB's metadata) and the plan's rules."""
        if self._news_cursor is None:
            self._news_cursor = self.store.cursor()
        row = self._news_cursor.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0] if row else 0), self.rules_hash()

    def _run(self) -> None:
        done: tuple[int, str] | None = None
        while not self._stop.is_set():
            try:
                news = self._news()
                if news == done and not self._quiet and not self._pending:
                    self._stop.wait(self.interval)
                    continue
                began = time.monotonic()
                report = self.step(defer_quiet=True)
                if report is not None and report.seconds > SLOW_TICK:
                    log.info(
                        "slow identity tick: %.1f s for %d events (%s)",
                        report.seconds,
                        report.events_read,
                        ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()),
                    )
                if report is None:
                    done = news  # everything up to this count is read
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
            else:  # see TICK_PAUSE_SHARE
                took = time.monotonic() - began
                pause = TICK_PAUSE_SHARE * took
                self._stop.wait(pause if report.mode == "rebuild" else min(TICK_PAUSE_MAX, pause))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Process everything stored so far (for commands that want fresh profiles)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.step() is None:
                return True
        return False


def _refreshed(run: Runner) -> ir.Table:
    """The identities of the quiet profiles, with the new last-seen times."""
    quiet = run.temp("k_quiet")
    idmap = run.source("identity_map")
    mine = keyed.lookup(run, "k_q_map", idmap, "profile_id", quiet, ["profile_id"])
    seen = quiet.select("id_type", "id_value", new_ts=quiet.ts)
    rows = mine.left_join(seen, ["id_type", "id_value"])
    profiles = run.source("profiles")
    anchors = keyed.lookup(run, "k_q_profiles", profiles, "profile_id", quiet, ["profile_id"])
    rows = rows.join(anchors.select("profile_id", "anchor_type"), "profile_id")
    return rows.select(
        "id_type",
        "id_value",
        "profile_id",
        "closure_id",
        "first_seen",
        "shared",
        "anchor_type",
        last_seen=ibis.greatest(rows.last_seen, rows.new_ts.fill_null(rows.last_seen)),
    )


def _last_seen(run: Runner) -> ir.Table:
    quiet = run.temp("k_quiet")
    return quiet.select("id_type", "id_value", "ts")


def _forget_records(after: int | None) -> list[tuple[str, list[Any]]]:
    """Statements removing the identifiers read from the events after write_seq `after` (all
    of them without it), before a rebuild writes them again."""
    if after is None:
        return [("DELETE FROM identity_records", []), ("DELETE FROM identity_observations", [])]
    return [
        (
            "DELETE FROM identity_observations o WHERE EXISTS (SELECT 1 FROM identity_records r"
            " WHERE r.write_seq > ? AND r.source = o.source AND r.message_id = o.message_id)",
            [after],
        ),
        ("DELETE FROM identity_records WHERE write_seq > ?", [after]),
    ]


def rich_records(events: ir.Table) -> ir.Table:
    """The records whose identifiers are read in Python (identify, alias, rich context)."""
    return events.filter(extract.is_rich(events)).select(*RICH_COLUMNS)


def extract_rich(batch: pa.RecordBatch, normaliser: Normaliser) -> Extracted:
    """Identifiers of a batch of `rich_records` rows, read by the Python normaliser."""
    found = Extracted()
    columns = batch.to_pydict()
    names = list(columns)
    for values in zip(*columns.values(), strict=True):
        found.add(dict(zip(names, values, strict=True)), normaliser)
    return found


def stitch_outputs(
    run: Runner,
    plan: Plan,
    salt: str,
    separations: list[Separation],
    scope: pa.Table | None,
    scratch: Path,
    mode: str,
    old_homes: ir.Table | None = None,
    profiles: bool = True,
) -> RunReport:
    """Stitch (all, or the closures of `scope`) and build the profiles, as parquet files in
    `scratch`: map, profiles, traits, conflicts, ids (newly issued profile ids) and closures
    (those replaced). Any Runner: the engine's DuckDB one, or Spark's (kilde.store.backends).

    `old_homes`: identity_map rows of the scope's closures when already at hand (a closure_id
    column is enough). Without `profiles` no profiles or traits files are made."""
    result: StitchResult = stitch(run, plan.identity, salt, scope, separations)
    t0 = time.perf_counter()
    identities = result.identities
    pq.write_table(
        run.arrow(
            "out/map",
            lambda: identities.select(*MAP_COLUMNS),
        ),
        scratch / "map.parquet",
    )
    if profiles:
        _write_profiles(run, plan, identities, None if scope is None else "stitch", scratch)
    conflict_rows = [c.row() for c in result.conflicts]
    pq.write_table(
        pa.Table.from_pylist(conflict_rows, schema=_CONFLICT_SCHEMA)
        if conflict_rows
        else _CONFLICT_SCHEMA.empty_table(),
        scratch / "conflicts.parquet",
    )

    fresh = identities.select("profile_id", "anchor_type", "anchor_value").distinct()
    known_ids = run.source("profile_ids")
    old: ir.Table | None = None
    if scope is not None:
        fresh = run.make("k_o_fresh", "out/fresh", lambda: fresh)
        known_ids = keyed.lookup(run, "k_o_known", known_ids, "profile_id", fresh, ["profile_id"])
        old = old_homes
        if old is None:
            old = keyed.lookup(
                run,
                "k_o_old",
                run.source("identity_map"),
                "id_value",
                run.temp("k_scope"),
                ["id_type", "id_value"],
            )

    def issued() -> ir.Table:
        return fresh.anti_join(known_ids, "profile_id")

    pq.write_table(run.arrow(f"out/issued/{scope is None}", issued), scratch / "ids.parquet")

    def closures_expr() -> ir.Table:
        mine = identities.select("closure_id")
        if old is None:
            return mine.distinct()
        return mine.union(old.select("closure_id")).distinct()

    pq.write_table(
        run.arrow(f"out/closures/{scope is None}", closures_expr),
        scratch / "closures.parquet",
    )
    timings = dict(result.timings)
    timings["profiles"] = time.perf_counter() - t0
    return RunReport(
        mode=mode,
        identifiers=pq.read_metadata(scratch / "map.parquet").num_rows,
        profiles=pq.read_metadata(scratch / "profiles.parquet").num_rows if profiles else 0,
        conflicts=len(result.conflicts),
        dirty_closures=result.dirty_closures,
        rounds=result.rounds,
        timings=timings,
    )


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


def _map_of_closures(run: Runner, closures: set[str], listed: str, rows: str) -> ir.Table:
    """The identity_map rows of `closures` as temporary table `rows` (the closures themselves
    as temporary table `listed`)."""
    run.put(listed, pa.table({"closure_id": pa.array(sorted(closures), pa.string())}))
    idmap = run.source("identity_map")
    return keyed.lookup(run, rows, idmap, "closure_id", run.temp(listed), ["closure_id"])


def _keys_table(keys: set[Key]) -> pa.Table:
    ordered = sorted(keys)
    return pa.table(
        {"id_type": [k[0] for k in ordered], "id_value": [k[1] for k in ordered]},
        schema=SCOPE_SCHEMA,
    )


def _keep_profiles(scratch: Path, keep: set[str]) -> None:
    """Narrow a refresh's output files (see `_refresh_outputs`) to these profiles."""
    wanted = pa.array(sorted(keep), pa.string())
    for name in ("profiles.parquet", "traits.parquet", "quiet.parquet"):
        table = pq.read_table(scratch / name)
        pq.write_table(table.filter(pc.is_in(table.column("profile_id"), wanted)), scratch / name)


def _drop_closures(scratch: Path, stale: set[str]) -> None:
    """Narrow `_closure_outputs` files to the closures no later stitch has replaced."""
    gone = pa.array(sorted(stale), pa.string())
    for name in ("profiles.parquet", "traits.parquet", "closures.parquet"):
        table = pq.read_table(scratch / name)
        keep = pc.invert(pc.is_in(table.column("closure_id"), gone))
        pq.write_table(table.filter(keep), scratch / name)


def _anchored(mapped: ir.Table, salt: str) -> ir.Table:
    """identity_map rows with their profile's anchor type: the identifier whose hash the
    profile id is (see stitching.profile_id_of)."""
    is_anchor = profile_id_expr(salt, mapped.id_type, mapped.id_value) == mapped.profile_id
    anchors = mapped.filter(is_anchor)
    anchors = anchors.group_by("profile_id").aggregate(anchor_type=anchors.id_type.min())
    return mapped.join(anchors, "profile_id").select(*MAP_COLUMNS, "anchor_type")


def _write_profiles(
    run: Runner, plan: Plan, identities: ir.Table, part: str | None, scratch: Path
) -> None:
    """Computed traits and trait rows of `identities`' profiles as profiles.parquet and
    traits.parquet. `part` names the stages of a keyed read of the profiles' events; None
    reads all events (a rebuild)."""
    now = datetime.now(UTC)
    events = None if part is None else keyed_profile_events(run, identities, part)
    suffix = "" if part is None else "/" + part
    pq.write_table(
        computed_traits(run, identities, now, events, "computed" + suffix),
        scratch / "profiles.parquet",
    )
    pq.write_table(
        trait_rows(run, plan, identities, events, "traits" + suffix), scratch / "traits.parquet"
    )


def _profile_inserts(scratch: Path) -> list[tuple[str, list[Any]]]:
    """The statements that add `_write_profiles`' files."""
    return [
        _insert_file(table, scratch / name)
        for table, name in (("profiles", "profiles.parquet"), ("profile_traits", "traits.parquet"))
    ]


# Lookups read a profile and its traits by profile id. An index on it doubled the cost of
# rewriting profiles, so instead the rows are written in profile-id order: a rebuild writes all
# of them so, and DuckDB's zone maps then skip every row group but the one holding the id
# (about 2 ms instead of 15 on an idle store of 1.15M profiles). The profiles rewritten
# afterwards are appended, each batch in order, and their row groups are read whole: with a
# sixth of the profiles rewritten so, a lookup's read took about 4 ms. A rebuild sorts again.
_SORTED_BY = {"profiles": "profile_id", "profile_traits": "profile_id"}


def _insert_file(table: str, path: Path) -> tuple[str, list[Any]]:
    """The statement that adds the rows of a Parquet file to `table` (sorted, see above)."""
    order = f" ORDER BY {_SORTED_BY[table]}" if table in _SORTED_BY else ""
    return (f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?){order}", [str(path)])
