"""Running the identity and profile compute: Ibis expressions, compiled once, run many times.

The compute is defined as Ibis expressions over named tables (the store's tables and named
intermediate results), so the same definitions run on DuckDB and on other Ibis engines. Compiling
an Ibis expression costs tens of milliseconds, which would dominate a freshness budget of one
second; the runner compiles each stage once per process (the SQL of a stage depends only on
the stage and the plan's rules, never on data) and re-runs it on every tick.

Intermediate results are temporary tables of the runner's own connection: they are not part of
the store and never touch the Writer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import duckdb
import ibis

# ibis.backends.duckdb and sqlglot.dialects.duckdb are loaded now, on import, in the server's
# main thread before any other thread starts. ibis and sqlglot load them on first use, and
# sqlglot's dialect loader holds a lock of its own around Python's import locks: the identity
# engine's first tick and a request's first Ibis query loading them at once deadlocked a server
# in the test suite.
import ibis.backends.duckdb
import ibis.expr.schema as sch
import ibis.expr.types as ir
import pyarrow as pa
import sqlglot.dialects.duckdb  # noqa: F401
from ibis.backends.sql.datatypes import DuckDBType

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz_0123456789")


def _check_name(name: str) -> str:
    if not name or not set(name) <= _NAME_OK:
        raise ValueError("internal table names are lower-case letters, digits and _")
    return name


def _check_path(path: str) -> str:
    """Scratch paths the engine made itself; a quote would end the SQL string."""
    if "'" in path:
        raise ValueError("scratch paths may not contain quotes")
    return path


class Runner:
    """Compile-once execution of named Ibis stages on a DuckDB connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._sql: dict[str, str] = {}
        self.schemas: dict[str, sch.Schema] = {}
        self._temps: set[str] = set()
        self._lock = threading.Lock()

    # -- tables -------------------------------------------------------------------------------

    def source(self, name: str) -> ir.Table:
        """A table of the store, as an unbound Ibis table."""
        if name not in self.schemas:
            rows = self.con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = ? AND table_schema = 'main' ORDER BY ordinal_position",
                [_check_name(name)],
            ).fetchall()
            self.schemas[name] = sch.Schema(
                {col: DuckDBType.from_string(kind) for col, kind in rows}
            )
        return ibis.table(self.schemas[name], name=name)

    def temp(self, name: str) -> ir.Table:
        """An intermediate result made earlier by `make` or `put`."""
        return ibis.table(self.schemas[name], name=name)

    def put(self, name: str, data: pa.Table) -> ir.Table:
        """Make an intermediate table from Arrow data (scope lists, greedy assignments)."""
        _check_name(name)
        self.con.register("kilde_arrow_input", data)
        try:
            self.con.execute(
                f'CREATE OR REPLACE TEMP TABLE "{name}" AS SELECT * FROM kilde_arrow_input'
            )
        finally:
            self.con.unregister("kilde_arrow_input")
        self.schemas[name] = ibis.Schema.from_pyarrow(data.schema)
        self._temps.add(name)
        return self.temp(name)

    # -- stages -------------------------------------------------------------------------------

    def sql(self, key: str, build: Callable[[], ir.Expr]) -> tuple[str, Any]:
        cached = self._sql.get(key)
        schema = self.schemas.get("=" + key)
        if cached is None:
            expr = build()
            cached = str(ibis.to_sql(expr, dialect="duckdb"))
            self._sql[key] = cached
            if isinstance(expr, ir.Table):
                schema = expr.schema()
                self.schemas["=" + key] = schema
        return cached, schema

    def make(self, name: str, key: str, build: Callable[[], ir.Table]) -> ir.Table:
        """Materialise a stage as temporary table `name` and return it as an Ibis table."""
        sql, schema = self.sql(key, build)
        self.con.execute(f'CREATE OR REPLACE TEMP TABLE "{_check_name(name)}" AS {sql}')
        self.schemas[name] = schema
        self._temps.add(name)
        return self.temp(name)

    def arrow(self, key: str, build: Callable[[], ir.Expr]) -> pa.Table:
        sql, _ = self.sql(key, build)
        result: pa.Table = self.con.sql(sql).to_arrow_table()
        return result

    def parquet(self, key: str, build: Callable[[], ir.Expr], path: str) -> None:
        """Write a stage's result to a Parquet file (bulk hand-over to the Writer)."""
        sql, _ = self.sql(key, build)
        self.con.execute(f"COPY ({sql}) TO '{_check_path(path)}' (FORMAT parquet)")

    def drop(self, *names: str) -> None:
        """Drop intermediate tables no longer needed (frees their memory early)."""
        for name in names:
            self.con.execute(f'DROP TABLE IF EXISTS "{_check_name(name)}"')
            self._temps.discard(name)

    def scalar(self, key: str, build: Callable[[], ir.Expr]) -> Any:
        sql, _ = self.sql(key, build)
        row = self.con.execute(sql).fetchone()
        return row[0] if row else None

    def drop_temps(self) -> None:
        for name in sorted(self._temps):
            self.con.execute(f'DROP TABLE IF EXISTS "{name}"')
        self._temps.clear()

    def close(self) -> None:
        self.drop_temps()
        self.con.close()
