"""The server side of the columnar path: order records as Arrow columns into the events table.

The pipeline's stages, set-wise, for records the client sent as columns (`columnar.py`):

1. already stored (the writer's memory of recent ids, then the store): counted as duplicates;
2. the privacy door: the distinct identities of the chunk are looked up on the suppression list;
   records of a listed person (and records sharing an id with them) take the record path;
3. the consent gate: when the plan gates the event on consent, every record takes the record
   path (which asks the ledger per person); otherwise nothing is withheld;
4. normalize: ids longer than allowed and dates out of range take the record path;
5. the plan check: the event's JSON Schema is evaluated column by column for the keywords this
   module knows (type, required, properties, items, pattern, enum, const, minimum, maximum,
   minLength, maxLength, additionalProperties); a record it fails, or every record when the
   schema uses another keyword, takes the record path;
6. the events rows are built by DuckDB (JSON text included) and appended through the Writer
   as one Arrow table.

"The record path" is `runs.ingest_chunk` with the Segment messages the row path would have
built (`message_of`), so a record the columnar checks are unsure about gets exactly the row
path's outcome: a dead letter with its reason, a flag, a suppression or a withheld record.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from kilde.collect.importers.engine import ChunkResult
from kilde.collect.importers.runs import CHANNEL, Services, ingest_chunk, source_for
from kilde.pipeline.normalize import EARLIEST, FUTURE_SLACK, MAX_ID_LENGTH
from kilde.store.writer import WriteBatch, all_distinct, recent_codes

EVENT = "Order Completed"
_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "examples", "default"}
_SCALAR_KEYWORDS = {
    "type",
    "pattern",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
}
_PRODUCT_COLUMNS = ("product_id", "sku", "category", "name", "price", "quantity")


class Unsupported(Exception):
    """The schema uses something the column checks do not evaluate."""


# -- the record path ----------------------------------------------------------------------------


def message_of(row: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The Segment message the row path builds for the same order (transactions._record)."""
    properties: dict[str, Any] = {
        "order_id": row["order_id"],
        "revenue": row["revenue"],
        "currency": row["currency"],
    }
    if row["product_id"] is not None:
        product = {"product_id": row["product_id"]}
        for name in ("sku", "category", "name", "price", "quantity"):
            if row[name] is not None:
                product[name] = row[name]
        properties["products"] = [product]
    provenance = {
        "tier": info["tier"],
        "kind": info["kind"],
        "file": info["file"],
        "line": row["line"],
        **info["provenance"],
    }
    if info.get("run_id"):
        provenance["import_run"] = info["run_id"]
    context: dict[str, Any] = {"provenance": provenance}
    if row["email"] is not None:
        context["externalIds"] = [
            {"id": row["email"], "type": "email", "collection": "users", "encoding": "none"}
        ]
    message: dict[str, Any] = {
        "type": "track",
        "event": EVENT,
        "messageId": row["message_id"],
    }
    if row["user_id"] is not None:
        message["userId"] = row["user_id"]
    if row["anonymous_id"] is not None:
        message["anonymousId"] = row["anonymous_id"]
    message["timestamp"] = row["timestamp"]
    message["properties"] = properties
    message["context"] = context
    return message


# -- the plan check, column by column -----------------------------------------------------------


def _json_type(kind: pa.DataType) -> str:
    if pa.types.is_string(kind):
        return "string"
    if pa.types.is_floating(kind):
        return "number"
    if pa.types.is_integer(kind):
        return "integer"
    raise Unsupported(str(kind))


def _check_scalar(values: pa.Array, schema: Any) -> pa.Array:
    """True where a present value meets the subschema (absent values: True)."""
    if schema is True or schema == {}:
        return _all(len(values), True)
    if not isinstance(schema, dict) or not set(schema) <= _SCALAR_KEYWORDS | _ANNOTATIONS:
        raise Unsupported("keyword")
    have = _json_type(values.type)
    ok = _all(len(values), True)
    wanted = schema.get("type")
    if wanted is not None:
        if not isinstance(wanted, str):
            raise Unsupported("type list")
        fits = wanted == have or (wanted == "number" and have == "integer")
        if not fits:
            if wanted == "integer" and have == "number":
                raise Unsupported("integer of a float column")
            ok = _all(len(values), False)
    if "pattern" in schema:
        if have != "string":
            pass  # only applies to strings
        else:
            pattern = schema["pattern"]
            if not isinstance(pattern, str) or not pattern.isascii():
                raise Unsupported("pattern")
            try:
                re.compile(pattern)
                matched = pc.match_substring_regex(values, pattern)
            except (re.error, pa.ArrowInvalid):
                raise Unsupported("pattern") from None
            ok = pc.and_kleene(ok, matched)
    for keyword in ("minLength", "maxLength"):
        if keyword in schema and have == "string":
            length = pc.utf8_length(values)
            bound = schema[keyword]
            test = pc.greater_equal if keyword == "minLength" else pc.less_equal
            ok = pc.and_kleene(ok, test(length, bound))
    for keyword, test in (
        ("minimum", pc.greater_equal),
        ("maximum", pc.less_equal),
        ("exclusiveMinimum", pc.greater),
        ("exclusiveMaximum", pc.less),
    ):
        if keyword in schema and have != "string":
            bound = schema[keyword]
            if isinstance(bound, bool) or not isinstance(bound, int | float):
                raise Unsupported(keyword)
            ok = pc.and_kleene(ok, test(values, bound))
    for keyword in ("enum", "const"):
        if keyword in schema:
            options = schema[keyword] if keyword == "enum" else [schema[keyword]]
            if not isinstance(options, list):
                raise Unsupported(keyword)
            same = [o for o in options if _json_value_type(o) == have]
            if len(same) != len(options) and have != "string":
                raise Unsupported(keyword)
            ok = pc.and_kleene(ok, pc.is_in(values, pa.array(same, values.type)))
    return pc.fill_null(pc.or_kleene(pc.is_null(values), ok), True)


def _json_value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _all(n: int, value: bool) -> pa.Array:
    return pa.repeat(value, n)


def _check_object(columns: dict[str, pa.Array], schema: Any, n: int) -> pa.Array:
    """True where the object made of `columns` (a null column: key absent) meets `schema`."""
    if schema is True or schema is None:
        return _all(n, True)
    allowed = {"type", "required", "properties", "additionalProperties"} | _ANNOTATIONS
    if not isinstance(schema, dict) or not set(schema) <= allowed:
        raise Unsupported("object keyword")
    if schema.get("type", "object") != "object":
        return _all(n, False)
    ok = _all(n, True)
    for name in schema.get("required", []):
        values = columns.get(name)
        ok = pc.and_kleene(ok, pc.is_valid(values) if values is not None else _all(n, False))
    known = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, values in columns.items():
        sub = known.get(name)
        if sub is None:
            if extra is False:
                ok = pc.and_kleene(ok, pc.is_null(values))
            elif extra is not True:
                raise Unsupported("additionalProperties")
            continue
        ok = pc.and_kleene(ok, _check_scalar(values, sub))
    return ok


def plan_check(table: pa.Table, schema: Any) -> pa.Array:
    """True for the records the event's schema accepts; raises Unsupported."""
    n = table.num_rows
    has_product = pc.is_valid(table.column("product_id"))
    top = {
        "order_id": table.column("order_id").combine_chunks(),
        "revenue": table.column("revenue").combine_chunks(),
        "currency": table.column("currency").combine_chunks(),
    }
    ok = _check_object(top, {**schema, "properties": _without(schema, "products")}, n)
    products = (schema.get("properties") or {}).get("products")
    if products is None:
        if schema.get("additionalProperties", True) is False:
            ok = pc.and_kleene(ok, pc.invert(has_product))
        return pc.fill_null(ok, False)
    if (
        not isinstance(products, dict)
        or not set(products)
        <= {
            "type",
            "items",
            "minItems",
            "maxItems",
        }
        | _ANNOTATIONS
    ):
        raise Unsupported("products")
    if products.get("type", "array") != "array":
        return pc.fill_null(pc.and_kleene(ok, pc.invert(has_product)), False)
    if products.get("minItems", 0) > 1 or products.get("maxItems", 1) < 1:
        raise Unsupported("products size")
    items = products.get("items", True)
    product = {name: table.column(name).combine_chunks() for name in _PRODUCT_COLUMNS}
    fine = _check_object(product, items, n)
    ok = pc.and_kleene(ok, pc.or_kleene(pc.invert(has_product), fine))
    return pc.fill_null(ok, False)


def _without(schema: dict[str, Any], name: str) -> dict[str, Any]:
    properties = dict(schema.get("properties") or {})
    properties.pop(name, None)
    return properties


# -- the chunk ----------------------------------------------------------------------------------


def ingest_columns(
    services: Services,
    *,
    source_name: str,
    kind: str,
    table: pa.Table,
    info: dict[str, Any],
) -> ChunkResult:
    """Store one chunk of order records sent as columns; see the module docstring."""
    source = source_for(services, source_name, kind)
    if kind != "transactions":
        raise ValueError("only order records take the columnar path")
    pipeline = services.pipeline
    writer = services.writer
    store = services.store
    now = datetime.now(UTC)
    n = table.num_rows
    result = ChunkResult()
    if n == 0:
        return result
    # 1. Already stored: the writer remembers recent ids; older ones are in the store. Read
    # the commit number first: commits after it may store some of these ids meanwhile.
    checked_at_seq = writer.write_seq
    recent = writer.recent
    codes = recent_codes(pa.scalar(source.name), table.column("message_id"))
    stored = recent.seen_codes(codes)
    any_stored = bool(stored.any())
    if writer.recent.capacity and store.scalar("SELECT count(*) FROM events") >= (
        writer.recent.capacity
    ):
        # The ids not remembered, as Arrow (no Python list to convert back: the usual case is
        # all of them).
        unknown = table.select(["message_id"])  # read by DuckDB below
        if any_stored:
            unknown = unknown.filter(pa.array(~stored))
        cur = store.cursor()
        try:
            found = {
                r[0]
                for r in cur.execute(
                    "SELECT e.message_id FROM events e SEMI JOIN unknown u "
                    "ON e.message_id = u.message_id WHERE e.source = ?",
                    [source.name],
                ).fetchall()
            }
        finally:
            cur.close()
        if found:
            in_store = pc.is_in(table.column("message_id"), pa.array(sorted(found), pa.string()))
            stored |= pc.fill_null(in_store, False).combine_chunks().to_numpy(zero_copy_only=False)
            any_stored = True
    duplicate = pa.array(stored) if any_stored else _all(n, False)
    result.duplicates += int(stored.sum())
    # Records waiting in the dead letter from an earlier import: the record path says so.
    slow = _all(n, False)
    if store.scalar(
        "SELECT count(*) FROM dead_letters WHERE source = ? AND channel = ? AND status = 'pending'",
        [source.name, CHANNEL],
    ):
        slow = _all(n, True)
    # 2. The door.
    screen = pipeline.privacy
    suppression = screen.suppression
    # The writer's late screen (an erasure while the chunk was on its way) needs the rows as
    # dicts only when the suppression list changed since this chunk was screened.
    writer.screen_rows = lambda batch: (
        bool(len(suppression)) and batch.screened_at != suppression.epoch
    )
    tally = screen.tally()
    if len(screen.suppression):
        slow = pc.or_kleene(slow, _suppressed(screen, table))
    # 3. The consent gate.
    rules = screen.rules
    if rules.active:
        if rules.event_purposes("track", EVENT) is not None:
            slow = _all(n, True)
        pairs = table.select(["user_id", "anonymous_id"]).filter(
            pc.and_kleene(
                pc.is_valid(table.column("user_id")), pc.is_valid(table.column("anonymous_id"))
            )
        )
        if pairs.num_rows:
            for user_id, anonymous_id in set(
                zip(
                    pairs.column(0).to_pylist(),
                    pairs.column(1).to_pylist(),
                    strict=True,
                )
            ):
                screen.consent.link(user_id, anonymous_id)
    # 4. Normalize.
    for name in ("user_id", "anonymous_id"):
        slow = pc.or_kleene(
            slow, pc.fill_null(pc.greater(pc.utf8_length(table.column(name)), MAX_ID_LENGTH), False)
        )
    moments = pc.strptime(
        table.column("timestamp"), format="%Y-%m-%dT%H:%M:%S.000Z", unit="us", error_is_null=True
    )
    moments = moments.cast(pa.timestamp("us", tz="UTC"))  # the text said UTC (Z)
    in_range = pc.and_kleene(
        pc.greater_equal(moments, pa.scalar(EARLIEST, pa.timestamp("us", tz="UTC"))),
        pc.less_equal(moments, pa.scalar(now + FUTURE_SLACK, pa.timestamp("us", tz="UTC"))),
    )
    slow = pc.or_kleene(slow, pc.invert(pc.fill_null(in_range, False)))
    # 5. The plan check.
    spec = next((e for e in pipeline.plan.events if e.key == ("track", EVENT)), None)
    if spec is None:
        slow = _all(n, True)
    else:
        try:
            slow = pc.or_kleene(slow, pc.invert(plan_check(table, spec.properties)))
        except Unsupported:
            slow = _all(n, True)
    slow = pc.and_kleene(slow, pc.invert(duplicate))
    fast = pc.invert(pc.or_kleene(slow, duplicate))
    # 6. Events rows, through the writer.
    # One chunk: DuckDB then writes a block of a row group's size (what `kilde import` sends) as
    # one whole row group, where the request's batches would leave partial ones for the next
    # checkpoint to rewrite. Usually every record is fast: the table goes as it came, copied
    # once (into one chunk) instead of twice (filtered, then combined).
    everyone = pc.all(fast, skip_nulls=False).as_py()
    good = (table if everyone else table.filter(fast)).combine_chunks()
    if good.num_rows:
        records = good.append_column("source", pa.repeat(source.name, good.num_rows))
        written = writer.write_sync(
            WriteBatch(
                arrow_events=records,
                arrow_select=events_select(info, now),
                statements=screen.statements(tally, source.name, _env(now)),
                screened_at=tally.epoch,
                # Step 1 looked at every id; the writer looks again only if it must.
                checked_at_seq=checked_at_seq if all_distinct(codes) else None,
                arrow_codes=codes if everyone else None,
            )
        )
        result.stored += written.stored
        result.duplicates += written.duplicates
    # The record path for the rest.
    positions = pc.indices_nonzero(slow).to_pylist()
    if positions:
        rows = table.take(pa.array(positions, pa.int64())).to_pylist()
        messages = [message_of(row, info) for row in rows]
        other = ingest_chunk(
            services, source_name=source.name, kind=kind, records=messages, rejects=[]
        )
        result.stored += other.stored
        result.duplicates += other.duplicates
        result.flagged += other.flagged
        result.suppressed += other.suppressed
        result.withheld += other.withheld
        for rejection in other.rejected:
            result.rejected.append({**rejection, "index": positions[rejection["index"]]})
    return result


def _env(now: datetime) -> Any:
    from kilde.pipeline import Envelope

    return Envelope(received_at=now, channel=CHANNEL)


def _suppressed(screen: Any, table: pa.Table) -> pa.Array:
    """Records of people on the suppression list, and records sharing an id with them."""
    people = (
        table.select(["user_id", "anonymous_id", "email"])
        .group_by(["user_id", "anonymous_id", "email"])
        .aggregate([])
    )
    hit_users: set[str] = set()
    hit_anonymous: set[str] = set()
    for person in people.to_pylist():
        probe: dict[str, Any] = {}
        if person["user_id"] is not None:
            probe["userId"] = person["user_id"]
        if person["anonymous_id"] is not None:
            probe["anonymousId"] = person["anonymous_id"]
        if person["email"] is not None:
            probe["context"] = {
                "externalIds": [
                    {
                        "id": person["email"],
                        "type": "email",
                        "collection": "users",
                        "encoding": "none",
                    }
                ]
            }
        if screen.suppression.hit(probe) is not None:
            if person["user_id"] is not None:
                hit_users.add(person["user_id"])
            if person["anonymous_id"] is not None:
                hit_anonymous.add(person["anonymous_id"])
            hit_users.add("\x00email:" + (person["email"] or ""))
    if not hit_users and not hit_anonymous:
        return _all(table.num_rows, False)
    by_user = pc.is_in(table.column("user_id"), pa.array(sorted(hit_users), pa.string()))
    by_anonymous = pc.is_in(
        table.column("anonymous_id"), pa.array(sorted(hit_anonymous), pa.string())
    )
    emails = {u.removeprefix("\x00email:") for u in hit_users if u.startswith("\x00email:")}
    by_email = pc.is_in(table.column("email"), pa.array(sorted(emails - {""}), pa.string()))
    return pc.fill_null(pc.or_kleene(pc.or_kleene(by_user, by_anonymous), by_email), False)


def events_select(info: dict[str, Any], now: datetime) -> tuple[str, list[Any]]:
    """The SELECT the writer inserts the events rows with (see WriteBatch.arrow_select)."""
    head = orjson.dumps(
        {"tier": info["tier"], "kind": info["kind"], "file": info["file"]}
    ).decode()[:-1]
    tail = "".join(
        "," + orjson.dumps(k).decode() + ":" + orjson.dumps(v).decode()
        for k, v in info["provenance"].items()
    )
    if info.get("run_id"):
        tail += ',"import_run":' + orjson.dumps(info["run_id"]).decode()
    prefix = '{"provenance":' + head + ',"line":'
    suffix = tail + "}"
    select = """
            SELECT
                message_id,
                source,
                'track' AS type,
                ?::VARCHAR AS event,
                user_id,
                anonymous_id,
                NULL::VARCHAR AS group_id,
                NULL::VARCHAR AS previous_id,
                timestamp::TIMESTAMPTZ AS timestamp,
                timestamp::TIMESTAMPTZ AS original_timestamp,
                NULL::TIMESTAMPTZ AS sent_at,
                ?::TIMESTAMPTZ AS received_at,
                '{"order_id":' || to_json(order_id) || ',"revenue":' || to_json(revenue)
                    || ',"currency":' || to_json(currency)
                    || CASE WHEN product_id IS NULL THEN '}'
                    ELSE ',"products":[{"product_id":' || to_json(product_id)
                        || CASE WHEN sku IS NULL THEN '' ELSE ',"sku":' || to_json(sku) END
                        || CASE WHEN category IS NULL THEN ''
                            ELSE ',"category":' || to_json(category) END
                        || CASE WHEN name IS NULL THEN '' ELSE ',"name":' || to_json(name) END
                        || CASE WHEN price IS NULL THEN '' ELSE ',"price":' || to_json(price) END
                        || ',"quantity":' || quantity::VARCHAR || '}]}'
                    END AS properties,
                '{}' AS traits,
                ? || line::VARCHAR || ? ||
                    CASE WHEN email IS NULL THEN '}'
                    ELSE ',"externalIds":[{"id":' || to_json(email)
                        || ',"type":"email","collection":"users","encoding":"none"}]}'
                    END AS context,
                '{}' AS integrations,
                NULL::VARCHAR AS ip,
                NULL::VARCHAR AS country,
                NULL::VARCHAR AS browser,
                NULL::VARCHAR AS browser_version,
                NULL::VARCHAR AS os,
                NULL::VARCHAR AS os_version,
                NULL::VARCHAR AS device,
                NULL::VARCHAR AS page_url,
                NULL::VARCHAR AS page_path,
                NULL::VARCHAR AS referrer,
                'ok' AS plan_status,
                NULL::VARCHAR AS plan_issues
            FROM arrow_events
    """
    return select, [EVENT, now, prefix, suffix]


__all__ = ["ingest_columns", "message_of", "plan_check"]
