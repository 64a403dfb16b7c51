"""The acknowledgement log: events on disk before they are in the DuckDB file.

A DuckDB commit costs the writer about 20 ms of wall time whatever its size, most of it spent
winning the GIL back from the busy event loop each time DuckDB hands control to Python. So
the writer (kilde.store.writer) makes a group of plain events durable by appending it to this
log and syncing it, answers the requests, and hands the group to its applier thread, which
inserts whatever has piled up meanwhile into DuckDB in one larger commit.

A record is one group: a header (CRC-32 of the payload, the group's write_seq, the payload's
length) and the group's rows as an Arrow IPC stream, with their write_seq column. Records go
into segment files; a segment is deleted once every group in it is in DuckDB. The applier
inserts groups in write_seq order, and the writer empties the log before anything deletes or
changes stored events (erasure, retention), so on start `replay` finds the groups still to be
inserted as those above the largest write_seq in the events table.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

log = logging.getLogger("kilde.store")

LOG_DIR = "ack-log"
SUFFIX = ".arrows"
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

    def append(self, seq: int, table: pa.Table) -> None:
        """Write `table` (rows of group `seq`) and sync it; on return it survives a crash."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table)
        payload = sink.getvalue()
        header = HEADER.pack(zlib.crc32(payload), seq, payload.size)
        if self._fd is None or self._size >= SEGMENT_BYTES:
            self._open(seq)
        assert self._fd is not None and self._current is not None
        written = os.writev(self._fd, [header, payload])
        if written != HEADER.size + payload.size:  # a full disk; the caller fails the group
            raise OSError(f"the log took {written} of {HEADER.size + payload.size} bytes")
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
        _sync_directory(self.directory)  # so the new file's name survives a crash too

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
        self.forget_through(self._closed[-1].last_seq if self._closed else 0)

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
    tables: list[pa.Table] = []
    for path in segments:
        tables.extend(_read_segment(path, stored_up_to))
    inserted = 0
    if tables:
        logged = pa.concat_tables(tables, promote_options="default")  # noqa: F841 - read by DuckDB below
        con.execute("INSERT INTO events BY NAME SELECT * FROM logged")
        inserted = sum(table.num_rows for table in tables)
        log.warning("inserted %d acknowledged events from the acknowledgement log", inserted)
    for path in segments:
        path.unlink()
    _sync_directory(directory)
    return inserted


def _read_segment(path: Path, stored_up_to: int) -> list[pa.Table]:
    data = path.read_bytes()
    tables = []
    offset = 0
    while offset + HEADER.size <= len(data):
        crc, seq, size = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size : offset + HEADER.size + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            log.warning("the acknowledgement log %s ends in a record cut short", path.name)
            break
        if seq > stored_up_to:
            tables.append(pa.ipc.open_stream(payload).read_all())
        offset += HEADER.size + size
    return tables


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
