"""The acknowledgement log: events on disk before they are in the DuckDB file.

A DuckDB commit costs the writer about 20 ms of wall time whatever its size, most of it spent
winning the GIL back from the busy event loop each time DuckDB hands control to Python. So
the writer (kilde.store.writer) makes a group of plain events durable by appending it to this
log and syncing it, answers the requests, and hands the group to its applier thread, which
inserts whatever has piled up meanwhile into DuckDB in one larger commit.

A record is one group: a header (CRC-32 of the payload, the group's write_seq, the payload's
length) and the group's rows as JSON lines, one object a row (`encode`). orjson writes them
two to three times faster than Arrow builds a table of the rows, and the writer's time is
what the answers wait for. The applier reads them with Arrow's JSON reader, which runs
without Python's GIL; building the table from the Python rows held it, in the same process
as collection, for about a fifth of the time the GIL was busy (bench/ingest.py, py-spy
--gil). Records go into segment files; a segment is deleted once every group in it is in
DuckDB. The applier inserts groups in write_seq order, and the writer empties the log before
anything deletes or changes stored events (erasure, retention), so on start `replay` finds the
groups still to be inserted as those above the largest write_seq in the events table.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy
import orjson
import pyarrow as pa
import pyarrow.json as pa_json

from kilde.store.schema import EVENT_SCHEMA

log = logging.getLogger("kilde.store")

# Timestamps are written by orjson as ISO 8601 text and parsed back by Arrow; columns the
# schema does not know are not the log's (rows carry only events columns).
_PARSE = pa_json.ParseOptions(explicit_schema=EVENT_SCHEMA, unexpected_field_behavior="ignore")

LOG_DIR = "ack-log"
SUFFIX = ".log"
HEADER = struct.Struct("<IqQ")  # crc32 of the payload, write_seq, payload bytes
# A segment is closed at this size, so applied groups leave the disk while load goes on.
SEGMENT_BYTES = 64 * 1024 * 1024


def log_dir(data_dir: Path) -> Path:
    return data_dir / LOG_DIR


@dataclass
class _Segment:
    path: Path
    last_seq: int


class AckLog:
    """Appends groups durably; only the writer thread calls it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._current: _Segment | None = None
        self._size = 0
        self._closed: list[_Segment] = []  # full segments, oldest first

    def append(self, seq: int, payload: bytes) -> None:
        """Write group `seq` (its rows as `encode` made them) and sync it; then it survives a
        crash."""
        header = HEADER.pack(zlib.crc32(payload), seq, len(payload))
        if self._fd is None or self._size >= SEGMENT_BYTES:
            self._open(seq)
        assert self._fd is not None and self._current is not None
        written = os.writev(self._fd, [header, payload])
        if written != HEADER.size + len(payload):  # a full disk; the caller fails the group
            raise OSError(f"the log took {written} of {HEADER.size + len(payload)} bytes")
        os.fdatasync(self._fd)
        self._size += written
        self._current.last_seq = seq

    def _open(self, seq: int) -> None:
        self._close_current()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{seq:020d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._current = _Segment(path, seq)
        self._size = os.fstat(self._fd).st_size
        sync_directory(self.directory)  # so the new file's name survives a crash too

    def _close_current(self) -> None:
        if self._fd is not None and self._current is not None:
            os.close(self._fd)
            self._closed.append(self._current)
        self._fd = None
        self._current = None

    def forget_through(self, seq: int) -> None:
        """Delete the full segments whose groups are all in DuckDB (up to write_seq `seq`)."""
        while self._closed and self._closed[0].last_seq <= seq:
            self._closed.pop(0).path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every segment: the caller has seen every group inserted."""
        self._close_current()
        for segment in self._closed:
            segment.path.unlink(missing_ok=True)
        self._closed = []

    def close(self) -> None:
        self._close_current()


def replay(con: duckdb.DuckDBPyConnection, directory: Path) -> int:
    """Insert the logged groups DuckDB does not hold yet; delete the log; return rows inserted.

    A record cut short or damaged can only be the last one written before a crash, whose
    requests were never answered: reading stops there."""
    segments = sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []
    if not segments:
        return 0
    row = con.execute("SELECT coalesce(max(write_seq), 0) FROM events").fetchone()
    stored_up_to = int(row[0]) if row else 0
    groups: list[tuple[int, bytes]] = []
    for path in segments:
        groups.extend(_read_segment(path, stored_up_to))
    inserted = 0
    if groups:
        logged = group_table(groups)
        con.execute("INSERT INTO events BY NAME SELECT * FROM logged")
        inserted = logged.num_rows
        log.warning("inserted %d acknowledged events from the acknowledgement log", inserted)
    for path in segments:
        path.unlink()
    sync_directory(directory)
    return inserted


def _read_segment(path: Path, stored_up_to: int) -> list[tuple[int, bytes]]:
    """The groups of a segment above write_seq `stored_up_to`, as (write_seq, payload)."""
    data = path.read_bytes()
    groups = []
    offset = 0
    while offset + HEADER.size <= len(data):
        crc, seq, size = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size : offset + HEADER.size + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            log.warning("the acknowledgement log %s ends in a record cut short", path.name)
            break
        if seq > stored_up_to:
            if payload.startswith(b"["):  # a JSON array, as Kilde wrote groups before
                payload = encode(orjson.loads(payload))
            groups.append((seq, payload))
        offset += HEADER.size + size
    return groups


def encode(rows: list[dict[str, Any]]) -> bytes:
    """Events rows as a log payload: JSON lines (orjson escapes line breaks inside strings)."""
    return b"\n".join([orjson.dumps(row) for row in rows])


def rows_in(payload: bytes) -> int:
    """Rows in a payload made by `encode`."""
    return payload.count(b"\n") + 1


def group_table(groups: list[tuple[int, bytes]]) -> pa.Table:
    """Events rows of several groups (write_seq, payload) as one table, each row with its
    group's write_seq."""
    table = pa_json.read_json(pa.py_buffer(b"\n".join(p for _, p in groups)), parse_options=_PARSE)
    seqs = numpy.repeat([seq for seq, _ in groups], [rows_in(p) for _, p in groups])
    return table.append_column("write_seq", pa.array(seqs, pa.int64()))


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that names created or removed in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
