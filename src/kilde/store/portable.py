"""Small Ibis building blocks that compile the same way on every backend Kilde runs on.

Some Ibis operations are not portable: an ordered `collect(order_by=...)` is refused by the
PySpark compiler, and array lambdas (`.map`, `.filter`) compile to an arrow syntax that DuckDB
2 no longer accepts. The helpers here express the same results with plain aggregates and
CASE, which DuckDB and Spark both run.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir


def ranked_list(top: ir.Table, group: str, value: str, rank: str, n: int, name: str) -> ir.Table:
    """`group`, `name`: the values of each group as a list in the order of `rank`.

    `top` holds at most `n` rows per group, ranked 0, 1, 2, ... without gaps (a
    `row_number()` filtered with `< n`), and `value` is never NULL. The result equals
    `top[value].collect(order_by=top[rank])` per group.
    """
    picks = {f"_v{i}": top[value].max(where=top[rank] == i) for i in range(n)}
    agg = top.group_by(group).aggregate(**picks)
    values = [agg[f"_v{i}"] for i in range(n)]
    if n == 1:
        return agg.select(group, **{name: ibis.array(values)})
    shorter = [(values[i].isnull(), ibis.array(values[:i])) for i in range(1, n)]
    return agg.select(group, **{name: ibis.cases(*shorter, else_=ibis.array(values))})
