"""File formats and broken files: CSV dialects, encodings, JSON Lines, Parquet, Excel."""

from __future__ import annotations

import csv
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from openpyxl import Workbook

from tests.conftest import Server
from tests.import_support import events, kilde_import, write


def _orders(server: Server, prefix: str) -> dict[str, dict[str, object]]:
    return {
        e["properties"]["order_id"]: e
        for e in events(server, source="shop-orders")
        if e["properties"]["order_id"].startswith(prefix)
    }


def test_tab_pipe_and_semicolon_files_are_detected(kilde_server: Server, tmp_path: Path) -> None:
    for delimiter, name in (("\t", "tab"), ("|", "pipe"), (";", "semicolon")):
        p = f"{name}{uuid.uuid4().hex[:6]}"
        rows = [
            ["order_id", "customer_id", "order_date", "total", "currency"],
            [f"{p}-1", "c-1", "2026-09-01 10:00:00", "1 234,50", "EUR"],
        ]
        text = "\n".join(delimiter.join(r) for r in rows) + "\n"
        code, summary, run = kilde_import(
            kilde_server, "transactions", write(tmp_path / f"{name}.txt", text), "-s", "shop-orders"
        )
        assert code == 0, run.stderr
        assert summary is not None and summary["details"]["delimiter"] == name
        assert _orders(kilde_server, p)[f"{p}-1"]["properties"]["revenue"] == 1234.5  # type: ignore[index]


def test_a_wrong_delimiter_is_named_with_its_fix(kilde_server: Server, tmp_path: Path) -> None:
    file = write(
        tmp_path / "orders.csv",
        "order_id;customer_id;order_date;total;currency\nw-1;c-1;2026-09-01;10;NOK\n",
    )
    code, _, run = kilde_import(
        kilde_server, "transactions", file, "-s", "shop-orders", "--delimiter", ","
    )
    assert code == 1
    assert "seems separated by semicolon, not comma" in run.stderr
    assert "--delimiter ';'" in run.stderr


def test_rows_with_a_stray_delimiter_or_broken_quotes_are_rejected_alone(
    kilde_server: Server, tmp_path: Path
) -> None:
    p = f"q{uuid.uuid4().hex[:6]}"
    file = write(
        tmp_path / "orders.csv",
        "order_id,customer_id,order_date,total,currency\n"
        f"{p}-1,c-1,2026-09-01,10,NOK\n"
        f"{p}-2,c-2,2026-09-02,1,234.00,NOK\n"  # unquoted thousands separator
        f'{p}-3,"c-3"x,2026-09-03,10,NOK\n'  # text after a closing quote
        f"{p}-4,c-4,2026-09-04,10,NOK\n"
        f'{p}-5,"c-5,2026-09-05,10,NOK\n'  # a quote that is never closed ...
        f"{p}-6,c-6,2026-09-06,10,NOK\n",  # ... swallows the rest of the file
    )
    rejects = tmp_path / "rejects.csv"
    code, summary, _ = kilde_import(
        kilde_server, "transactions", file, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert code == 0
    assert summary is not None and summary["stored"] == 2
    rows = [(r["line"], r["end_line"], r["error"]) for r in csv.DictReader(rejects.open())]
    assert rows == [
        ("3", "", "wrong_field_count"),
        ("4", "", "broken_quoting"),
        ("6", "7", "broken_quoting"),
    ]
    assert sorted(_orders(kilde_server, p)) == [f"{p}-1", f"{p}-4"]


def test_a_file_that_mixes_encodings_loses_only_the_foreign_lines(
    kilde_server: Server, tmp_path: Path
) -> None:
    p = f"e{uuid.uuid4().hex[:6]}"
    good = f"{p}-1,kunde-ø,2026-09-01,10,NOK\n".encode()
    foreign = f"{p}-2,kunde-æ,2026-09-02,10,NOK\n".encode("cp1252")
    more = f"{p}-3,kunde-å,2026-09-03,10,NOK\n".encode()
    file = tmp_path / "mixed.csv"
    file.write_bytes(b"order_id,customer_id,order_date,total,currency\n" + good + foreign + more)
    rejects = tmp_path / "rejects.csv"
    code, summary, _ = kilde_import(
        kilde_server, "transactions", file, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert code == 0 and summary is not None
    assert summary["details"]["encoding"].startswith("utf-8 (mostly UTF-8")
    assert [(r["line"], r["error"]) for r in csv.DictReader(rejects.open())] == [
        ("3", "invalid_encoding")
    ]
    stored = _orders(kilde_server, p)
    assert stored[f"{p}-1"]["user_id"] == "kunde-ø"
    assert stored[f"{p}-3"]["user_id"] == "kunde-å"


def test_a_windows_1252_file_is_detected(kilde_server: Server, tmp_path: Path) -> None:
    p = f"w{uuid.uuid4().hex[:6]}"
    text = "order_id,customer_id,order_date,total,currency\n" + "".join(
        f"{p}-{n},Bjørnæs-Ålesund-{n},2026-09-0{n},10,NOK\n" for n in range(1, 6)
    )
    file = write(tmp_path / "cp1252.csv", text, "cp1252")
    code, summary, run = kilde_import(kilde_server, "transactions", file, "-s", "shop-orders")
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 5
    assert _orders(kilde_server, p)[f"{p}-1"]["user_id"] == "Bjørnæs-Ålesund-1"


def test_truncated_files_reject_the_cut_row_and_keep_the_rest(
    kilde_server: Server, tmp_path: Path
) -> None:
    p = f"t{uuid.uuid4().hex[:6]}"
    csv_file = write(
        tmp_path / "cut.csv",
        "order_id,customer_id,order_date,total,currency\n"
        f"{p}-1,c-1,2026-09-01,10,NOK\n"
        f"{p}-2,c-2,2026-09-0",
    )
    rejects = tmp_path / "rejects.csv"
    code, summary, _ = kilde_import(
        kilde_server, "transactions", csv_file, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert code == 0 and summary is not None and summary["stored"] == 1
    [row] = list(csv.DictReader(rejects.open()))
    assert (row["line"], row["error"]) == ("3", "truncated_row")
    assert "cut off" in row["fix"]

    jsonl = write(
        tmp_path / "cut.jsonl",
        f'{{"order_id": "{p}-j1", "customer_id": "c-1", "order_date": "2026-09-01", '
        '"total": 10, "currency": "NOK"}\n'
        f'{{"order_id": "{p}-j2", "customer_id": "c-2", "order_da',
    )
    code, summary, _ = kilde_import(
        kilde_server, "transactions", jsonl, "-s", "shop-orders", "--rejects", str(rejects)
    )
    assert code == 0 and summary is not None and summary["stored"] == 1
    assert [(r["line"], r["error"]) for r in csv.DictReader(rejects.open())] == [
        ("2", "truncated_row")
    ]


def test_parquet_with_typed_columns(kilde_server: Server, tmp_path: Path) -> None:
    p = f"pq{uuid.uuid4().hex[:6]}"
    table = pa.table(
        {
            "order_id": [f"{p}-1", f"{p}-2"],
            "customer_id": ["c-1", "c-2"],
            "created_at": pa.array(
                [datetime(2026, 9, 1, 8, 0), datetime(2026, 9, 2, 9, 30)], pa.timestamp("ms")
            ),
            "total": pa.array([Decimal("199.90"), Decimal("49.00")], pa.decimal128(10, 2)),
            "currency": ["SEK", "SEK"],
        }
    )
    file = tmp_path / "orders.parquet"
    pq.write_table(table, file)
    code, summary, run = kilde_import(kilde_server, "transactions", file, "-s", "shop-orders")
    assert code == 0, run.stderr
    assert summary is not None and summary["details"]["format"] == "Parquet"
    stored = _orders(kilde_server, p)
    assert stored[f"{p}-1"]["properties"]["revenue"] == 199.9  # type: ignore[index]
    assert str(stored[f"{p}-2"]["timestamp"]).startswith("2026-09-02T09:30:00")

    cut = tmp_path / "cut.parquet"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    code, _, run = kilde_import(kilde_server, "transactions", cut, "-s", "shop-orders")
    assert code == 1
    assert "not a readable Parquet file" in run.stderr


def test_excel_contacts_with_dates_and_numbers(kilde_server: Server, tmp_path: Path) -> None:
    user = f"xl-{uuid.uuid4().hex[:8]}"
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Customers"
    sheet.append(["Customer ID", "Email", "First name", "Town", "Signed up", "Newsletter"])
    sheet.append([user, f"{user}@example.com", "Liv", "Tromsø", datetime(2024, 5, 17), 1])
    file = tmp_path / "crm.xlsx"
    book.save(file)
    code, summary, run = kilde_import(kilde_server, "contacts", file, "-s", "crm")
    assert code == 0, run.stderr
    assert summary is not None and summary["details"]["sheet"] == "Customers"
    [person] = events(kilde_server, source="crm", user_id=user)
    assert person["traits"] == {
        "email": f"{user}@example.com",
        "first_name": "Liv",
        "city": "Tromsø",
        "created_at": "2024-05-17T00:00:00.000Z",
        "newsletter": True,
    }

    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(file.read_bytes()[:300])
    code, _, run = kilde_import(kilde_server, "contacts", broken, "-s", "crm")
    assert code == 1
    assert "not a readable Excel workbook" in run.stderr
