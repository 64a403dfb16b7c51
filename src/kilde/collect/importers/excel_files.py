"""Excel workbooks (.xlsx), streamed row by row with openpyxl's read-only mode."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kilde.collect.importers.base import ImportFailed, Row, RowBatch
from kilde.collect.importers.csv_files import unique_names


class ExcelReader:
    format = "excel"

    def __init__(self, path: Path, *, sheet: str | None = None) -> None:
        from openpyxl import load_workbook

        self.path = path
        try:
            self._book = load_workbook(path, read_only=True, data_only=True)
        except (zipfile.BadZipFile, KeyError, OSError, ValueError):
            raise ImportFailed(
                "the file is not a readable Excel workbook (.xlsx); truncated or another format?",
                fix="save it again as .xlsx, or export CSV",
            ) from None
        if sheet is not None and sheet not in self._book.sheetnames:
            raise ImportFailed(
                f"the workbook has no sheet named {sheet!r}",
                fix="use one of: " + ", ".join(self._book.sheetnames),
            )
        self._sheet = self._book[sheet] if sheet else self._book.worksheets[0]
        self._rows: Iterator[tuple[Any, ...]] = self._sheet.iter_rows(values_only=True)
        self._line = 0
        self.columns = self._read_header()
        max_row = self._sheet.max_row
        self.total: int | None = max_row if isinstance(max_row, int) and max_row > 1 else None
        self.details = {"format": "Excel", "sheet": str(self._sheet.title)}

    def _read_header(self) -> list[str]:
        for values in self._rows:
            self._line += 1
            if any(v is not None and str(v).strip() for v in values):
                while values and (values[-1] is None or not str(values[-1]).strip()):
                    values = values[:-1]
                return unique_names(["" if v is None else str(v) for v in values])
        raise ImportFailed("the sheet is empty", fix="put the column names in the first row")

    def batches(self, size: int) -> Iterator[RowBatch]:
        columns = self.columns
        width = len(columns)
        batch = RowBatch()
        for values in self._rows:
            self._line += 1
            if not any(v is not None and v != "" for v in values):
                continue
            cells = list(values[:width]) + [None] * (width - len(values))
            batch.rows.append(Row(self._line, dict(zip(columns, cells, strict=True))))
            if len(batch.rows) >= size:
                batch.position = self._line
                yield batch
                batch = RowBatch()
        batch.position = self.total or self._line
        yield batch

    def close(self) -> None:
        self._book.close()
