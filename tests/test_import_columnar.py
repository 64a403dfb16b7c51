"""The columnar path of order imports gives exactly what the row path gives.

The same tricky order file is imported twice into one server: once as `kilde import` does by
default (clean blocks of the file as Arrow columns, unsure rows handed to the row converter),
once with KILDE_IMPORT_COLUMNAR=0 (row by row). Events, dead letters and the import summary
must be the same, apart from what differs by construction (source, message ids, run ids,
arrival times). Small blocks (KILDE_IMPORT_BLOCK_BYTES) make the file span many blocks, so
repeats across blocks, a block with a quote (the rest of the file goes row by row) and a
truncated last line are all crossed.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Server
from tests.import_support import dead_letters, events, kilde_import, write

HEADER = (
    "order_id,customer_id,email,order_date,sku,product_name,category,price,quantity,total,"
    "currency,status"
)

ROWS = [
    "c-001,cust-1,Ann@Example.com,2026-06-01T10:00:00Z,FF-1,Tent,tents,100.5,2,201,NOK,",
    "c-002,,guest@example.com,2026-06-02T11:00:00Z,FF-2,Jacket,jackets,99,1,99,nok,",
    "c-003,cust-3,,2026-13-01T10:00:00Z,FF-3,Boots,boots,10,1,10,NOK,",  # no such month
    "c-004,cust-4,,2026-06-31T10:00:00Z,FF-3,Boots,boots,10,1,10,NOK,",  # no 31 June
    "c-005,cust-5,,2026-06-30 10:00:00,FF-4,Pack,packs,5,1,5,NOK,",  # naive, in UTC
    "c-006,cust-6,,2026-06-30,FF-4,Pack,packs,5,1,5,NOK,",  # a day
    "c-007,cust-7,,2026-06-29T08:00:00+02:00,FF-4,Pack,packs,5,1,5,NOK,",  # an offset
    "c-008,cust-8,,2026-06-29T08:00:00Z,FF-5,Bag,packs,1234.5,1,1 234.50,NOK,",  # row path
    "c-009,cust-9,,2026-06-29T08:00:00Z,FF-5,Bag,packs,100,1,-100,NOK,",  # a refund
    "c-010,cust-10,,2026-06-29T08:00:00Z,FF-5,Bag,packs,100,1,100,NOK,refund",
    "c-011,,,2026-06-29T08:00:00Z,FF-5,Bag,packs,100,1,100,NOK,",  # nobody
    "c-012,,not-an-email,2026-06-29T08:00:00Z,FF-5,Bag,packs,100,1,100,NOK,",
    "c-013,cust-13,,2026-06-29T08:00:00Z,FF-6,Stove,stoves,50,0,50,NOK,",  # quantity 0
    "c-014,cust-14,,2026-06-29T08:00:00Z,FF-6,Stove,stoves,50,2.0,100,NOK,",
    "c-015,cust-15,,2026-06-29T08:00:00Z,FF-6,Stove,stoves,,1,50,NOK,",  # no price
    "c-016,cust-16,,2026-06-29T08:00:00Z,,,,,,75,NOK,",  # no product
    "c-017,cust-17,,2026-06-29T08:00:00Z,,Mug,kitchen,5,1,5,NOK,",  # no product id
    "c-018,cust-18,,1999-06-29T08:00:00Z,FF-7,Map,maps,5,1,5,NOK,",  # before 2000
    "c-019,cust-19,,2099-06-29T08:00:00Z,FF-7,Map,maps,5,1,5,NOK,",  # in the future
    "c-020," + "u" * 600 + ",,2026-06-29T08:00:00Z,FF-7,Map,maps,5,1,5,NOK,",  # too long id
    "c-021, cust-21 ,\u00a0pad@example.com\u00a0,2026-06-29T08:00:00Z, FF-8 ,Ørret,fish,5,1,5,EUR,",
    "c-022,cust-22,,2026-06-29T08:00:00Z,FF-8,Fish,fish,5,1,5,€,",  # a symbol
    "c-023,cust-23,,2026-06-29T08:00:00Z,FF-8,Fish,fish,5,1,12.345678901234567,NOK,",
    "c-001,cust-1,ann@example.com,2026-06-01T10:00:00Z,FF-1,Tent,tents,100.5,2,201,NOK,",
    "c-002,,guest@example.com,2026-06-02T11:00:00Z,FF-2,Jacket,jackets,99,1,98,NOK,",
    "c-024,cust-24,,2026-06-29T08:00:00Z,FF-9,Cup,kitchen,3,1,3,NOK,shipped",
    "c-025,cust-25,,2026-06-29T08:00:00Z,FF-9,Cup,kitchen,3,1,3,XX,",
    "c-026,cust-26,,2026-06-29T08:00:00Z,FF-9,Cup,kitchen,3,1,3,NOK,",
    "c-026,cust-26,,2026-06-29T08:00:00Z,FF-10,Spoon,kitchen,1,1,3,NOK,",  # a second line
    'c-027,cust-27,,2026-06-29T08:00:00Z,FF-9,"Cup, large",kitchen,3,1,3,NOK,',  # quoted
    "c-028,cust-28,,2026-06-29T08:00:00Z,FF-9,Cup,kitchen,3,1,3,NOK,",
    "c-005,cust-5,,2026-06-30 10:00:00,FF-4,Pack,packs,5,1,6,NOK,",  # conflict, row path
    "c-029,cust-29,,2026-06-29T08:00:00Z,FF-9,Cup",  # cut off
]


def _event(e: dict[str, Any]) -> Any:
    provenance = dict(e["context"]["provenance"])
    provenance.pop("import_run", None)
    context = {**e["context"], "provenance": provenance}
    keep = ("type", "event", "user_id", "anonymous_id", "timestamp", "properties", "traits")
    return orjson.dumps(
        {**{k: e[k] for k in keep}, "context": context, "plan": e.get("plan_status")},
        option=orjson.OPT_SORT_KEYS,
    )


def _letters(server: Server, source: str) -> list[bytes]:
    found = []
    for letter in dead_letters(server, source):
        answer = httpx.get(
            f"{server.url}/api/bad-events/{letter['id']}", headers=server.admin, timeout=120
        )
        answer.raise_for_status()
        found.append(_letter(answer.json()))
    return sorted(found)


def _letter(d: dict[str, Any]) -> bytes:
    payload = d["payload"]
    if isinstance(payload, str):
        payload = orjson.loads(payload)
    if isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if k != "messageId"}
        context = payload.get("context")
        if isinstance(context, dict) and isinstance(context.get("provenance"), dict):
            context["provenance"] = {
                k: v for k, v in context["provenance"].items() if k != "import_run"
            }
    return orjson.dumps(
        [d["reason"], d["path"], d["envelope"].get("code"), payload], option=orjson.OPT_SORT_KEYS
    )


def _summary(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("rows_read", "records", "stored", "duplicates", "rejected", "reasons", "first_errors")
    return {k: summary[k] for k in keep}


# Without the last rows (an order over two lines, a quote, a cut-off row) the file is one
# clean block.
CLEAN = ROWS[:-6] + ROWS[-3:-2]


@pytest.mark.parametrize(
    ("block_bytes", "send_rows", "rows", "read"),
    [
        # Blocks sent in groups until a block has rows for the row path (or rejects) ...
        ("400", "0", ROWS, "columnar up to line 2"),  # line 2x
        # ... or holds enough records (KILDE_IMPORT_SEND_ROWS), whichever comes first.
        ("400", "6", ROWS, "columnar up to line 2"),
        # A setting that is no number is ignored with a warning (the default group size).
        ("400", "six", ROWS, "columnar up to line 2"),
        ("0", "0", CLEAN, "columnar"),
    ],
)
def test_columnar_import_matches_the_row_path(
    own_server: Server,
    tmp_path: Path,
    block_bytes: str,
    send_rows: str,
    rows: list[str],
    read: str,
) -> None:
    file = write(tmp_path / "orders.csv", "\n".join([HEADER, *rows]) + "\n")
    env = {"KILDE_IMPORT_BLOCK_BYTES": block_bytes} if block_bytes != "0" else {}
    if send_rows != "0":
        env["KILDE_IMPORT_SEND_ROWS"] = send_rows
    columnar = dataclasses.replace(own_server, env={**own_server.env, **env})
    by_row = dataclasses.replace(own_server, env={**own_server.env, "KILDE_IMPORT_COLUMNAR": "0"})

    code_c, fast, run_c = kilde_import(columnar, "transactions", file, "--source", "shop-orders")
    code_r, slow, run_r = kilde_import(by_row, "transactions", file, "--source", "crm")
    assert fast is not None and slow is not None, run_c.stderr + run_r.stderr
    if not send_rows.isdigit():
        assert "KILDE_IMPORT_SEND_ROWS must be a positive whole number" in run_c.stderr
    assert code_c == code_r
    assert _summary(fast) == _summary(slow)
    assert fast["read"].startswith(read)
    assert fast["stored"] >= 10 and fast["rejected"] >= 10  # the file is as tricky as meant

    got = sorted(_event(e) for e in events(own_server, source="shop-orders"))
    want = sorted(_event(e) for e in events(own_server, source="crm"))
    assert got == want
    assert _letters(own_server, "shop-orders") == _letters(own_server, "crm")
    # Importing the file again stores nothing twice on either path.
    _, again, _ = kilde_import(columnar, "transactions", file, "--source", "shop-orders")
    assert again is not None and again["stored"] == 0
    assert again["duplicates"] == fast["stored"] + fast["duplicates"]


def plain_orders(prefix: str, count: int) -> list[str]:
    """`count` clean one-line orders of 50 customers, ids `prefix-00000` on."""
    return [
        f"{prefix}-{n:05},cust-{n % 50},,2026-06-0{1 + n % 9}T10:00:00Z,FF-{n % 7},Item,misc,"
        "10,1,10,NOK,"
        for n in range(count)
    ]


def test_an_order_whose_lines_straddle_two_blocks_stays_one_order(
    own_server: Server, tmp_path: Path
) -> None:
    single = plain_orders("s", 8)
    lines = [
        "m-001,cust-9,,2026-06-09T10:00:00Z,FF-1,Tent,tents,100,1,150,NOK,",
        "m-001,cust-9,,2026-06-09T10:00:00Z,FF-2,Pegs,tents,50,1,150,NOK,",
    ]
    rows = [*single, *lines, "s-100,cust-1,,2026-06-10T10:00:00Z,FF-3,Mug,misc,5,1,5,NOK,"]
    file = write(tmp_path / "orders.csv", "\n".join([HEADER, *rows]) + "\n")
    # The first block ends right after the order's first line.
    first_block = sum(len(r) + 1 for r in [*single, lines[0]])
    columnar = dataclasses.replace(
        own_server, env={**own_server.env, "KILDE_IMPORT_BLOCK_BYTES": str(first_block)}
    )
    by_row = dataclasses.replace(own_server, env={**own_server.env, "KILDE_IMPORT_COLUMNAR": "0"})
    _, fast, run = kilde_import(columnar, "transactions", file, "--source", "shop-orders")
    _, slow, _ = kilde_import(by_row, "transactions", file, "--source", "crm")
    assert fast is not None and slow is not None, run.stderr
    assert fast["read"].startswith("columnar up to line")
    assert _summary(fast) == _summary(slow)
    assert (fast["stored"], fast["rejected"]) == (10, 0)
    order = next(
        e
        for e in events(own_server, source="shop-orders")
        if e["properties"]["order_id"] == "m-001"
    )
    assert [p["product_id"] for p in order["properties"]["products"]] == ["FF-1", "FF-2"]
    got = sorted(_event(e) for e in events(own_server, source="shop-orders"))
    assert got == sorted(_event(e) for e in events(own_server, source="crm"))


def test_two_imports_of_one_file_at_the_same_time_store_each_order_once(
    own_server: Server, tmp_path: Path
) -> None:
    file = write(tmp_path / "orders.csv", "\n".join([HEADER, *plain_orders("t", 3000)]) + "\n")
    # Small blocks in small groups: the two imports' writes interleave many times, so each
    # finds the other's orders stored between its own check and its write.
    small = {"KILDE_IMPORT_BLOCK_BYTES": "6000", "KILDE_IMPORT_SEND_ROWS": "40"}
    columnar = dataclasses.replace(own_server, env={**own_server.env, **small})
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(
            pool.map(
                lambda _: kilde_import(columnar, "transactions", file, "--source", "shop-orders"),
                range(2),
            )
        )
    summaries = [summary for _, summary, _ in runs]
    assert all(s is not None and s["read"] == "columnar" for s in summaries), runs[0][2].stderr
    assert sum(s["stored"] for s in summaries if s) == 3000
    assert sum(s["duplicates"] for s in summaries if s) == 3000
    stats = httpx.get(f"{own_server.url}/api/stats", headers=own_server.admin, timeout=60).json()
    stored = sum(
        row["events"] for row in stats["by_source_and_type"] if row["source"] == "shop-orders"
    )
    assert stored == 3000
