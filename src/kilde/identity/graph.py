"""Connected components of the identity graph as iterative joins (portable: DuckDB, Spark).

Every node starts with its own number as label. Each round, a node takes the smallest label
among itself and its neighbours, then jumps to the label of its label (pointer jumping, which
shortens long chains to a logarithmic number of rounds). When no label changes, each
component's nodes all carry the component's smallest node number.
"""

from __future__ import annotations

from functools import partial

import ibis
import ibis.expr.types as ir

from kilde.identity.runner import Runner

MAX_ROUNDS = 200


class ComponentsDidNotConverge(RuntimeError):
    pass


def _spread(run: Runner, both_name: str, labels_name: str) -> ir.Table:
    """Each node takes the smallest label among itself and its neighbours."""
    both, labels = run.temp(both_name), run.temp(labels_name)
    near = both.join(labels, both.b == labels.nid)
    smallest = near.group_by(near.a).aggregate(m=near.label.min())
    step = labels.left_join(smallest, labels.nid == smallest.a)
    return step.select(nid=step.nid, label=ibis.least(step.label, step.m.fill_null(step.label)))


def _jump(run: Runner, step_name: str) -> ir.Table:
    """Pointer jumping: each node takes the label of its label."""
    step = run.temp(step_name)
    other = step.view()
    return step.join(other, step.label == other.nid).select(
        nid=step.nid, label=ibis.least(step.label, other.label)
    )


def _changed(run: Runner, new_name: str, old_name: str) -> ir.Scalar:
    new, old = run.temp(new_name), run.temp(old_name)
    compare = new.join(old, new.nid == old.nid)
    return compare.filter(compare.label != compare.label_right).count()


def connected_components(run: Runner, nodes: str, edges: str) -> tuple[str, int]:
    """Label the nodes of table `nodes(nid)` by component over table `edges(a, b)`.

    Returns the name of the temporary table `(nid, label)` and the rounds taken.
    """

    def both_expr() -> ir.Table:
        e = run.temp(edges)
        return e.select(a=e.a, b=e.b).union(e.select(a=e.b, b=e.a))

    run.make("k_both", f"cc/both/{edges}", both_expr)
    run.make("k_cc_0", f"cc/start/{nodes}", lambda: run.temp(nodes).select("nid", label="nid"))
    names = ("k_cc_0", "k_cc_1")
    for round_ in range(1, MAX_ROUNDS + 1):
        old, new = names[(round_ - 1) % 2], names[round_ % 2]
        run.make("k_spread", f"cc/spread/{old}", partial(_spread, run, "k_both", old))
        run.make(new, f"cc/jump/{new}", partial(_jump, run, "k_spread"))
        changed = run.scalar(f"cc/changed/{new}", partial(_changed, run, new, old))
        if not changed:
            return new, round_
    raise ComponentsDidNotConverge(f"connected components did not settle in {MAX_ROUNDS} rounds")
