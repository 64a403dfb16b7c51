"""Order history: rows become `Order Completed` (and `Order Refunded`) track events.

A file may hold one row per order, or one row per order line with the order id repeated on
consecutive rows; lines of one order become its `products`. The order id is the record key, so
importing the same orders again stores nothing twice. An order id that comes back with another
amount is rejected (the first one is kept) unless the row says it is a refund.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from kilde.collect.importers import values
from kilde.collect.importers.base import Converted, ImportFailed, Record, Row, RowError, message_id
from kilde.collect.importers.convert import (
    Context,
    RowProblem,
    identity,
    properties_of,
    text_cell,
    when,
)

# How many recent order ids are remembered to catch an order id repeated with another amount.
# Repeats further apart are still never stored twice (same message id), but only counted as
# duplicates without comparing amounts.
CONFLICT_WINDOW = 200_000
_PRODUCT_FIELDS = ("product_id", "sku", "product_name", "category", "price", "quantity")
_EXTRA_AMOUNTS = ("tax", "shipping", "discount")


@dataclass
class _Line:
    row: Row
    order_id: str
    refund: bool
    refund_id: str | None
    ids: dict[str, Any]
    external: list[dict[str, Any]]
    timestamp: str
    revenue: float | None
    currency: str | None
    products: list[dict[str, Any]]
    extra: dict[str, Any]


@dataclass
class _Order:
    key: tuple[str, bool, str | None]
    lines: list[_Line] = field(default_factory=list)
    failed: RowError | None = None
    failed_lines: list[int] = field(default_factory=list)


_FLAT_KEYS = frozenset(("product_id", "sku", "name", "category", "price", "quantity"))


def flat_fingerprint(
    revenue: float | None,
    currency: str | None,
    product_id: str | None,
    sku: str | None,
    name: str | None,
    category: str | None,
    price: float | None,
    quantity: int | None,
) -> int:
    """The fingerprint of an order of at most one product (the columnar path computes it too)."""
    return hash((revenue, currency, product_id, sku, name, category, price, quantity))


def order_fingerprint(revenue: float, currency: str, products: list[dict[str, Any]]) -> int:
    """What an order says (amount, currency, products), to tell a repeat from a conflict."""
    if not products:
        return flat_fingerprint(revenue, currency, None, None, None, None, None, None)
    if len(products) == 1 and products[0].keys() <= _FLAT_KEYS:
        p = products[0]
        return flat_fingerprint(
            revenue,
            currency,
            p.get("product_id"),
            p.get("sku"),
            p.get("name"),
            p.get("category"),
            p.get("price"),
            p.get("quantity"),
        )
    return hash((b"json", orjson.dumps([revenue, currency, products], option=orjson.OPT_SORT_KEYS)))


def _kept_fingerprint(seen: tuple[int, Any]) -> int:
    """An int, or an object that computes it (the columnar path's blocks)."""
    kept = seen[1]
    return kept if isinstance(kept, int) else int(kept.of(seen[0]))


def conflict_error(ctx: Context, line: int, seen_line: int) -> RowError:
    return RowError(
        line,
        ctx.resolved.fields.get("revenue") or ctx.resolved.fields.get("order_id"),
        "duplicate_order",
        f"this order id was already on line {seen_line} with a different amount or "
        "products; the first is kept",
        "remove or correct one of the two rows; mark refunds with a status column "
        "(refund) so they become Order Refunded",
    )


def _text(value: Any) -> str | None:
    return value if value is None or type(value) is str else values.text(value)


class TransactionConverter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        fields = ctx.resolved.fields
        if "order_id" not in fields:
            raise ImportFailed(
                "no order id column was found",
                fix="map it in the mapping file: `columns: {order_id: <column>}`",
            )
        if "timestamp" not in fields:
            raise ImportFailed(
                "no order date column was found",
                fix="map it in the mapping file: `columns: {timestamp: <column>}`",
            )
        if "revenue" not in fields and "price" not in fields and "products" not in fields:
            raise ImportFailed(
                "no order total column was found (nor line prices to add up)",
                fix="map it in the mapping file: `columns: {revenue: <column>}`",
            )
        if "currency" not in fields and not ctx.mapping.currency:
            self.default_currency = None
        else:
            self.default_currency = (
                values.currency_code(ctx.mapping.currency) if ctx.mapping.currency else None
            )
        self.refund_words = {w.lower() for w in ctx.mapping.refund_values}
        self.line_level = any(f in fields for f in _PRODUCT_FIELDS)
        self.pending: _Order | None = None
        # order key -> (line, hash of amount, currency and products)
        # (the fingerprint may be an object computing it: see columnar.BlockFingerprints)
        self.seen: OrderedDict[tuple[str, bool, str | None], tuple[int, Any]] = OrderedDict()

    # -- rows to lines ------------------------------------------------------------------------

    def _line(self, row: Row) -> _Line:
        ctx = self.ctx
        f = ctx.fields_of(row)
        order_id = _text(f.get("order_id"))
        if order_id is None:
            raise RowProblem(
                ctx.resolved.fields["order_id"],
                "missing_order_id",
                "the order id is empty",
                "fill in the order id",
            )
        ids, external, _ = identity(row, ctx)
        timestamp = when(row, ctx, required=True)
        assert timestamp is not None
        revenue = currency = None
        raw = f.get("revenue")
        if raw is not None:
            revenue, currency = self._amount(raw, "revenue")
        raw_currency = f.get("currency")
        if raw_currency is not None:
            try:
                currency = values.currency_code(raw_currency)
            except values.ValueProblem as problem:
                raise RowProblem(
                    ctx.resolved.fields["currency"], problem.code, problem.reason, problem.fix
                ) from None
        currency = currency or self.default_currency
        status = _text(f.get("status"))
        refund = (status is not None and status.lower() in self.refund_words) or (
            revenue is not None and revenue < 0
        )
        if revenue is not None:
            revenue = abs(revenue)
        extra = properties_of(row, ctx) if ctx.resolved.properties else {}
        for name in _EXTRA_AMOUNTS:
            raw = f.get(name)
            if raw is not None:
                extra[name] = self._amount(raw, name)[0]
        coupon = _text(f.get("coupon"))
        if coupon is not None:
            extra["coupon"] = coupon
        return _Line(
            row,
            order_id,
            refund,
            _text(f.get("refund_id")),
            ids,
            external,
            timestamp,
            revenue,
            currency,
            self._products(f) if self.line_level or "products" in f else [],
            extra,
        )

    def _amount(self, raw: Any, name: str) -> tuple[float, str | None]:
        try:
            return values.amount(raw, self.ctx.mapping.decimal)
        except values.ValueProblem as problem:
            raise RowProblem(
                self.ctx.resolved.fields[name], problem.code, problem.reason, problem.fix
            ) from None

    def _products(self, f: dict[str, Any]) -> list[dict[str, Any]]:
        ctx = self.ctx
        raw = f.get("products")
        if raw is not None:
            return self._product_list(raw)
        product: dict[str, Any] = {}
        for name in ("product_id", "sku", "category"):
            value = f.get(name)
            if value is not None:
                product[name] = _text(value)
        name_value = f.get("product_name")
        if name_value is not None:
            product["name"] = _text(name_value)
        price = f.get("price")
        if price is not None:
            product["price"] = self._amount(price, "price")[0]
        quantity = f.get("quantity")
        if quantity is not None:
            try:
                product["quantity"] = values.quantity(quantity)
            except values.ValueProblem as problem:
                raise RowProblem(
                    ctx.resolved.fields["quantity"], problem.code, problem.reason, problem.fix
                ) from None
        if not product:
            return []
        product.setdefault("quantity", 1)
        if "product_id" not in product:
            if "sku" not in product:
                raise RowProblem(
                    ctx.resolved.fields.get("product_id"),
                    "missing_product_id",
                    "the order line has no product id or SKU",
                    "fill in the product id or SKU of each order line",
                )
            product = {"product_id": product["sku"], **product}
        return [product]

    def _product_list(self, raw: Any) -> list[dict[str, Any]]:
        column = self.ctx.resolved.fields["products"]
        problem = RowProblem(
            column,
            "invalid_products",
            "is not a JSON list of products",
            'write products as [{"product_id": "p-1", "price": 10, "quantity": 1}]',
        )
        if isinstance(raw, str):
            try:
                raw = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise problem from None
        if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
            raise problem
        products = []
        for item in raw:
            product = dict(item)
            if "product_id" not in product and "sku" in product:
                product["product_id"] = str(product["sku"])
            products.append(product)
        return products

    # -- lines to orders ----------------------------------------------------------------------

    def feed(self, rows: list[Row]) -> Converted:
        out = Converted()
        for row in rows:
            try:
                line = self._line(row)
            except RowProblem as problem:
                error = problem.at(row.line)
                order_id = text_cell(row, self.ctx, "order_id")
                pending = self.pending
                if (
                    self.line_level
                    and pending is not None
                    and order_id is not None
                    and pending.key[0] == order_id
                ):
                    pending.failed = pending.failed or error
                    pending.failed_lines.append(row.line)
                    out.errors.append(error)
                    continue
                self._flush(out)
                if self.line_level and order_id is not None:
                    self.pending = _Order((order_id, False, None), failed=error)
                    self.pending.failed_lines.append(row.line)
                out.errors.append(error)
                continue
            key = (line.order_id, line.refund, line.refund_id)
            pending = self.pending
            if (
                self.line_level
                and pending is not None
                and pending.key[0] == key[0]
                and (pending.key == key or not pending.lines)
            ):
                pending.key = key
                pending.lines.append(line)
                continue
            self._flush(out)
            self.pending = _Order(key, [line])
        return out

    def finish(self) -> Converted:
        out = Converted()
        self._flush(out)
        return out

    def _flush(self, out: Converted) -> None:
        order, self.pending = self.pending, None
        if order is None:
            return
        if order.failed is not None:
            for line in order.lines:
                out.errors.append(
                    RowError(
                        line.row.line,
                        None,
                        "order_line_rejected",
                        f"another line of this order (line {order.failed.line}) was rejected, "
                        "so the whole order was left out",
                        "correct that line and import the file again",
                    )
                )
            return
        try:
            record = self._record(order)
        except RowProblem as problem:
            out.errors.append(problem.at(order.lines[0].row.line))
            return
        if record is not None:
            out.records.append(record)
        else:
            out.errors.append(self._conflict)

    def _record(self, order: _Order) -> Record | None:
        ctx = self.ctx
        first = order.lines[0]
        revenues = {line.revenue for line in order.lines if line.revenue is not None}
        if len(revenues) > 1:
            raise RowProblem(
                ctx.resolved.fields.get("revenue"),
                "inconsistent_order",
                "the lines of this order disagree on the order total",
                "give every line of an order the same total, or leave it empty on all but one",
            )
        products = [p for line in order.lines for p in line.products]
        if revenues:
            revenue = revenues.pop()
        elif products and all("price" in p for p in products):
            revenue = round(sum(p["price"] * p.get("quantity", 1) for p in products), 2)
        else:
            raise RowProblem(
                ctx.resolved.fields.get("revenue") or ctx.resolved.fields.get("price"),
                "missing_amount",
                "the order has no total and no line prices",
                "fill in the order total",
            )
        currency = next((line.currency for line in order.lines if line.currency), None)
        if currency is None:
            raise RowProblem(
                ctx.resolved.fields.get("currency"),
                "missing_currency",
                "the order has no currency",
                "fill in the currency, or set `currency: NOK` (for example) in the mapping",
            )
        refund = first.refund
        properties: dict[str, Any] = {"order_id": first.order_id}
        properties["total" if refund else "revenue"] = revenue
        properties["currency"] = currency
        if products:
            properties["products"] = products
        for line in order.lines:
            for name, value in line.extra.items():
                properties.setdefault(name, value)
        key = order.key
        fingerprint = order_fingerprint(revenue, currency, products)
        seen = self.seen.get(key)
        if seen is not None and _kept_fingerprint(seen) != fingerprint:
            self._conflict = conflict_error(ctx, first.row.line, seen[0])
            return None
        if seen is None:
            self.seen[key] = (first.row.line, fingerprint)
            if len(self.seen) > CONFLICT_WINDOW:
                self.seen.popitem(last=False)
        record_key = first.order_id
        if refund:
            record_key += "\x1frefund\x1f" + (first.refund_id or "")
        context = ctx.context_for(first.row.line)
        if first.external:
            context["externalIds"] = first.external
        message = {
            "type": "track",
            "event": "Order Refunded" if refund else "Order Completed",
            "messageId": message_id(ctx.source, "transactions", record_key),
            **first.ids,
            "timestamp": first.timestamp,
            "properties": properties,
            "context": context,
        }
        return Record(first.row.line, message)

    _conflict: RowError
