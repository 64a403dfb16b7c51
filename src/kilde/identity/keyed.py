"""Keyed lookups for incremental ticks: rows of a large table for a small set of keys.

A tick touches a handful of identifiers, records and profiles. Each lookup reads the large
table once, with the small side's keys pushed into its scan as a filter (DuckDB's dynamic join
filters), and is materialised, so the stages after it join small tables instead of reading the
large one again. On Spark the same stages are ordinary semi-joins.

(ART indexes were tried for these lookups: DuckDB fetches indexed rows one by one, which was no
quicker than the filtered scan for a tick's few hundred keys, and building the indexes after a
full rebuild took longer than the rebuild's stitching.)
"""

from __future__ import annotations

import ibis.expr.types as ir

from kilde.identity.runner import Runner


def lookup(
    run: Runner, name: str, base: ir.Table, column: str, keys: ir.Table, on: list[str]
) -> ir.Table:
    """Rows of `base` whose `on` columns match a row of `keys` (small), as temporary table
    `name`. `column` is the most selective of `on`: the scan filters on it first."""

    def build() -> ir.Table:
        candidates = base.semi_join(keys.select(column), column)
        return candidates if on == [column] else candidates.semi_join(keys, on)

    return run.make(name, f"keyed/{name}", build)
