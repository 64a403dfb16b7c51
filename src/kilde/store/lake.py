"""The lake: event data as Parquet files in a directory, partitioned by day.

Layout (Hive-style partitions, read as they are by Spark, DuckDB and most other engines):

    LAKE/events/day=2026-11-29/part-20261129T101502-web1-4242-3f9a0c1d-000017.parquet
    LAKE/dead_letters/day=2026-11-29/part-....parquet
    LAKE/statements/day=2026-11-29/part-....parquet   (consent ledger rows and counters)
    LAKE/state/<table>/*.parquet                       (profiles and identity, kilde.store.backends)

Any number of stateless collectors (`kilde serve --collector-only`) append to the same lake
without talking to each other: every flush of every process writes new files whose names
carry the time, the host, the process id, a random part and a sequence number, so no two
writers ever pick the same name. A file is written under a temporary name in `LAKE/_incoming`,
flushed to disk, and renamed into its partition (an atomic rename on one file system), so a
reader sees a whole file or none. Only then is the request acknowledged. Files are never
changed in place; compaction (kilde.store.compaction) merges them and rewrites them for erasure
and retention.

Partitions are by the UTC day an event was received. The same message may sit in two files
when a client retried against another collector; readers deduplicate on (source, message_id)
(`events_relation`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kilde.store.ack_log import sync_directory
from kilde.store.database import Store
from kilde.store.schema import DEAD_LETTER_SCHEMA, EVENT_SCHEMA
from kilde.store.writer import (
    RecentIds,
    Writer,
    WriteResult,
    _Item,
    codes_of,
    recent_key,
)

log = logging.getLogger("kilde.lake")

EVENTS = "events"
DEAD_LETTERS = "dead_letters"
STATEMENTS = "statements"
DATASETS = (EVENTS, DEAD_LETTERS, STATEMENTS)
INCOMING = "_incoming"
LOCK_FILE = "_maintenance.lock"
PARTITION = "day"
STATEMENT_SCHEMA = pa.schema(
    [("received_at", pa.timestamp("us", tz="UTC")), ("sql", pa.string()), ("params", pa.string())]
)
SCHEMAS = {EVENTS: EVENT_SCHEMA, DEAD_LETTERS: DEAD_LETTER_SCHEMA, STATEMENTS: STATEMENT_SCHEMA}
_DAY = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


class Lake:
    """A lake directory: where each dataset's partitions and files are."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def create(self) -> Lake:
        for name in (*DATASETS, INCOMING):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        return self

    def dataset(self, name: str) -> Path:
        return self.root / name

    def partition(self, name: str, day: str) -> Path:
        return self.root / name / f"{PARTITION}={day}"

    def days(self, name: str = EVENTS) -> list[str]:
        base = self.dataset(name)
        if not base.is_dir():
            return []
        found = [m.group(1) for p in base.iterdir() if p.is_dir() and (m := _DAY.match(p.name))]
        return sorted(found)

    def files(self, name: str = EVENTS, day: str | None = None) -> list[Path]:
        """The visible data files of a dataset (or one day of it), oldest name first."""
        days = [day] if day is not None else self.days(name)
        out: list[Path] = []
        for d in days:
            part = self.partition(name, d)
            if part.is_dir():
                out.extend(sorted(p for p in part.glob("*.parquet") if p.name[0] not in "._"))
        return out

    def glob(self, name: str = EVENTS) -> str:
        """A glob over every file of a dataset, for engines that read Hive partitions."""
        return str(self.dataset(name) / f"{PARTITION}=*" / "*.parquet")

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def rows(self, name: str = EVENTS) -> int:
        return sum(pq.read_metadata(f).num_rows for f in self.files(name))

    @contextlib.contextmanager
    def maintenance(self) -> Iterator[None]:
        """Held by jobs that replace files (compaction, erasure, retention): one at a time.

        Collectors never take it: they only add new files, which these jobs leave alone.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- writing files ------------------------------------------------------------------------------

_SEQ = itertools.count()
_SEQ_LOCK = threading.Lock()


def file_name(now: datetime | None = None) -> str:
    """A name no other process or flush picks: time, host, pid, random part, sequence."""
    with _SEQ_LOCK:
        seq = next(_SEQ)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return f"part-{stamp}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{seq:06d}.parquet"


def write_file(lake: Lake, name: str, day: str, table: pa.Table, *, durable: bool = True) -> Path:
    """Write `table` as one new file in a partition: temporary name, sync, atomic rename."""
    incoming = lake.root / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    target_dir = lake.partition(name, day)
    target_dir.mkdir(parents=True, exist_ok=True)
    final = target_dir / file_name()
    fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".parquet.tmp", dir=incoming)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, final)
        if durable:
            sync_directory(target_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def day_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def split_by_day(table: pa.Table, column: str = "received_at") -> Iterator[tuple[str, pa.Table]]:
    """The rows of `table` per UTC day of `column`."""
    if table.num_rows == 0:
        return
    days = pc.strftime(table.column(column), format="%Y-%m-%d", locale="C")
    for day in pc.unique(days).to_pylist():
        yield day, table.filter(pc.equal(days, day))


def append(lake: Lake, name: str, table: pa.Table, *, durable: bool = True) -> list[Path]:
    """Append rows to a dataset: one new file per day the rows were received on."""
    return [
        write_file(lake, name, day, part, durable=durable)
        for day, part in split_by_day(table.cast(SCHEMAS[name]))
    ]


# -- the collector's writer ----------------------------------------------------------------------


class LakeWriter(Writer):
    """The Writer of a collector that appends to a lake instead of the DuckDB store.

    Same group commit and acknowledgements as the store's Writer (kilde.store.writer): every
    group of requests becomes one new file per dataset and day, synced and renamed into place
    before any of the requests is answered. `local` is the collector's own small store, which
    only serves the privacy screen (kilde.privacy) and is thrown away with the process.
    Deduplication is per process (a bounded memory of recent message ids); duplicates across
    collectors are removed when the lake is read and when it is compacted.
    """

    logs_events = False  # each group is its own synced file already

    def __init__(
        self,
        lake: Lake,
        local: Store,
        *,
        dedupe_capacity: int | None = None,
        max_queued_rows: int = 200_000,
    ) -> None:
        self.lake = lake.create()
        self.files_written = 0
        super().__init__(local, dedupe_capacity=dedupe_capacity, max_queued_rows=max_queued_rows)

    def _seed_recent(self, limit: int) -> None:
        self.recent = RecentIds(limit)  # a fresh process remembers nothing: stateless

    def _commit(self, items: list[_Item]) -> list[WriteResult]:
        results: list[WriteResult] = []
        events: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        statements: list[tuple[str, list[Any]]] = []
        added: list[np.ndarray] = []
        for item in items:
            batch = item.batch
            if self.screen is not None:
                self.screen(batch)
            result = WriteResult(dead_lettered=len(batch.dead_letters))
            if batch.events:
                codes = codes_of([recent_key(r["source"], r["message_id"]) for r in batch.events])
                answers = self.recent.seen_codes(codes).tolist()
                keep = self._remember_new(codes, answers, set(), added)
                events.extend(row for row, new in zip(batch.events, keep, strict=True) if new)
                result.stored += keep.count(True)
                result.duplicates += keep.count(False)
            dead.extend(batch.dead_letters)
            statements.extend(batch.statements)
            results.append(result)
        con = self._con
        con.execute("BEGIN TRANSACTION")
        try:
            # The collector's own store sees the statements too (its privacy screen reads the
            # consent ledger and the salt from it); the lake keeps them for the central store.
            for sql, params in statements:
                con.execute(sql, params)
            written = 0
            if dead:
                written += len(append(self.lake, DEAD_LETTERS, _table(dead, DEAD_LETTER_SCHEMA)))
            if statements:
                written += len(append(self.lake, STATEMENTS, statement_table(statements)))
            if events:
                written += len(append(self.lake, EVENTS, _table(events, EVENT_SCHEMA)))
            con.execute("COMMIT")
            self.files_written += written
        except Exception:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            self._forget(added)
            raise
        return results


# What a collector's own store starts from: the lake's published privacy state, so every
# collector hashes with the same salt and drops the same suppressed people at the door.
SEEDED_TABLES = ("privacy_state", "suppression_list", "consent_ledger")


def collector_store(lake: Lake, work_dir: Path | None = None) -> Store:
    """A fresh private store for one collector process, seeded from the lake's state."""
    root = Path(tempfile.mkdtemp(prefix="kilde-collector-", dir=work_dir))
    store = Store(root)
    ensure_privacy_salt(lake)
    con = store.cursor()
    try:
        for name in SEEDED_TABLES:
            files = sorted((lake.state_dir / name).glob("*.parquet"))
            if not files:
                continue
            con.execute(
                f'INSERT INTO "{name}" BY NAME SELECT * FROM read_parquet(?)',
                [[str(f) for f in files]],
            )
    finally:
        con.close()
    return store


def ensure_privacy_salt(lake: Lake) -> str:
    """The lake's privacy salt (state/privacy_state), created once by whoever comes first."""
    import secrets

    folder = lake.state_dir / "privacy_state"
    target = folder / "part-00000.parquet"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                table = pa.table({"key": ["salt"], "value": [secrets.token_hex(32)]})
                pq.write_table(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)  # fails if another process was first: theirs counts
        finally:
            tmp.unlink(missing_ok=True)
    for row in pq.read_table(target).to_pylist():
        if row["key"] == "salt":
            return str(row["value"])
    raise RuntimeError("the lake's privacy state has no salt")


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$ts": value.isoformat()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def statement_table(statements: list[tuple[str, list[Any]]]) -> pa.Table:
    """Statements a collector cannot run (no store): kept to be applied to a store later."""
    now = datetime.now(UTC)
    return pa.table(
        {
            "received_at": [now] * len(statements),
            "sql": [sql for sql, _ in statements],
            "params": [
                orjson.dumps([_jsonable(p) for p in params], default=str).decode()
                for _, params in statements
            ],
        },
        schema=STATEMENT_SCHEMA,
    )


def statement_params(text: str) -> list[Any]:
    """The parameters of a kept statement, timestamps restored."""
    out: list[Any] = []
    for value in orjson.loads(text):
        if isinstance(value, dict) and set(value) == {"$ts"}:
            out.append(datetime.fromisoformat(value["$ts"]))
        else:
            out.append(value)
    return out


@dataclass
class LakeSummary:
    files: int
    rows: int
    days: int
    bytes: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def summary(lake: Lake, name: str = EVENTS) -> LakeSummary:
    files = lake.files(name)
    return LakeSummary(
        files=len(files),
        rows=sum(pq.read_metadata(f).num_rows for f in files),
        days=len(lake.days(name)),
        bytes=sum(f.stat().st_size for f in files),
    )
