"""Trait precedence: what the person told us > company records > broker data; newer wins.

The tier of a value comes from the kind of the source that sent it (the plan's `sources`):
forms, the website and the app carry what the person said about themselves; the backend and
imports carry the company's records; brokers carry bought data. An import may state its tier
in `context.kilde.tier` (for example a CRM export of what customers typed in a shop).
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir

from kilde.plan.models import Plan

TIERS = ("person", "company", "broker")
TIER_OF_KIND = {
    "form": "person",
    "web": "person",
    "app": "person",
    "email": "person",
    "server": "company",
    "import": "company",
    "broker": "broker",
}


def tier_expr(plan: Plan, source: ir.StringValue, context: ir.Value) -> ir.StringValue:
    """`tier_of` as an expression over the events' source and context columns."""
    kinds = {s.name: s.kind for s in plan.sources}
    base = source.cases(
        *[(name, TIER_OF_KIND.get(kind, "company")) for name, kind in sorted(kinds.items())],
        else_="company",
    )
    imports = sorted(name for name, kind in kinds.items() if kind == "import")
    if not imports:
        return base
    stated = context.cast("json")["kilde"]["tier"].str
    override = source.isin(imports) & stated.isin(list(TIERS))
    return ibis.ifelse(override, stated, base)
