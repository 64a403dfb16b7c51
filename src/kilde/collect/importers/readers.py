"""Opening a file for import: which format it is, and the reader for that format."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kilde.collect.importers.base import ImportFailed, Reader

Format = Literal["csv", "jsonl", "parquet", "excel"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl", "parquet", "excel")
_EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".tab": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".xlsx": "excel",
    ".xlsm": "excel",
}


def detect_format(path: Path) -> Format:
    by_name = _EXTENSIONS.get(path.suffix.lower())
    if by_name:
        return by_name
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        return "parquet"
    if head.startswith(b"PK"):
        return "excel"
    if head.lstrip()[:1] == b"{":
        return "jsonl"
    return "csv"


def open_reader(
    path: Path,
    *,
    format: str | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    sheet: str | None = None,
) -> Reader:
    if not path.is_file():
        raise ImportFailed(f"there is no file at {path}", fix="check the path")
    chosen = format or detect_format(path)
    if chosen == "csv":
        from kilde.collect.importers.csv_files import CsvReader

        return CsvReader(path, encoding=encoding, delimiter=delimiter)
    if chosen == "jsonl":
        from kilde.collect.importers.jsonl_files import JsonLinesReader

        return JsonLinesReader(path)
    if chosen == "parquet":
        from kilde.collect.importers.parquet_files import ParquetReader

        return ParquetReader(path)
    if chosen == "excel":
        from kilde.collect.importers.excel_files import ExcelReader

        return ExcelReader(path, sheet=sheet)
    raise ImportFailed(
        f"{chosen!r} is not a format Kilde imports", fix="use one of: " + ", ".join(FORMATS)
    )
