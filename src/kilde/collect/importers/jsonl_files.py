"""JSON Lines: one JSON object per line. Nested objects are read with dotted column names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from kilde.collect.importers.base import ImportFailed, Row, RowBatch, RowError

PEEK_ROWS = 200


def flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"customer": {"email": ...}} -> {"customer.email": ...}; lists stay as they are."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            flat.update(flatten(item, name + "."))
        else:
            flat[name] = item
    return flat


class JsonLinesReader:
    format = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.total: int | None = path.stat().st_size
        self.details = {"format": "JSON Lines", "encoding": "utf-8"}
        self._handle = path.open("rb")
        self.columns = self._peek_columns()

    def _peek_columns(self) -> list[str]:
        columns: dict[str, None] = {}
        for count, raw in enumerate(self._handle):
            if count >= PEEK_ROWS:
                break
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                columns.update(dict.fromkeys(flatten(value)))
        self._handle.seek(0)
        if not columns:
            raise ImportFailed(
                "no JSON object was found in the first lines of the file",
                fix="JSON Lines files hold one JSON object per line",
            )
        return list(columns)

    def batches(self, size: int) -> Iterator[RowBatch]:
        batch = RowBatch()
        line = 0
        for raw in self._handle:
            line += 1
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                truncated = not raw.endswith(b"\n")
                batch.errors.append(
                    RowError(
                        line,
                        None,
                        "truncated_row" if truncated else "invalid_json",
                        "the file ends in the middle of this line"
                        if truncated
                        else "the line is not valid JSON (or not UTF-8)",
                        "export or copy the file again"
                        if truncated
                        else "write one complete JSON object per line, in UTF-8",
                    )
                )
            else:
                if isinstance(value, dict):
                    batch.rows.append(Row(line, flatten(value)))
                else:
                    batch.errors.append(
                        RowError(
                            line,
                            None,
                            "not_an_object",
                            "the line is JSON but not an object",
                            'write one object per line, like {"email": ...}',
                        )
                    )
            if len(batch.rows) + len(batch.errors) >= size:
                batch.position = self._handle.tell()
                yield batch
                batch = RowBatch()
        batch.position = self.total or 0
        yield batch

    def close(self) -> None:
        self._handle.close()
