"""The columnar path of a CSV order import: blocks of the file as Arrow columns.

The row path (csv_files + transactions) turns every row into Python objects; that costs tens of
microseconds a row. Most order exports are plain: one row per order, no quoting, ISO dates and
plain amounts. For those, blocks of the file are read by pyarrow's CSV reader and checked and
normalised column by column (pyarrow.compute); the records leave as Arrow columns, and the
server builds the events rows set-wise (`columnar_ingest`).

Results are the row path's, by construction:
- a block is taken only when it cannot hide a multi-line record: no quote character, no blank
  line, every line the header's width, valid UTF-8. Otherwise the rest of the file goes the row
  path (the CSV reader resumes at that byte and line);
- within a taken block, a row that any check is not sure about (an unparseable or unusual date,
  amount, currency or quantity, a missing id, a refund, text with odd spacing) is handed to the
  row path's converter, one row at a time and in file order, so its record or its error is
  exactly the row path's;
- an order id repeated on consecutive rows (an order over several lines) sends the rest of the
  file to the row path as well;
- the memory of recent order ids (to catch an order id repeated with another amount) is the
  converter's own, fed in file order by both paths.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from kilde.collect.importers.base import NAMESPACE, Reader, Row, RowError, email_anonymous_id
from kilde.collect.importers.convert import Context
from kilde.collect.importers.csv_files import CsvReader, unique_names
from kilde.collect.importers.transactions import (
    CONFLICT_WINDOW,
    TransactionConverter,
    conflict_error,
    flat_fingerprint,
)

# How much of the file one block holds (KILDE_IMPORT_BLOCK_BYTES: small blocks in tests).
BLOCK_BYTES = int(os.environ.get("KILDE_IMPORT_BLOCK_BYTES") or 2 << 20)
# What the columnar path understands; a mapping that uses any other field goes the row path.
FIELDS = {
    "order_id",
    "user_id",
    "anonymous_id",
    "email",
    "timestamp",
    "revenue",
    "currency",
    "status",
    "product_id",
    "sku",
    "product_name",
    "category",
    "price",
    "quantity",
}
_PRODUCT_FIELDS = ("product_id", "sku", "product_name", "category", "price", "quantity")
# Exactly the characters Python's str.strip() removes (all below U+3001; looking no further
# saves half a second of every import's start).
_PY_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
_PLAIN_AMOUNT = r"^\d+(\.\d+)?$"
_SIGNED_AMOUNT = r"^-?\d+(\.\d+)?$"
_QUANTITY = r"^0*[1-9]\d{0,14}$"
_CURRENCY = r"^[A-Za-z]{3}$"
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
_DATE = r"[12]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_UTC_FORM = f"^{_DATE}T{_TIME}Z$"  # 2026-11-29T08:15:00Z
_NAIVE_FORM = f"^{_DATE}[T ]{_TIME}$"  # 2026-11-29 08:15:00 (in the mapping's time zone)
_DAY_FORM = f"^{_DATE}$"  # 2026-11-29

# The Arrow columns of records sent to the server (see columnar_ingest).
RECORD_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("message_id", pa.string()),
        ("order_id", pa.string()),
        ("user_id", pa.string()),
        ("anonymous_id", pa.string()),
        ("email", pa.string()),
        ("timestamp", pa.string()),
        ("revenue", pa.float64()),
        ("currency", pa.string()),
        ("product_id", pa.string()),
        ("sku", pa.string()),
        ("name", pa.string()),
        ("category", pa.string()),
        ("price", pa.float64()),
        ("quantity", pa.int64()),
    ]
)


def eligible(ctx: Context, reader: Reader, path: Path) -> int | None:
    """The byte offset after the header when the columnar path may read this file, else None."""
    mapping, resolved = ctx.mapping, ctx.resolved
    if ctx.kind != "transactions" or not isinstance(reader, CsvReader):
        return None
    if reader.encoding not in ("utf-8", "utf-8-sig") or len(reader.delimiter) != 1:
        return None
    if mapping.timestamp_format or mapping.decimal == ",":
        return None
    if not set(resolved.fields) <= FIELDS or resolved.traits or resolved.properties:
        return None
    if "revenue" not in resolved.fields:
        return None
    if "currency" not in resolved.fields and not mapping.currency:
        return None
    with path.open("rb") as handle:
        head = handle.readline(1 << 20)
    if not head.endswith(b"\n") or b'"' in head or b"\r" in head[:-2]:
        return None
    try:
        text = head.decode(reader.encoding).rstrip("\r\n")
    except UnicodeDecodeError:
        return None
    if unique_names(text.split(reader.delimiter)) != reader.columns:
        return None
    return len(head)


@dataclass
class Block:
    start_line: int  # the file line of the block's first row
    offset: int  # the byte offset of the block
    data: bytes
    last: bool  # the end of the file


def read_block(handle: Any, offset: int, line: int, size: int = 0) -> Block | None:
    """The file from `offset` (the start of file line `line`) up to the last line end within
    `size` bytes (more if one line is longer); None at the end of the file."""
    size = size or BLOCK_BYTES
    handle.seek(offset)
    chunk = handle.read(size)
    data = chunk
    while True:
        if len(chunk) < size:  # the end of the file
            return Block(line, offset, data, True) if data else None
        cut = data.rfind(b"\n")
        if cut >= 0 and data.find(b"\n") < cut:  # two lines at least (one may be left over)
            return Block(line, offset, data[: cut + 1], False)
        chunk = handle.read(size)
        data += chunk


def clean(block: Block) -> bool:
    """True when each line of the block is exactly one row (see the module docstring)."""
    data = block.data
    if not data.endswith(b"\n") or b'"' in data:
        return False
    if data.startswith((b"\n", b"\r\n")) or b"\n\n" in data or b"\n\r\n" in data:
        return False
    return data.count(b"\r") == data.count(b"\r\n")


def parse(block: Block, columns: list[str], delimiter: str) -> pa.Table | None:
    try:
        table = pacsv.read_csv(
            io.BytesIO(block.data),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=True),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char=False, newlines_in_values=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                include_columns=columns,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowException):
        return None
    if table.num_rows != block.data.count(b"\n"):
        return None
    return table


@dataclass
class BlockResult:
    columns: pa.Table  # RECORD_SCHEMA
    records: list[dict[str, Any]] = field(default_factory=list)  # from the row path
    record_lines: list[int] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    special_rows: dict[int, Row] = field(default_factory=dict)  # line -> row, for dead letters
    rows: int = 0  # rows of the block taken (the last one may be left for the next block)
    size: int = 0  # bytes of the block taken


class BlockFingerprints:
    """The fingerprints of a block's orders, computed when a repeated order id asks for one."""

    _NAMES = ("revenue", "currency", "product_id", "sku", "name", "category", "price", "quantity")

    def __init__(self, start: int, arrays: dict[str, pa.Array | None]) -> None:
        self.start = start
        self.arrays = {name: arrays.get(name) for name in self._NAMES}

    def of(self, line: int) -> int:
        i = line - self.start

        def value(name: str) -> Any:
            values = self.arrays.get(name)
            return values[i].as_py() if values is not None else None

        return flat_fingerprint(
            value("revenue"),
            value("currency"),
            value("product_id"),
            value("sku"),
            value("name"),
            value("category"),
            value("price"),
            value("quantity"),
        )


def fingerprint_of(seen: tuple[int, Any]) -> int:
    """The fingerprint kept for an order id (an int, or computed from its block)."""
    line, kept = seen
    return kept if isinstance(kept, int) else int(kept.of(line))


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
# Where the two hex digits of each of a UUID's 16 bytes go in its 36 characters.
_HEX_AT = np.array([0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34])


def message_ids(source: str, order_ids: pa.Array) -> pa.Array:
    """base.message_id(source, "transactions", order id) for a column of order ids.

    The SHA-1 of each id is Python's; setting the version and variant bits and writing the
    UUIDs as text is done on all of them at once with numpy.
    """
    prefix = NAMESPACE.bytes + f"{source}\x1ftransactions\x1f".encode()
    sha1 = hashlib.sha1
    n = len(order_ids)
    keys = order_ids.to_pylist()
    digests = b"".join([sha1(prefix + k.encode(), usedforsecurity=False).digest() for k in keys])
    raw = np.frombuffer(digests, np.uint8).reshape(n, 20)[:, :16].copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = np.full((n, 36), ord("-"), np.uint8)
    text[:, _HEX_AT] = _HEX[raw >> 4]
    text[:, _HEX_AT + 1] = _HEX[raw & 0x0F]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))


class ColumnarOrders:
    """Order rows of clean blocks to Arrow records; unsure rows to the row converter."""

    def __init__(self, ctx: Context, converter: TransactionConverter, columns: list[str]) -> None:
        self.ctx = ctx
        self.converter = converter
        self.columns = columns
        self.fields = ctx.resolved.fields
        self.line_level = any(f in self.fields for f in _PRODUCT_FIELDS)
        self.previous_order: str | None = None
        self.refund_words = pa.array(sorted(converter.refund_words), pa.string())
        self.default_currency = converter.default_currency

    # -- column checks ------------------------------------------------------------------------

    def _column(self, table: pa.Table, name: str) -> pa.Array | None:
        column = self.fields.get(name)
        if column is None:
            return None
        raw = table.column(column).combine_chunks()
        stripped = pc.utf8_trim(raw, characters=_PY_WHITESPACE)
        return pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)

    def convert(self, block: Block, table: pa.Table) -> BlockResult | None:
        """The block's records, or None when it holds an order over several lines.

        When order lines are in the file, the block's last row is left for the next block
        (unless the file ends here): it may be the first line of an order going on there.
        """
        n = table.num_rows
        col = {name: self._column(table, name) for name in self.fields}
        order_id = col["order_id"]
        assert order_id is not None
        size = len(block.data)
        if self.line_level and n:
            if n > 1 and pc.any(pc.equal(order_id.slice(1), order_id.slice(0, n - 1))).as_py():
                return None
            if self.previous_order is not None and order_id[0].as_py() == self.previous_order:
                return None
            if not block.last:
                if n < 2:
                    return None  # a row longer than a block: the row path
                n -= 1
                size = block.data.rfind(b"\n", 0, len(block.data) - 1) + 1
                table = table.slice(0, n)
                col = {
                    name: values.slice(0, n) if values is not None else None
                    for name, values in col.items()
                }
                order_id = col["order_id"]
                assert order_id is not None
        special = pc.is_null(order_id)

        def unsure(mask: pa.Array) -> None:
            nonlocal special
            special = pc.or_kleene(special, pc.fill_null(mask, True))

        # Identity: who the order is of.
        user_id, anonymous_id, email = col.get("user_id"), col.get("anonymous_id"), col.get("email")
        someone = pa.repeat(False, n)
        for ids in (user_id, anonymous_id, email):
            if ids is not None:
                someone = pc.or_kleene(someone, pc.is_valid(ids))
        unsure(pc.invert(someone))
        email_key = None
        if email is not None:
            bad = pc.or_kleene(
                pc.invert(pc.match_substring(email, "@")), pc.invert(pc.string_is_ascii(email))
            )
            unsure(pc.and_kleene(pc.is_valid(email), bad))
            email_key = pc.ascii_lower(email)
        # The date.
        stamp = col["timestamp"]
        assert stamp is not None
        forms = pc.match_substring_regex(stamp, _UTC_FORM)
        text = pc.utf8_slice_codeunits(stamp, 0, 19)  # 2026-11-29T08:15:00
        if str(self.ctx.zone) == "UTC":
            naive = pc.match_substring_regex(stamp, _NAIVE_FORM)
            day = pc.match_substring_regex(stamp, _DAY_FORM)
            as_time = pc.if_else(
                day,
                pc.utf8_replace_slice(stamp, 10, 10, "T00:00:00"),
                pc.utf8_replace_slice(text, 10, 11, "T"),
            )
            local = pc.or_kleene(naive, day)
            text = pc.if_else(local, as_time, text)
            forms = pc.or_kleene(forms, local)
        parsed = pc.strptime(
            pc.if_else(forms, text, "2000-01-01T00:00:00"),
            format="%Y-%m-%dT%H:%M:%S",
            unit="s",
            error_is_null=True,
        )
        iso = pc.utf8_replace_slice(text, 19, 19, ".000Z")
        # The calendar must know the day (no 31 June): the parsed day is the written one.
        written = pc.cast(pc.if_else(forms, pc.utf8_slice_codeunits(text, 8, 10), "0"), pa.int64())
        good = pc.and_kleene(forms, pc.equal(pc.day(parsed), written))
        unsure(pc.invert(good))
        # The amount and its currency.
        revenue_text = col["revenue"]
        assert revenue_text is not None
        plain = pc.match_substring_regex(revenue_text, _PLAIN_AMOUNT)
        unsure(pc.invert(plain))  # empty, negative (a refund) or unusual: the row path
        revenue = pc.cast(pc.if_else(plain, revenue_text, "0"), pa.float64())
        currency_text = col.get("currency")
        if currency_text is not None:
            unsure(
                pc.and_kleene(
                    pc.is_valid(currency_text),
                    pc.invert(pc.match_substring_regex(currency_text, _CURRENCY)),
                )
            )
            currency = pc.ascii_upper(currency_text)
            if self.default_currency is not None:
                currency = pc.fill_null(currency, self.default_currency)
        else:
            currency = pa.array([self.default_currency] * n, pa.string())
        unsure(pc.is_null(currency))
        status = col.get("status")
        if status is not None:
            present = pc.is_valid(status)
            unsure(pc.and_kleene(present, pc.invert(pc.string_is_ascii(status))))
            unsure(pc.and_kleene(present, pc.is_in(pc.ascii_lower(status), self.refund_words)))
        # The product of the line.
        price_text, quantity_text = col.get("price"), col.get("quantity")
        price = quantity = None
        if price_text is not None:
            ok = pc.match_substring_regex(price_text, _SIGNED_AMOUNT)
            unsure(pc.and_kleene(pc.is_valid(price_text), pc.invert(ok)))
            price = pc.cast(pc.if_else(ok, price_text, None), pa.float64())
        if quantity_text is not None:
            ok = pc.match_substring_regex(quantity_text, _QUANTITY)
            unsure(pc.and_kleene(pc.is_valid(quantity_text), pc.invert(ok)))
            quantity = pc.cast(pc.if_else(ok, quantity_text, None), pa.int64())
        product_id, sku = col.get("product_id"), col.get("sku")
        any_product = pa.repeat(False, n)
        for name in _PRODUCT_FIELDS:
            values = col.get(name)
            if values is not None:
                any_product = pc.or_kleene(any_product, pc.is_valid(values))
        if self.line_level:
            named = pa.repeat(False, n)
            for values in (product_id, sku):
                if values is not None:
                    named = pc.or_kleene(named, pc.is_valid(values))
            unsure(pc.and_kleene(any_product, pc.invert(named)))
            if product_id is None:
                product_id = sku
            elif sku is not None:
                product_id = pc.coalesce(product_id, sku)
            if quantity is None:
                quantity = pa.array([None] * n, pa.int64())
            quantity = pc.if_else(any_product, pc.fill_null(quantity, 1), None)
        result = self._gather(
            block,
            table,
            special,
            {
                "order_id": order_id,
                "user_id": user_id,
                "anonymous_id": anonymous_id,
                "email": email_key,
                "timestamp": iso,
                "revenue": revenue,
                "currency": currency,
                "product_id": product_id if self.line_level else None,
                "sku": sku if self.line_level else None,
                "name": col.get("product_name") if self.line_level else None,
                "category": col.get("category") if self.line_level else None,
                "price": price if self.line_level else None,
                "quantity": quantity if self.line_level else None,
            },
        )
        result.size = size
        return result

    # -- in file order: the memory of order ids, and the rows the row path takes ---------------

    def _gather(
        self,
        block: Block,
        table: pa.Table,
        special: pa.Array,
        arrays: dict[str, pa.Array | None],
    ) -> BlockResult:
        n = table.num_rows
        ctx, converter = self.ctx, self.converter
        seen = converter.seen
        start = block.start_line
        order_ids: list[str] = arrays["order_id"].to_pylist()  # type: ignore[union-attr]
        fingerprints = BlockFingerprints(start, arrays)
        result = BlockResult(pa.table({}), rows=n)
        keep = [True] * n
        raw: list[list[Any]] | None = None

        def raw_row(i: int) -> Row:
            nonlocal raw
            if raw is None:
                raw = [table.column(c).to_pylist() for c in self.columns]
            return Row(start + i, {c: raw[k][i] for k, c in enumerate(self.columns)})

        unsure = pc.indices_nonzero(special).to_pylist()
        low = 0
        for stop in [*unsure, n]:
            self._run(order_ids, low, stop, start, fingerprints, keep, result, raw_row)
            if stop == n:
                break
            # A row the column checks are unsure of: the row path's converter, in file order.
            keep[stop] = False
            row = raw_row(stop)
            out = converter.feed([row])
            last = converter.finish()
            for record in out.records + last.records:
                result.records.append(record.message)
                result.record_lines.append(record.line)
            if out.errors or last.errors:
                result.errors.extend(out.errors + last.errors)
                result.special_rows[row.line] = row
            low = stop + 1
        excess = len(seen) - CONFLICT_WINDOW
        for _ in range(max(excess, 0)):
            seen.popitem(last=False)
        if n:
            self.previous_order = order_ids[-1]
        indices = pc.indices_nonzero(pa.array(keep, pa.bool_()))
        result.columns = self._records(indices, start, arrays, ctx.source)
        return result

    def _run(
        self,
        order_ids: list[str],
        low: int,
        high: int,
        start: int,
        fingerprints: BlockFingerprints,
        keep: list[bool],
        result: BlockResult,
        raw_row: Any,
    ) -> None:
        """Rows low..high-1, all checked: remember their order ids, catch repeats."""
        if low >= high:
            return
        seen = self.converter.seen
        ids = order_ids[low:high]
        keys = list(zip(ids, repeat(False), repeat(None), strict=False))
        if len(set(ids)) == len(ids) and seen.keys().isdisjoint(keys):
            lines = zip(range(start + low, start + high), repeat(fingerprints), strict=False)
            seen.update(zip(keys, lines, strict=True))
            return
        for i in range(low, high):
            key = keys[i - low]
            line = start + i
            earlier = seen.get(key)
            if earlier is None:
                seen[key] = (line, fingerprints)
                continue
            if fingerprint_of(earlier) != fingerprints.of(line):
                result.errors.append(conflict_error(self.ctx, line, earlier[0]))
                result.special_rows[line] = raw_row(i)
                keep[i] = False

    def _records(
        self, indices: pa.Array, start: int, arrays: dict[str, pa.Array | None], source: str
    ) -> pa.Table:
        count = len(indices)
        taken: dict[str, pa.Array] = {}
        for name in RECORD_SCHEMA.names:
            values = arrays.get(name)
            kind = RECORD_SCHEMA.field(name).type
            taken[name] = (
                pc.cast(values.take(indices), kind) if values is not None else pa.nulls(count, kind)
            )
        taken["line"] = pc.add(pc.cast(indices, pa.int64()), start)
        taken["message_id"] = message_ids(source, taken["order_id"])
        email = arrays.get("email")
        if email is not None:
            # A person known only by an email address gets an id derived from it.
            nobody = pc.and_kleene(pc.is_null(taken["user_id"]), pc.is_null(taken["anonymous_id"]))
            nobody = pc.and_kleene(nobody, pc.is_valid(taken["email"]))
            if pc.any(nobody).as_py():
                anonymous = taken["anonymous_id"].to_pylist()
                emails = taken["email"].to_pylist()
                for i in pc.indices_nonzero(nobody).to_pylist():
                    anonymous[i] = email_anonymous_id(emails[i])
                taken["anonymous_id"] = pa.array(anonymous, pa.string())
        return pa.table([taken[n] for n in RECORD_SCHEMA.names], schema=RECORD_SCHEMA)
