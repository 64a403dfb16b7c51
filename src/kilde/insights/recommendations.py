"""Bought together: products that share orders, and what to offer each customer next.

For every pair of products, `orders` counts the orders holding both; `confidence` is the share of
the orders with the first product that also hold the second; `lift` compares that with how often
the second is bought at all (above 1: bought together more often than by chance). A customer's
recommendations are the products most often bought together with what they bought, leaving out
what they already have.
"""

from __future__ import annotations

from typing import Any

import ibis
import ibis.expr.types as ir

from kilde.insights.preferences import product_rows
from kilde.store.portable import ranked_list

TOP = 3
MIN_ORDERS = 2  # pairs seen in fewer orders are noise


def order_items(backend: Any) -> ir.Table:
    rows = product_rows(backend)
    rows = rows.filter(rows.event == "Order Completed")
    return rows.select("profile_id", "product_id", order=rows.message_id).distinct()


def pairs(backend: Any, min_orders: int = MIN_ORDERS) -> ir.Table:
    """product, with_product, orders, confidence, lift."""
    items = order_items(backend)
    left = items.select(order=items.order, product=items.product_id)
    right = items.select(order=items.order, with_product=items.product_id)
    joined = left.join(right, "order")
    joined = joined.filter(joined.product != joined.with_product)
    together = joined.group_by("product", "with_product").aggregate(orders=joined.count())
    together = together.filter(together.orders >= min_orders)
    per_product = left.group_by("product").aggregate(product_orders=left.count())
    total = left.order.nunique().as_scalar()
    other = per_product.select(
        with_product=per_product.product, other_orders=per_product.product_orders
    )
    scored = together.join(per_product, "product").join(other, "with_product")
    confidence = scored.orders.cast("float64") / scored.product_orders
    return scored.select(
        "product",
        "with_product",
        "orders",
        confidence=confidence,
        lift=confidence / (scored.other_orders.cast("float64") / total),
    )


def recommended(backend: Any) -> ir.Table:
    """profile_id, recommended_products (up to three)."""
    items = order_items(backend)
    owned = items.select("profile_id", product=items.product_id).distinct()
    p = pairs(backend)
    candidates = owned.join(p, "product")
    scored = candidates.group_by("profile_id", candidate=candidates.with_product).aggregate(
        score=candidates.orders.sum()
    )
    have = owned.select("profile_id", candidate=owned.product)
    fresh = scored.anti_join(have, ["profile_id", "candidate"])
    ranked = fresh.mutate(
        _rn=ibis.row_number().over(
            group_by=fresh.profile_id, order_by=[ibis.desc(fresh.score), fresh.candidate]
        )
    )
    top = ranked.filter(ranked._rn < TOP)
    return ranked_list(top, "profile_id", "candidate", "_rn", TOP, "recommended_products")


def bought_together(backend: Any, limit: int = 20) -> list[dict[str, Any]]:
    p = pairs(backend)
    p = p.filter(p.product < p.with_product)  # each pair once
    rows = p.order_by([ibis.desc("orders"), ibis.desc("lift"), "product"]).limit(limit)
    out: list[dict[str, Any]] = rows.to_pyarrow().to_pylist()
    for row in out:
        row["confidence"] = round(float(row["confidence"]), 4)
        row["lift"] = round(float(row["lift"]), 3)
    return out
