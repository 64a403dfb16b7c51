"""Compute backends: the embedded DuckDB store (default) or Apache Spark over a Parquet lake.

`--store duckdb:PATH` runs the compute (identity, profiles, insights, privacy) on the DuckDB
file of a data directory, as `kilde serve` does. `--store spark:MASTER` (`local[*]`, a
`spark://host:7077` standalone master, `yarn`, ...) runs the same Ibis expressions on Spark:
the events are the lake's Parquet files (kilde.store.lake) and the profile and identity state
lives in Parquet tables under the lake's `state/` directory that Spark reads and writes.

Both sides speak through the same small interface the compute is written against:

- an Ibis backend (`ibis.duckdb` / `ibis.pyspark`) whose table names are the store's table
  names, for the code that takes a backend (insights, segments);
- a `Runner` (kilde.identity.runner) that materialises named stages, for identity resolution
  and profiles. `SparkRunner` is the Spark one: each stage is compiled once to Spark SQL and
  materialised as a checkpointed temporary view, so iterative algorithms (connected components)
  do not grow an ever longer lineage.

Nothing here knows an algorithm; the algorithms know nothing of the engine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import ibis
import ibis.expr.datatypes as dt
import ibis.expr.schema as sch
import ibis.expr.types as ir
import pyarrow as pa
import pyarrow.parquet as pq

from kilde.errors import KildeError
from kilde.identity.runner import Runner, _check_name
from kilde.store.migrations import MIGRATIONS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class BackendError(KildeError):
    """A --store value that cannot be used."""


# -- choosing a backend -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSpec:
    """A parsed `--store` value."""

    kind: str  # "duckdb" or "spark"
    target: str  # a data directory (duckdb) or a Spark master URL (spark)

    @property
    def is_spark(self) -> bool:
        return self.kind == "spark"

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


def parse_store(value: str | None, default_data: Path | None = None) -> StoreSpec:
    """`duckdb:PATH` (a data directory), `spark:MASTER` (`local[*]`, `spark://h:7077`, ...)."""
    if not value:
        return StoreSpec("duckdb", str(default_data or Path("kilde-data")))
    kind, sep, target = value.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("duckdb", "spark"):
        raise BackendError(
            f"unknown store {value!r}",
            fix="use duckdb:PATH (a data directory) or spark:MASTER, e.g. spark:local[*]",
        )
    target = target.strip()
    if kind == "duckdb" and not target:
        target = str(default_data or Path("kilde-data"))
    if kind == "spark" and not target:
        raise BackendError(
            "spark: needs a master URL", fix="for one machine: --store 'spark:local[*]'"
        )
    return StoreSpec(kind, target)


# -- Spark ----------------------------------------------------------------------------------------

_SESSION_LOCK = threading.Lock()


def spark_session(
    master: str, *, app_name: str = "kilde", conf: dict[str, str] | None = None
) -> SparkSession:
    """A Spark session for Kilde's compute (UTC, Arrow transfers, no web UI by default).

    Python workers run this interpreter, so they import the same Kilde; on a cluster, Kilde
    must be installed on every worker (see docs/deployment.md).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:  # pragma: no cover - depends on the installation
        raise BackendError(
            "pyspark is not installed", fix="pip install 'pyspark>=4' (and Java 17 or newer)"
        ) from None
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise BackendError(
            "Spark needs Java, and none was found",
            fix="install a Java runtime (Debian: apt-get install default-jre-headless) or set "
            "JAVA_HOME",
        )
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = {
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Adaptive execution merges small shuffle partitions; a few per core suit local mode.
        "spark.sql.shuffle.partitions": "8" if master.startswith("local") else "200",
        "spark.sql.adaptive.enabled": "true",
        "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.sql.warehouse.dir": str(Path(os.environ.get("TMPDIR", "/tmp")) / "kilde-spark"),
    }
    settings.update(conf or {})
    with _SESSION_LOCK:
        builder = SparkSession.builder.master(master).appName(app_name)
        for key, value in settings.items():
            builder = builder.config(key, value)
        session = builder.getOrCreate()
    session.sparkContext.setLogLevel(os.environ.get("KILDE_SPARK_LOG_LEVEL", "ERROR"))
    return session


def _arrow_of(schema: sch.Schema) -> pa.Schema:
    return schema.to_pyarrow()


# JSON on Spark: Ibis's PySpark compiler reads JSON with get_json_object and parses the result
# in Python UDFs, which fails on string values (get_json_object drops their quotes) and costs
# a Python round trip per row. Spark 4's VARIANT keeps the JSON types, so the same reading as
# DuckDB's (a number is a number, a string a string, anything else NULL) runs in the JVM.
_JSON_SQL = {
    "get": "to_json(try_variant_get(try_parse_json({arg}), {path}))",
    "str": "CASE WHEN startswith({arg}, '\"') THEN "
    "try_variant_get(try_parse_json({arg}), '$', 'string') END",
    "int": "CASE WHEN {arg} RLIKE '^-?[0-9]+$' THEN try_cast({arg} AS BIGINT) END",
    "float": "CASE WHEN {arg} RLIKE '^-?[0-9]' THEN try_cast({arg} AS DOUBLE) END",
    "bool": "CASE WHEN {arg} IN ('true', 'false') THEN {arg} = 'true' END",
    "map": "transform_values(try_variant_get(try_parse_json({arg}), '$', "
    "'map<string,variant>'), (k, v) -> to_json(v))",
    "array": "transform(try_variant_get(try_parse_json({arg}), '$', 'array<variant>'), "
    "x -> to_json(x))",
    # Python's string.whitespace, as Ibis strips on DuckDB. Ibis writes it as a literal with
    # \\v and \\f, which Spark reads as the letters v and f (and strips them off ids).
    "strip": "trim({side} concat(' ', chr(9), chr(10), chr(13), chr(11), chr(12)) FROM {arg})",
}


def _spark_compiler() -> Any:
    import sqlglot as sg
    import sqlglot.expressions as sge
    from ibis.backends.sql.compilers.pyspark import PySparkCompiler
    from ibis.expr import operations as ops

    _ = ibis.pyspark  # loading the backend registers its options (treat_nan_as_null)
    replaced = (
        ops.LStrip,
        ops.RStrip,
        ops.UnwrapJSONString,
        ops.UnwrapJSONInt64,
        ops.UnwrapJSONFloat64,
        ops.UnwrapJSONBoolean,
    )

    def template(kind: str, arg: Any, **values: str) -> Any:
        text = _JSON_SQL[kind].format(arg=arg.sql(dialect="spark"), **values)
        return sg.parse_one(text, dialect="spark")

    class KildeSparkCompiler(PySparkCompiler):  # type: ignore[misc]
        __slots__ = ()
        SIMPLE_OPS = {k: v for k, v in PySparkCompiler.SIMPLE_OPS.items() if k not in replaced}

        def visit_JSONGetItem(self, op: Any, *, arg: Any, index: Any) -> Any:
            key = op.index.value if isinstance(op.index, ops.Literal) else None
            if key is None:
                raise BackendError(
                    "a JSON path computed per row cannot be compiled for Spark",
                    fix="read JSON properties by a constant key",
                )
            path = f"$[{int(key)}]" if op.index.dtype.is_integer() else f"$['{key}']"
            return template("get", arg, path=sge.convert(path).sql(dialect="spark"))

        def visit_UnwrapJSONString(self, op: Any, *, arg: Any) -> Any:
            return template("str", arg)

        def visit_UnwrapJSONInt64(self, op: Any, *, arg: Any) -> Any:
            return template("int", arg)

        def visit_UnwrapJSONFloat64(self, op: Any, *, arg: Any) -> Any:
            return template("float", arg)

        def visit_UnwrapJSONBoolean(self, op: Any, *, arg: Any) -> Any:
            return template("bool", arg)

        def visit_Strip(self, op: Any, *, arg: Any) -> Any:
            return template("strip", arg, side="BOTH")

        def visit_LStrip(self, op: Any, *, arg: Any) -> Any:
            return template("strip", arg, side="LEADING")

        def visit_RStrip(self, op: Any, *, arg: Any) -> Any:
            return template("strip", arg, side="TRAILING")

        def visit_ExtractEpochSeconds(self, op: Any, *, arg: Any) -> Any:
            # With the microseconds, as DuckDB's EPOCH (UNIX_TIMESTAMP drops them).
            micros = self.f.unix_micros(self.cast(arg, dt.timestamp))
            return sge.Div(
                this=self.cast(micros, dt.float64), expression=self.cast(1_000_000, dt.float64)
            )

        def visit_Median(self, op: Any, *, arg: Any, where: Any) -> Any:
            # Ibis wraps the 0.5 in the filter too, which Spark refuses (not a constant).
            if where is not None:
                arg = self.if_(where, arg, sge.Null())
            return self.f.percentile(arg, sge.convert(0.5))

        def visit_ToJSONMap(self, op: Any, *, arg: Any) -> Any:
            return template("map", arg)

        def visit_ToJSONArray(self, op: Any, *, arg: Any) -> Any:
            return template("array", arg)

    return KildeSparkCompiler()


_COMPILER: Any = None


def spark_compiler() -> Any:
    """Ibis's PySpark compiler with Kilde's JSON reading (see _JSON_SQL)."""
    global _COMPILER
    if _COMPILER is None:
        _COMPILER = _spark_compiler()
    return _COMPILER


def spark_sql(expr: ir.Expr) -> str:
    """Spark SQL for an Ibis expression."""
    compiler = spark_compiler()
    out = compiler.to_sqlglot(expr.unbind())
    queries = out if isinstance(out, list) else [out]
    return ";\n".join(q.sql(dialect=compiler.dialect) for q in queries)


def spark_ibis(spark: SparkSession) -> Any:
    """An Ibis backend on a Spark session, with Kilde's compiler and Arrow results."""
    from ibis.backends.pyspark import Backend

    class KildeSpark(Backend):  # type: ignore[misc]
        compiler = spark_compiler()

        def to_pyarrow(
            self, expr: ir.Expr, /, *, params: Any = None, limit: Any = None, **kwargs: Any
        ) -> Any:
            self._run_pre_execute_hooks(expr)
            table_expr = expr.as_table()
            sql = self.compile(table_expr, params=params, limit=limit)
            table = conform(self._session.sql(sql).toArrow(), table_expr.schema().to_pyarrow())
            return expr.__pyarrow_result__(table)

        def get_schema(self, table_name: str, **kwargs: Any) -> sch.Schema:
            return utc_schema(super().get_schema(table_name, **kwargs))

    backend = KildeSpark()
    backend.do_connect(spark)
    return backend


class SparkRunner(Runner):
    """The Runner interface on Spark: stages are checkpointed temporary views.

    `make` compiles a stage once to Spark SQL, runs it, cuts the lineage with a local checkpoint
    (so the 20-odd rounds of connected components stay cheap to plan) and names the result.
    """

    dialect = "pyspark"

    def __init__(self, spark: SparkSession, ibis_backend: Any | None = None) -> None:
        # The DuckDB runner's connection is not used; everything goes through the session.
        self.spark = spark
        self.backend = ibis_backend or spark_ibis(spark)
        self._sql: dict[str, str] = {}
        self.schemas: dict[str, sch.Schema] = {}
        self._temps: set[str] = set()
        self._frames: dict[str, DataFrame] = {}
        self._lock = threading.Lock()

    # -- tables -------------------------------------------------------------------------------

    def source(self, name: str) -> ir.Table:
        if name not in self.schemas:
            self.schemas[name] = utc_schema(self.backend.get_schema(_check_name(name)))
        return ibis.table(self.schemas[name], name=name)

    def put(self, name: str, data: pa.Table) -> ir.Table:
        _check_name(name)
        frame = self.spark.createDataFrame(data) if data.num_rows else self._empty(data.schema)
        self._keep(name, frame.localCheckpoint(eager=True))
        self.schemas[name] = ibis.Schema.from_pyarrow(data.schema)
        return self.temp(name)

    def _empty(self, schema: pa.Schema) -> DataFrame:
        from ibis.backends.pyspark.datatypes import PySparkSchema

        spark_schema = PySparkSchema.from_ibis(ibis.Schema.from_pyarrow(schema))
        return self.spark.createDataFrame([], spark_schema)

    def _keep(self, name: str, frame: DataFrame) -> None:
        old = self._frames.pop(name, None)
        frame.createOrReplaceTempView(name)
        self._frames[name] = frame
        self._temps.add(name)
        if old is not None:
            with contextlib.suppress(Exception):
                old.unpersist()

    # -- stages -------------------------------------------------------------------------------

    def sql(self, key: str, build: Callable[[], ir.Expr]) -> tuple[str, Any]:
        cached = self._sql.get(key)
        schema = self.schemas.get("=" + key)
        if cached is None:
            expr = build()
            self.backend._register_udfs(expr)  # user-defined functions, if any
            cached = spark_sql(expr)
            self._sql[key] = cached
            if isinstance(expr, ir.Table):
                schema = expr.schema()
                self.schemas["=" + key] = schema
        return cached, schema

    def make(self, name: str, key: str, build: Callable[[], ir.Table]) -> ir.Table:
        sql, schema = self.sql(key, build)
        frame = self.spark.sql(sql).localCheckpoint(eager=True)
        self._keep(_check_name(name), frame)
        self.schemas[name] = schema
        return self.temp(name)

    def arrow(self, key: str, build: Callable[[], ir.Expr]) -> pa.Table:
        sql, schema = self.sql(key, build)
        table = self.spark.sql(sql).toArrow()
        if isinstance(schema, sch.Schema):
            table = conform(table, _arrow_of(schema))
        return table

    def scalar(self, key: str, build: Callable[[], ir.Expr]) -> Any:
        sql, _ = self.sql(key, build)
        rows = self.spark.sql(sql).collect()
        return rows[0][0] if rows else None

    def drop_temps(self) -> None:
        for name in sorted(self._temps):
            with contextlib.suppress(Exception):
                self.spark.catalog.dropTempView(name)
        for frame in self._frames.values():
            with contextlib.suppress(Exception):
                frame.unpersist()
        self._frames.clear()
        self._temps.clear()

    def close(self) -> None:
        self.drop_temps()


def utc_schema(schema: sch.Schema) -> sch.Schema:
    """Spark's timestamps are instants shown in the session's zone (UTC); say so, as DuckDB's
    TIMESTAMPTZ columns do, so the compiled expressions and their results agree."""
    fields = {}
    for name, dtype in schema.items():
        if dtype.is_timestamp() and dtype.timezone is None:
            dtype = dt.Timestamp(timezone="UTC", scale=dtype.scale, nullable=dtype.nullable)
        fields[name] = dtype
    return sch.Schema(fields)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the column types of `schema` (Spark hands back its own widths and zones)."""
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not column.type.equals(field.type):
            column = column.cast(field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=pa.schema([f.with_nullable(True) for f in schema]))


# -- the store's table shapes, for Parquet state tables ----------------------------------------

_SCHEMAS: dict[str, pa.Schema] = {}
_SCHEMA_LOCK = threading.Lock()


def table_schema(name: str) -> pa.Schema:
    """The Arrow schema of a store table, from the migrations themselves (one definition)."""
    with _SCHEMA_LOCK:
        if not _SCHEMAS:
            con = duckdb.connect()
            try:
                for _, _, sql in MIGRATIONS:
                    con.execute(sql)
                for (table,) in con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
                ).fetchall():
                    arrow = con.sql(f'SELECT * FROM "{table}" LIMIT 0').to_arrow_table()
                    _SCHEMAS[table] = _plain(arrow.schema)
            finally:
                con.close()
    if name not in _SCHEMAS:
        raise KeyError(name)
    return _SCHEMAS[name]


def _plain(schema: pa.Schema) -> pa.Schema:
    """DuckDB's JSON columns arrive as strings with an extension note; Parquet keeps strings."""
    fields = []
    for field in schema:
        kind = field.type
        if isinstance(kind, pa.ExtensionType):
            kind = kind.storage_type
        fields.append(pa.field(field.name, kind, nullable=True))
    return pa.schema(fields)


# -- Parquet state tables (what Spark reads and writes) ------------------------------------------


class StateTables:
    """Tables as directories of Parquet files under `root` (the lake's `state/`).

    A table is replaced by writing the new version beside it and swapping directories, so a
    reader sees the old version or the new one, never half of one. Spark and DuckDB both read
    them (`root/<table>/*.parquet`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / _check_name(name)

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ok(p.name))

    def files(self, name: str) -> list[Path]:
        return sorted(self.path(name).glob("*.parquet"))

    def read(self, name: str) -> pa.Table:
        schema = _known_schema(name)
        files = self.files(name)
        if not files:
            return (schema or pa.schema([])).empty_table()
        table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
        return conform(table, schema) if schema is not None else table

    def write(self, name: str, table: pa.Table) -> None:
        """Replace table `name` with `table` (one Parquet file)."""
        schema = _known_schema(name)
        if schema is not None:
            table = conform(table, schema)

        def fill(tmp: Path) -> None:
            pq.write_table(table, tmp / "part-00000.parquet")

        self._swap(name, fill)

    def write_frame(self, name: str, frame: DataFrame) -> None:
        """Replace table `name` with a Spark DataFrame, written by the executors."""

        def fill(tmp: Path) -> None:
            frame.write.mode("overwrite").parquet(str(tmp))

        self._swap(name, fill)

    def ensure(self, name: str) -> None:
        """An empty table of the store's shape if there is none yet."""
        if not self.exists(name):
            self.write(name, table_schema(name).empty_table())

    def _swap(self, name: str, fill: Callable[[Path], None]) -> None:
        final = self.path(name)
        tmp = self.root / f".{name}.new-{uuid.uuid4().hex[:8]}"
        old = self.root / f".{name}.old-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            fill(tmp)
            for junk in list(tmp.glob("_*")) + list(tmp.glob(".*.crc")):
                junk.unlink(missing_ok=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def _ok(name: str) -> bool:
    return not name.startswith((".", "_"))


def _known_schema(name: str) -> pa.Schema | None:
    try:
        return table_schema(name)
    except KeyError:
        return None
