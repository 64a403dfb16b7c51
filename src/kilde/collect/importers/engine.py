"""The import run: read a file in batches, convert rows to records, send them in chunks.

The engine does not write to the store. It hands each chunk to a `Sink`: over the admin API
(the CLI, whether or not `kilde serve` runs) or in the server process (dashboard uploads);
either way the chunk ends in `Pipeline.ingest`. While one chunk is being stored the next one is
read and converted, and memory stays flat whatever the size of the file.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kilde.collect.importers.base import (
    Converted,
    ImportFailed,
    Kind,
    Reader,
    Record,
    Row,
    RowError,
    Tier,
)
from kilde.collect.importers.broker import broker_provenance
from kilde.collect.importers.contacts import ContactConverter
from kilde.collect.importers.convert import Context
from kilde.collect.importers.interactions import InteractionConverter
from kilde.collect.importers.mapping import MappingFile, Resolved, resolve
from kilde.collect.importers.readers import open_reader
from kilde.collect.importers.social_login import SocialLoginConverter
from kilde.collect.importers.transactions import TransactionConverter
from kilde.config import positive_whole_number
from kilde.plan.models import Plan

CHUNK_ROWS = 5000
# KILDE_IMPORT_COLUMNAR=0 turns the columnar path of order imports off (columnar.py).
COLUMNAR = os.environ.get("KILDE_IMPORT_COLUMNAR", "1") != "0"
MAX_CHUNK_RECORDS = 10_000
# The columnar path sends clean blocks in groups of this many records: one of DuckDB's row
# groups (122,880 rows), which DuckDB writes straight to the store file, whole. A group that
# ends early (rows for the row path) holds at most SEND_MAX_ROWS when it can (below the
# writer's queue bound of 200,000 rows). KILDE_IMPORT_SEND_ROWS: small groups in tests.
ROW_GROUP = 122_880
SEND_ROWS = (
    positive_whole_number(
        "KILDE_IMPORT_SEND_ROWS", str(ROW_GROUP), logging.getLogger("kilde.import")
    )
    or ROW_GROUP
)
SEND_MAX_ROWS = max(SEND_ROWS, 180_000)
REJECT_COLUMNS = ["line", "end_line", "column", "error", "reason", "fix"]


class Converter(Protocol):
    def feed(self, rows: list[Row]) -> Converted: ...

    def finish(self) -> Converted: ...


@dataclass
class ChunkResult:
    stored: int = 0
    duplicates: int = 0
    flagged: int = 0  # of the stored ones, how many the plan flagged (warn mode)
    suppressed: int = 0  # people on the suppression list: nothing of them is kept
    withheld: int = 0  # no lawful basis (the consent gate): not stored
    # Records the pipeline rejected: {"index", "error", "message", "path", "fix"}
    rejected: list[dict[str, Any]] = field(default_factory=list)
    preview: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunInfo:
    kind: Kind
    source: str
    file_name: str
    file_format: str
    file_bytes: int
    tier: Tier
    provenance: dict[str, Any]
    dry_run: bool


class Sink(Protocol):
    """Where chunks go: the admin API, or the server itself."""

    def start(self, info: RunInfo) -> str | None: ...

    def send(
        self, records: list[dict[str, Any]], rejects: list[dict[str, Any]], preview: int
    ) -> ChunkResult: ...

    def finish(self, run_id: str | None, summary: dict[str, Any]) -> None: ...


@dataclass
class Summary:
    kind: str
    source: str
    file: str
    run_id: str | None = None
    dry_run: bool = False
    rows_read: int = 0
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    flagged: int = 0
    suppressed: int = 0
    withheld: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    first_errors: list[dict[str, Any]] = field(default_factory=list)
    preview: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    mapping: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    reject_file: str | None = None
    seconds: float = 0.0
    # How the file was read: "row by row", "columnar", or columnar up to a line (columnar.py).
    read: str = "row by row"

    @property
    def imported(self) -> int:
        """Records handled without an error: stored now or before, or kept out by privacy."""
        return self.stored + self.duplicates + self.suppressed + self.withheld

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "file": self.file,
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "rows_read": self.rows_read,
            "records": self.records,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "flagged": self.flagged,
            "suppressed": self.suppressed,
            "withheld": self.withheld,
            "rejected": self.rejected,
            "reasons": dict(self.reasons.most_common()),
            "first_errors": self.first_errors,
            "details": self.details,
            "mapping": self.mapping,
            "ignored_columns": self.ignored_columns,
            "reject_file": self.reject_file,
            "seconds": round(self.seconds, 3),
            "read": self.read,
        }


Progress = Callable[[int, int | None, int], None]  # position, total, rows read


def describe_mapping(resolved: Resolved) -> dict[str, str]:
    shown = {}
    for name, column in resolved.fields.items():
        shown[name] = column + (" (detected)" if name in resolved.detected else "")
    for name, column in resolved.traits.items():
        shown[f"traits.{name}"] = column + (
            " (detected)" if f"traits.{name}" in resolved.detected else ""
        )
    for name, column in resolved.properties.items():
        shown[f"properties.{name}"] = column
    return shown


def make_converter(ctx: Context) -> Converter:
    if ctx.kind == "transactions":
        return TransactionConverter(ctx)
    if ctx.kind in ("contacts", "broker"):
        return ContactConverter(ctx)
    if ctx.kind == "interactions":
        return InteractionConverter(ctx)
    return SocialLoginConverter(ctx)


class RejectFile:
    """The CSV of rejected rows: line, column, error, reason, fix (never the values)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._handle: Any = None
        self._writer: Any = None

    def write(self, error: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._writer is None:
            self._handle = self.path.open("w", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._handle, REJECT_COLUMNS, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(error)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def run_import(
    path: Path,
    *,
    kind: Kind,
    source: str,
    plan: Plan,
    mapping: MappingFile,
    sink: Sink,
    file_format: str | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    display_name: str | None = None,
    dry_run: bool = False,
    preview_rows: int = 5,
    reject_path: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
    on_start: Callable[[Reader], None] | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Import one file; see the module docstring. Raises ImportFailed for file-level problems."""
    started = time.perf_counter()
    plan_source = plan.source(source)
    if plan_source is None:
        raise ImportFailed(
            f"the plan has no source named {source!r}",
            fix="use one of: " + ", ".join(s.name for s in plan.sources),
        )
    if mapping.kind is not None and mapping.kind != kind:
        raise ImportFailed(
            f"the mapping is for {mapping.kind} files, not {kind}",
            fix="use the mapping made for this kind of file",
        )
    tier: Tier = "broker" if kind == "broker" else "first_party"
    provenance: dict[str, Any] = {}
    if kind == "broker":
        provenance = broker_provenance(mapping.broker, plan, plan_source)
    elif plan_source.kind == "broker":
        raise ImportFailed(
            f"source {source!r} is a broker source; only bought data goes there",
            fix="import it with `kilde import broker ...`, or choose a first-party source",
        )
    name = display_name or path.name
    reader = open_reader(
        path,
        format=file_format or mapping.format,
        encoding=encoding or mapping.encoding,
        delimiter=delimiter or mapping.delimiter,
        sheet=mapping.sheet,
    )
    rejects = RejectFile(reject_path)
    summary = Summary(kind, source, name, dry_run=dry_run, details=dict(reader.details))
    try:
        resolved = resolve(kind, reader.columns, mapping, plan)
        summary.mapping = describe_mapping(resolved)
        summary.ignored_columns = resolved.ignored
        ctx = Context(kind, source, plan, mapping, resolved, name, tier=tier, provenance=provenance)
        converter = make_converter(ctx)
        if on_start is not None:
            on_start(reader)
        run_id = sink.start(
            RunInfo(
                kind,
                source,
                name,
                reader.format,
                path.stat().st_size,
                tier,
                provenance,
                dry_run,
            )
        )
        ctx.run_id = run_id
        summary.run_id = run_id
        offset = None
        if (
            not dry_run
            and COLUMNAR
            and isinstance(converter, TransactionConverter)
            and hasattr(sink, "send_columns")
        ):
            from kilde.collect.importers.columnar import eligible

            offset = eligible(ctx, reader, path)
        if offset is not None and isinstance(converter, TransactionConverter):
            _pump_columnar(
                path,
                offset,
                reader,
                converter,
                ctx,
                sink,
                summary,
                rejects,
                resolved,
                chunk_rows,
                progress,
            )
        else:
            _pump(
                reader,
                converter,
                sink,
                summary,
                rejects,
                resolved,
                chunk_rows,
                preview_rows,
                progress,
            )
    except BaseException:
        rejects.close()
        reader.close()
        raise
    rejects.close()
    reader.close()
    summary.seconds = time.perf_counter() - started
    if rejects.path is not None and summary.rejected:
        summary.reject_file = str(rejects.path)
    status = "failed" if summary.rows_read and not summary.imported else "done"
    if not dry_run:
        sink.finish(run_id, {**summary.as_dict(), "status": status})
    return summary


@dataclass
class _Pending:
    records: list[Record]
    errors: list[RowError]
    future: Future[ChunkResult]


def _pump(
    reader: Reader,
    converter: Converter,
    sink: Sink,
    summary: Summary,
    rejects: RejectFile,
    resolved: Resolved,
    chunk_rows: int,
    preview_rows: int,
    progress: Progress | None,
) -> None:
    in_flight: list[_Pending] = []
    wanted_preview = preview_rows

    def settle(item: _Pending) -> None:
        result = item.future.result()
        summary.stored += result.stored
        summary.duplicates += result.duplicates
        summary.flagged += result.flagged
        summary.suppressed += result.suppressed
        summary.withheld += result.withheld
        summary.preview.extend(result.preview)
        errors = [e.as_dict() for e in item.errors]
        errors += [_rejected(r, item.records[r["index"]].line) for r in result.rejected]
        _report(errors, summary, rejects)

    def submit(converted: Converted, rows: dict[int, Row]) -> None:
        nonlocal wanted_preview
        records = converted.records
        reject_rows = []
        for error in converted.errors:
            row = rows.get(error.line)
            payload = {
                "import": summary.kind,
                "file": summary.file,
                "line": error.line,
                "row": row.values if row is not None else None,
            }
            reject_rows.append({**error.as_dict(), "payload": payload})
        summary.records += len(records)
        preview, wanted_preview = wanted_preview, 0
        messages = [r.message for r in records]
        with_errors = [{**e, "payload": _jsonable(e["payload"])} for e in reject_rows]
        future = executor.submit(sink.send, messages, with_errors, preview)
        in_flight.append(_Pending(records, converted.errors, future))
        while len(in_flight) > 1:
            settle(in_flight.pop(0))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kilde-import") as executor:
        try:
            previous: list[Row] = []
            for batch in reader.batches(chunk_rows):
                summary.rows_read += len(batch.rows) + len(batch.errors)
                converted = converter.feed(batch.rows)
                converted.errors = batch.errors + converted.errors
                if converted.records or converted.errors:
                    # An order may span two batches, so rows of the one before count too.
                    submit(converted, _by_line(previous, batch.rows, converted.errors))
                previous = batch.rows
                if progress is not None:
                    progress(batch.position, reader.total, summary.rows_read)
            last = converter.finish()
            if last.records or last.errors:
                submit(last, _by_line(previous, [], last.errors))
            while in_flight:
                settle(in_flight.pop(0))
        finally:
            for item in in_flight:
                item.future.cancel()


def _pump_columnar(
    path: Path,
    offset: int,
    reader: Reader,
    converter: TransactionConverter,
    ctx: Context,
    sink: Sink,
    summary: Summary,
    rejects: RejectFile,
    resolved: Resolved,
    chunk_rows: int,
    progress: Progress | None,
) -> None:
    """Clean blocks of the file as Arrow columns; the rest of the file, if any, by `_pump`."""
    from kilde.collect.importers.columnar import (
        BlockResult,
        ColumnarOrders,
        clean,
        parse,
        read_block,
    )
    from kilde.collect.importers.csv_files import CsvReader

    assert isinstance(reader, CsvReader)
    orders = ColumnarOrders(ctx, converter, reader.columns)
    send_columns = getattr(sink, "send_columns")  # noqa: B009 - checked by the caller
    info = {
        "source": ctx.source,
        "kind": ctx.kind,
        "tier": ctx.tier,
        "file": ctx.file_name,
        "run_id": ctx.run_id,
        "provenance": ctx.provenance,
    }
    in_flight: list[tuple[Future[tuple[ChunkResult, ChunkResult]], BlockResult]] = []

    def send(
        result: BlockResult, reject_rows: list[dict[str, Any]]
    ) -> tuple[ChunkResult, ChunkResult]:
        columns = ChunkResult()
        if result.columns.num_rows:
            columns = send_columns(result.columns, info)
        rows = ChunkResult()
        if result.records or reject_rows:
            rows = sink.send(result.records, reject_rows, 0)
        return columns, rows

    def settle(item: tuple[Future[tuple[ChunkResult, ChunkResult]], BlockResult]) -> None:
        future, block_result = item
        answers = future.result()
        errors = [e.as_dict() for e in block_result.errors]
        line_lists: tuple[list[int], list[int]] = (
            block_result.columns.column("line").to_pylist()
            if any(a.rejected for a in answers[:1])
            else [],
            block_result.record_lines,
        )
        for answer, lines in zip(answers, line_lists, strict=True):
            summary.stored += answer.stored
            summary.duplicates += answer.duplicates
            summary.flagged += answer.flagged
            summary.suppressed += answer.suppressed
            summary.withheld += answer.withheld
            errors += [_rejected(r, lines[r["index"]]) for r in answer.rejected]
        _report(errors, summary, rejects)

    # Clean blocks are sent together until a group holds SEND_ROWS records: the server writes
    # one group in one transaction, and DuckDB writes a transaction of more than a row group
    # straight to the store file, compressed, instead of through its write-ahead log and a
    # checkpoint later (see docs/imports-performance.md).
    pending: list[tuple[BlockResult, list[dict[str, Any]]]] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        group = pending[0] if len(pending) == 1 else _merge_blocks(pending)
        pending, pending_rows = [], 0
        # Settling needs only the records' lines; the rest of the columns go once sent.
        sent = dataclasses.replace(group[0], columns=group[0].columns.select(["line"]))
        in_flight.append((executor.submit(send, *group), sent))
        del group
        while len(in_flight) > 1:
            settle(in_flight.pop(0))

    rest: int | None = None
    summary.read = "columnar"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kilde-import") as executor:
        line = 2
        first = True
        handle = path.open("rb")
        try:
            while True:
                block = read_block(handle, offset, line)
                if block is None:
                    break
                table = parse(block, reader.columns, reader.delimiter) if clean(block) else None
                result = orders.convert(block, table) if table is not None else None
                if result is None:
                    rest = block.start_line
                    reader.resume(block.offset, block.start_line)
                    break
                offset, line = block.offset + result.size, block.start_line + result.rows
                summary.rows_read += result.rows
                summary.records += result.columns.num_rows + len(result.records)
                reject_rows = [
                    {
                        **error.as_dict(),
                        "payload": _jsonable(
                            {
                                "import": summary.kind,
                                "file": summary.file,
                                "line": error.line,
                                "row": result.special_rows[error.line].values
                                if error.line in result.special_rows
                                else None,
                            }
                        ),
                    }
                    for error in result.errors
                ]
                if pending and pending_rows + result.columns.num_rows > SEND_MAX_ROWS:
                    flush()
                pending.append((result, reject_rows))
                pending_rows += result.columns.num_rows
                # Records of the row path (or rejects) end a group, so that everything still
                # reaches the server in the order it did block by block.
                if result.records or reject_rows or first:
                    flush()
                # The first block goes alone, so the server starts while the next are read.
                first = False
                # A group of clean blocks is cut at exactly SEND_ROWS records (the rest of the
                # last block starts the next group): whole row groups for DuckDB.
                while pending_rows >= SEND_ROWS:
                    last = pending[-1][0]
                    cut = last.columns.num_rows - (pending_rows - SEND_ROWS)
                    rest_of_block = dataclasses.replace(last, columns=last.columns.slice(cut))
                    pending[-1] = (BlockResult(columns=last.columns.slice(0, cut)), [])
                    flush()
                    if rest_of_block.columns.num_rows:
                        pending.append((rest_of_block, []))
                        pending_rows = rest_of_block.columns.num_rows
                if progress is not None:
                    progress(offset, reader.total, summary.rows_read)
            flush()
            while in_flight:
                settle(in_flight.pop(0))
        finally:
            handle.close()
            for item in in_flight:
                item[0].cancel()
    if rest is not None:
        summary.read = (
            f"columnar up to line {rest - 1}, then row by row" if rest > 2 else "row by row"
        )
        _pump(reader, converter, sink, summary, rejects, resolved, chunk_rows, 0, progress)


def _merge_blocks(
    parts: list[tuple[Any, list[dict[str, Any]]]],
) -> tuple[Any, list[dict[str, Any]]]:
    """Converted blocks (columnar.BlockResult) and their reject rows as one group to send."""
    import pyarrow as pa

    from kilde.collect.importers.columnar import BlockResult

    merged = BlockResult(columns=pa.concat_tables([part.columns for part, _ in parts]))
    reject_rows: list[dict[str, Any]] = []
    for part, rows in parts:
        merged.records += part.records
        merged.record_lines += part.record_lines
        merged.errors += part.errors
        merged.special_rows.update(part.special_rows)
        merged.rows += part.rows
        merged.size += part.size
        reject_rows += rows
    return merged, reject_rows


def _rejected(rejection: dict[str, Any], line: int) -> dict[str, Any]:
    """A record the server refused, as a line of the reject report."""
    path = rejection.get("path")
    return {
        "line": line,
        "end_line": None,
        "column": f"({path})" if path else None,
        "error": rejection.get("error"),
        "reason": rejection.get("message"),
        "fix": rejection.get("fix"),
    }


def _report(errors: list[dict[str, Any]], summary: Summary, rejects: RejectFile) -> None:
    """Count a chunk's errors in the summary and write them to the reject file, in line order."""
    errors.sort(key=lambda e: e["line"])
    for error in errors:
        summary.rejected += 1
        summary.reasons[str(error["error"])] += 1
        if len(summary.first_errors) < 20:
            summary.first_errors.append(error)
        rejects.write(error)


def _by_line(previous: list[Row], current: list[Row], errors: list[RowError]) -> dict[int, Row]:
    if not errors:
        return {}
    return {row.line: row for rows in (previous, current) for row in rows}


def _jsonable(value: Any) -> Any:
    """Row values as JSON can carry them (dates and decimals from Parquet and Excel)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
