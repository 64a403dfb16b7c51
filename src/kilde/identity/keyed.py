"""Keyed lookups for incremental ticks: rows of a large table for a small set of keys.

A tick touches a handful of identifiers, records and profiles. Each lookup reads the large
table once, with the small side's keys pushed into its scan as a filter (DuckDB's dynamic join
filters), and is materialised, so the stages after it join small tables instead of reading the
large one again. On Spark the same stages are ordinary semi-joins.

identity_map has indexes on id_value and closure_id (migration 16): DuckDB answers a semi-join
with a small key side from them, in milliseconds where a scan of 3M rows takes hundreds. The
larger tables (identity_observations, events) have none: their indexes would not fit the
store's default memory limit, so lookups there scan with the keys pushed in.
"""

from __future__ import annotations

import ibis.expr.types as ir

from kilde.identity.runner import Runner

# The identity_map rows of one identifier, as `held` (parameters: the value; then the query's
# own, usually the type). DuckDB answers `id_value = ?` from the map's index in a millisecond,
# but leaves the index unused once the scan also filters on id_type: a scan of millions of rows.
# MATERIALIZED keeps the type filter out of the indexed scan.
ONE_IDENTIFIER = "WITH held AS MATERIALIZED (SELECT * FROM identity_map WHERE id_value = ?) "
# The identity_map rows of one closure, as `mine` (parameters: the closure id; then the
# query's own), from the closure index for the same reason.
ONE_CLOSURE = "WITH mine AS MATERIALIZED (SELECT * FROM identity_map WHERE closure_id = ?) "


def lookup(
    run: Runner, name: str, base: ir.Table, column: str, keys: ir.Table, on: list[str]
) -> ir.Table:
    """Rows of `base` whose `on` columns match a row of `keys` (small), as temporary table
    `name`. `column` is the most selective of `on`: the scan filters on it first."""

    def candidates() -> ir.Table:
        return base.semi_join(keys.select(column), column)

    if on == [column]:
        return run.make(name, f"keyed/{name}", candidates)
    # Materialised first: DuckDB answers a one-column semi-join from an index, but not one
    # followed by a second semi-join in the same query (a scan of the whole table).
    found = run.make(f"{name}_c", f"keyed/{name}_c", candidates)
    return run.make(name, f"keyed/{name}", lambda: found.semi_join(keys, on))
