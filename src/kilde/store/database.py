"""Opening the DuckDB file, migrating it, and reading from it."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

from kilde.config import (
    duckdb_analytics_memory_limit,
    duckdb_checkpoint_threshold,
    duckdb_memory_limit,
    duckdb_threads,
    size_bytes,
)
from kilde.errors import KildeError
from kilde.store.ack_log import log_dir, replay
from kilde.store.migrations import MIGRATIONS

DB_FILE = "kilde.duckdb"


class StoreLockedError(KildeError):
    """Another process (usually a running `kilde serve`) holds the store."""


class Store:
    """The DuckDB file. One process writes; reads use their own cursor per call."""

    def __init__(self, data_dir: Path, memory_limit: str | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        # Bounded, so the server's memory stays flat however much it imports (config.py).
        self.memory_limit = memory_limit or duckdb_memory_limit()
        self.analytics_memory_limit = duckdb_analytics_memory_limit()
        self._analytics_running = 0
        self._memory_lock = threading.Lock()
        try:
            self._con = self._connect()
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreLockedError(
                    f"the store {self.path} is in use by another process",
                    fix="stop that process, or run this command while `kilde serve` runs so it "
                    "goes through the server",
                ) from None
            raise
        self._lock = threading.Lock()
        # Set by the Writer while it runs: waits until acknowledged events are in the file.
        self.read_barrier: Callable[[], None] | None = None
        self.migrate()
        # Events a crash left in the acknowledgement log (kilde.store.ack_log) go in now.
        replay(self._con, log_dir(data_dir))

    def _connect(self) -> duckdb.DuckDBPyConnection:
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": self.memory_limit,
            "checkpoint_threshold": duckdb_checkpoint_threshold(),
        }
        threads = duckdb_threads()
        if threads is not None:
            config["threads"] = threads
        return duckdb.connect(str(self.path), config=config)

    @contextlib.contextmanager
    def analytics_memory(self) -> Iterator[None]:
        """DuckDB's memory limit is the analytics one while this runs (and any other at the
        same time), then the usual one again. Raising it cannot fail anything; lowering it
        evicts cached blocks, and when it cannot (a query still holds them) the higher limit
        stays until the next heavy job ends."""
        with self._memory_lock:
            self._analytics_running += 1
            if self._analytics_running == 1:
                self._set_memory_limit(self._larger_limit())
        try:
            yield
        finally:
            with self._memory_lock:
                self._analytics_running -= 1
                if self._analytics_running == 0:
                    self._set_memory_limit(self.memory_limit)

    def _larger_limit(self) -> str:
        """The analytics limit, unless the usual one is larger (a big machine's setting)."""
        usual, analytics = size_bytes(self.memory_limit), size_bytes(self.analytics_memory_limit)
        if usual is not None and analytics is not None and usual > analytics:
            return self.memory_limit
        return self.analytics_memory_limit

    def _set_memory_limit(self, limit: str) -> None:
        with self._lock:  # not `cursor()`: a setting need not wait for the applier
            cur = self._con.cursor()
        try:
            cur.execute(f"SET memory_limit = '{limit}'")
        except duckdb.Error:
            pass  # cached blocks still in use: the higher limit stays for now
        finally:
            cur.close()

    def migrate(self) -> list[int]:
        """Apply migrations not yet applied; return the versions applied now."""
        con = self._con
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMPTZ DEFAULT now())"
        )
        done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
        applied = []
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            con.execute("BEGIN")
            con.execute(sql)
            con.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name]
            )
            con.execute("COMMIT")
            applied.append(version)
        return applied

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection for one thread; DuckDB connections are not shared across threads."""
        barrier = self.read_barrier
        if barrier is not None:
            barrier()
        with self._lock:
            return self._con.cursor()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        for attempt in (1, 2):
            cur = self.cursor()
            try:
                result = cur.execute(sql, list(params or []))
                names = [d[0] for d in result.description or []]
                return [dict(zip(names, row, strict=True)) for row in result.fetchall()]
            except duckdb.ConnectionException:
                if attempt == 2:
                    raise
                # The file was swapped between two calls on this cursor (`replace_file`): the
                # cursor was closed with the old file; ask the new one.
            finally:
                cur.close()
        raise AssertionError("unreachable")

    def scalar(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def replace_file(self, fresh: Path) -> None:
        """Swap the database file for `fresh`, a copy made with COPY FROM DATABASE.

        Used after an erasure, so deleted values are gone from the file itself. The caller makes
        sure nothing writes meanwhile (Writer.exclusive). Cursors handed out before are closed;
        reads in progress finish first. The old file's write-ahead log, already contained in the
        copy, is removed with it.
        """
        with self._lock:
            while True:
                try:
                    self._con.close()
                    break
                except duckdb.ResourceInUseException:  # a read is running: let it finish
                    time.sleep(0.005)
            wal = self.path.with_name(self.path.name + ".wal")
            wal.unlink(missing_ok=True)
            os.replace(fresh, self.path)
            self._con = self._connect()

    def close(self) -> None:
        self._con.close()
