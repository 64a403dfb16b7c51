"""Lake maintenance: merge small files, and rewrite files for erasure and retention.

Collectors write one file per flush, so a busy lake gathers many small files, which slow every
reader down. `compact` merges the small files of each day into files of about `target_rows`
rows, dropping duplicate messages (a client that retried against another collector) on the
way, keeping the first receipt. The merged file is renamed into place before its inputs are
removed; a reader in between may see a message twice, which readers tolerate (they
deduplicate on source and message id), but never misses one.

Erasure and retention rewrite the files that hold what must go. They do not describe the rows
to remove a second time: each file is loaded into a private scratch store (the real schema,
from the migrations) and the privacy module's own code runs on it (`_erase_in_store` for an
erasure, retention's `_measure` and `_apply`); what is left replaces the file. The identity and
profile state is rebuilt from the rewritten events by the next `kilde compute`, and the state
tables are rewritten too so the person is gone from them at once.

Jobs that replace files run one at a time (`Lake.maintenance`); collectors keep appending new
files meanwhile, which these jobs never touch.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from kilde.identity.identifiers import Identifier
from kilde.plan.models import Plan
from kilde.store.database import Store
from kilde.store.lake import (
    DEAD_LETTERS,
    EVENTS,
    SCHEMAS,
    STATEMENTS,
    Lake,
    write_file,
)

DEFAULT_TARGET_ROWS = 1_000_000


@dataclass
class CompactReport:
    days: int = 0
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    duplicates_dropped: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["seconds"] = round(self.seconds, 3)
        return out


def _rows(path: Path) -> int:
    return int(pq.read_metadata(path).num_rows)


def _groups(files: list[Path], target_rows: int) -> Iterator[list[Path]]:
    """Small files in runs of at most `target_rows` rows (files already big enough stay)."""
    group: list[Path] = []
    total = 0
    for path in files:
        n = _rows(path)
        if n >= target_rows:
            continue
        if group and total + n > target_rows:
            yield group
            group, total = [], 0
        group.append(path)
        total += n
    if group:
        yield group


_FIRST_RECEIPT = (
    "SELECT * FROM merged QUALIFY row_number() OVER ("
    "PARTITION BY source, message_id ORDER BY received_at, sent_at) = 1 "
    "ORDER BY received_at, source, message_id"
)


def _merge(group: list[Path], dataset: str) -> pa.Table:
    merged = pa.concat_tables([pq.read_table(p, schema=SCHEMAS[dataset]) for p in group])
    if dataset != EVENTS:
        return merged
    con = duckdb.connect()
    try:
        con.register("merged", merged)
        result: pa.Table = con.sql(_FIRST_RECEIPT).to_arrow_table()
    finally:
        con.close()
    return result.cast(SCHEMAS[dataset])


def compact(
    lake: Lake,
    dataset: str = EVENTS,
    *,
    target_rows: int = DEFAULT_TARGET_ROWS,
    days: list[str] | None = None,
) -> CompactReport:
    """Merge the small files of each day of a dataset; see the module docstring."""
    started = time.perf_counter()
    report = CompactReport()
    with lake.maintenance():
        for day in days or lake.days(dataset):
            files = lake.files(dataset, day)
            report.files_before += len(files)
            changed = False
            for group in _groups(files, target_rows):
                if len(group) < 2:
                    continue
                before = sum(_rows(p) for p in group)
                merged = _merge(group, dataset)
                write_file(lake, dataset, day, merged)
                for path in group:  # the merged file is in place first: nothing goes missing
                    path.unlink(missing_ok=True)
                report.duplicates_dropped += before - merged.num_rows
                changed = True
            after = lake.files(dataset, day)
            report.files_after += len(after)
            report.rows += sum(_rows(p) for p in after)
            report.days += int(changed)
    report.seconds = time.perf_counter() - started
    return report


# -- rewriting files with the privacy module's own code ------------------------------------------


@contextlib.contextmanager
def scratch_store() -> Iterator[Store]:
    """A private, empty store with the real schema, thrown away afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kilde-rewrite-"))
    store = Store(root)
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def _load(con: duckdb.DuckDBPyConnection, table: str, path: Path) -> None:
    con.execute(f'DELETE FROM "{table}"')
    con.execute(
        f'INSERT INTO "{table}" BY NAME SELECT * FROM read_parquet(?, hive_partitioning = false)',
        [str(path)],
    )


def _replace(con: duckdb.DuckDBPyConnection, table: str, path: Path, schema: pa.Schema) -> None:
    """Write what is left of `table` over the file it came from (atomic rename)."""
    left = con.sql(f'SELECT * FROM "{table}"').to_arrow_table()
    from kilde.store.backends import conform

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(conform(left, schema), tmp, compression="zstd")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _lake_files(lake: Lake) -> Iterator[tuple[str, Path, pa.Schema]]:
    """(store table, file, file schema) of every file that can hold a person's rows."""
    for dataset in (EVENTS, DEAD_LETTERS):
        for path in lake.files(dataset):
            yield dataset, path, SCHEMAS[dataset]
    from kilde.store.backends import StateTables, table_schema

    state = StateTables(lake.state_dir)
    for name in state.names():
        try:
            schema = table_schema(name)
        except KeyError:
            continue
        for path in state.files(name):
            yield name, path, schema


@dataclass
class LakeErasure:
    files_rewritten: list[str] = field(default_factory=list)
    rows_removed: dict[str, int] = field(default_factory=dict)
    statements_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_rewritten": self.files_rewritten,
            "rows_removed": self.rows_removed,
            "statements_removed": self.statements_removed,
        }


def erase_from_lake(lake: Lake, subject: Any, suppressed: list[Identifier]) -> LakeErasure:
    """Remove a person from every file of a lake: events, dead letters, kept statements and
    the state tables. `subject` and `suppressed` are what kilde.privacy.erasure resolved (a
    Subject with every identifier of the person). Call it from an erasure when the installation
    has a lake; `kilde lake erase` calls it on its own.
    """
    import kilde.pipeline  # noqa: F401 - kilde.privacy imports it back; load it first
    from kilde.privacy.erasure import _erase_in_store, _sweep_values

    out = LakeErasure()
    if not lake.root.is_dir():
        return out
    record = {
        "id": "lake",
        "requested_at": datetime.now(UTC),
        "request_id": None,
        "subject": "",
        "identifiers": 0,
        "profiles": 0,
        "actor": None,
    }
    with lake.maintenance(), scratch_store() as store:
        con = store.cursor()
        try:
            for table, path, schema in _lake_files(lake):
                _load(con, table, path)
                removed = _erase_in_store(store, subject, suppressed, [], record)
                n = removed.get(table, 0)
                if n:
                    _replace(con, table, path, schema)
                    out.files_rewritten.append(str(path.relative_to(lake.root)))
                    out.rows_removed[table] = out.rows_removed.get(table, 0) + n
                con.execute(f'DELETE FROM "{table}"')
                con.execute("DELETE FROM erasures")
            values = _sweep_values(subject, suppressed) + subject.values("user_id", "anonymous_id")
            for path in lake.files(STATEMENTS):
                n = _drop_statements(path, values)
                if n:
                    out.statements_removed += n
                    out.files_rewritten.append(str(path.relative_to(lake.root)))
        finally:
            con.close()
    return out


def _drop_statements(path: Path, values: list[str]) -> int:
    """Kept statements (consent ledger rows, ...) whose parameters name the person."""
    needles = [v.lower() for v in values if v]
    if not needles:
        return 0
    table = pq.read_table(path, schema=SCHEMAS[STATEMENTS])
    params = [str(p or "").lower() for p in table.column("params").to_pylist()]
    keep = [not any(n in p for n in needles) for p in params]
    dropped = keep.count(False)
    if dropped:
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            pq.write_table(table.filter(pa.array(keep)), tmp, compression="zstd")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return dropped


def subject_in_lake(lake: Lake, given: list[Identifier]) -> Any:
    """The person named by `given`, with every identifier of their profiles in the lake's
    identity state (the privacy module's own resolution, over the lake's identity map)."""
    import kilde.pipeline  # noqa: F401 - kilde.privacy imports it back; load it first
    from kilde.privacy.subjects import Subject, expand

    with scratch_store() as store:
        con = store.cursor()
        try:
            for table in ("identity_map", "identity_records", "identity_observations"):
                for path in sorted((lake.state_dir / table).glob("*.parquet")):
                    con.execute(
                        f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [str(path)]
                    )
        finally:
            con.close()
        return expand(store, Subject(given=given, identifiers=list(given)))


# -- retention ----------------------------------------------------------------------------------


def retain_lake(
    lake: Lake, plan: Plan, *, now: datetime | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Apply the plan's retention to the lake's events, file by file, with retention's own
    measurement and statements; the summed report."""
    import kilde.pipeline  # noqa: F401 - kilde.privacy imports it back; load it first
    from kilde.privacy.retention import _apply, _measure

    now = now or datetime.now(UTC)
    action = plan.privacy.retention_action
    total: dict[str, Any] = {"action": action, "dry_run": dry_run, "at": now.isoformat()}
    events: dict[str, dict[str, Any]] = {}
    traits: dict[str, dict[str, Any]] = {}
    rewritten: list[str] = []
    sums = {"expired_events": 0, "expired_traits": 0, "kept_without_retention": 0}
    with lake.maintenance(), scratch_store() as store:
        con = store.cursor()
        try:
            for path in lake.files(EVENTS):
                _load(con, "events", path)
                if dry_run:
                    report = _measure(store.scalar, plan, now)
                else:
                    report = _apply(store, plan, now, action)
                for key in sums:
                    sums[key] += int(report[key])
                for row in report["events"]:
                    seen = events.setdefault(row["event"], {**row, "expired": 0})
                    seen["expired"] += row["expired"]
                for row in report["traits"]:
                    seen = traits.setdefault(row["trait"], {**row, "events": 0, "profiles": 0})
                    seen["events"] += row["events"]
                if not dry_run and (report["expired_events"] or report["expired_traits"]):
                    _replace(con, "events", path, SCHEMAS[EVENTS])
                    rewritten.append(str(path.relative_to(lake.root)))
        finally:
            con.close()
    total.update(sums)
    total["events"] = [{**e, "cutoff": e["cutoff"].isoformat()} for e in events.values()]
    total["traits"] = [{**t, "cutoff": t["cutoff"].isoformat()} for t in traits.values()]
    total["files_rewritten"] = rewritten
    return total
