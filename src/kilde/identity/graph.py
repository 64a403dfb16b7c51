"""Connected components of the identity graph as iterative joins (portable: DuckDB, Spark).

Every node starts with its own number as label. Each round, a node takes the smallest label
among itself and its neighbours, then jumps to the label of its label (pointer jumping, which
shortens long chains to a logarithmic number of rounds). When no label changes, each
component's nodes all carry the component's smallest node number.
"""

from __future__ import annotations

from typing import Any

import ibis
import ibis.expr.types as ir

MAX_ROUNDS = 200


class ComponentsDidNotConverge(RuntimeError):
    pass


def connected_components(nodes: ir.Table, edges: ir.Table) -> tuple[ir.Table, int]:
    """`nodes(nid)`, `edges(a, b)` (undirected) -> (`(nid, label)` cached, rounds taken)."""
    both = edges.select(a=edges.a, b=edges.b).union(edges.select(a=edges.b, b=edges.a)).cache()
    labels: Any = nodes.select(nid=nodes.nid, label=nodes.nid).cache()
    try:
        for round_ in range(1, MAX_ROUNDS + 1):
            near = both.join(labels, both.b == labels.nid)
            smallest = near.group_by(near.a).aggregate(m=near.label.min())
            step = labels.left_join(smallest, labels.nid == smallest.a)
            step = step.select(
                nid=step.nid, label=ibis.least(step.label, step.m.fill_null(step.label))
            ).cache()
            other = step.view()
            jumped = step.join(other, step.label == other.nid).select(
                nid=step.nid, label=ibis.least(step.label, other.label)
            )
            new = jumped.cache()
            step.release()
            compare = new.join(labels, new.nid == labels.nid)
            changed = int(compare.filter(compare.label != compare.label_right).count().execute())
            labels.release()
            labels = new
            if changed == 0:
                return labels, round_
    finally:
        both.release()
    raise ComponentsDidNotConverge(f"connected components did not settle in {MAX_ROUNDS} rounds")
