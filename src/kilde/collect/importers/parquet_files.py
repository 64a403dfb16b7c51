"""Parquet files, read one record batch at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kilde.collect.importers.base import ImportFailed, Row, RowBatch


class ParquetReader:
    format = "parquet"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError):
            raise ImportFailed(
                "the file is not a readable Parquet file (truncated or another format?)",
                fix="export it again, or name the format with --format",
            ) from None
        self.columns = list(self._file.schema_arrow.names)
        self.total: int | None = self._file.metadata.num_rows
        self.details = {"format": "Parquet", "row groups": str(self._file.num_row_groups)}

    def batches(self, size: int) -> Iterator[RowBatch]:
        done = 0
        try:
            for record_batch in self._file.iter_batches(batch_size=size):
                rows = [
                    Row(done + index + 1, values)
                    for index, values in enumerate(record_batch.to_pylist())
                ]
                done += len(rows)
                yield RowBatch(rows=rows, position=done)
        except (pa.ArrowException, OSError):
            raise ImportFailed(
                f"the Parquet file cannot be read after row {done} (damaged or truncated)",
                fix="export it again; rows read so far are stored and a re-run is safe",
            ) from None

    def close(self) -> None:
        self._file.close()
