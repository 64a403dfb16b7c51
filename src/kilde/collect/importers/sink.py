"""The client side of an import: chunks to the admin API (of `kilde serve`, or in-process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

from kilde.client import Client
from kilde.collect.importers.engine import ChunkResult, RunInfo
from kilde.errors import KildeError

RETRIES = 8


class ApiSink:
    """Chunks to the admin API of the running server, or of the in-process one."""

    def __init__(self, client: Client, kind: str, source: str, dry_run: bool) -> None:
        self.client = client
        self.kind = kind
        self.source = source
        self.dry_run = dry_run

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        delay = 0.25
        for attempt in range(RETRIES):
            try:
                return self.client.post(
                    path,
                    content=orjson.dumps(body, default=str),
                    headers={"Content-Type": "application/json"},
                )
            except KildeError as exc:
                if "(503)" not in exc.message or attempt == RETRIES - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise KildeError("the server stayed busy", fix="try again later")

    def start(self, info: RunInfo) -> str | None:
        if info.dry_run:
            return None
        body = {
            "kind": info.kind,
            "source": info.source,
            "file_name": info.file_name,
            "file_format": info.file_format,
            "file_bytes": info.file_bytes,
            "tier": info.tier,
            "provenance": info.provenance,
        }
        return str(self._post("/api/imports", body)["id"])

    def send(
        self, records: list[dict[str, Any]], rejects: list[dict[str, Any]], preview: int
    ) -> ChunkResult:
        answer = self._post(
            "/api/imports/chunks",
            {
                "source": self.source,
                "kind": self.kind,
                "dry_run": self.dry_run,
                "preview": preview,
                "records": records,
                "rejects": rejects,
            },
        )
        return ChunkResult(
            stored=answer["stored"],
            duplicates=answer["duplicates"],
            flagged=answer["flagged"],
            suppressed=answer.get("suppressed", 0),
            withheld=answer.get("withheld", 0),
            rejected=answer["rejected"],
            preview=answer.get("preview") or [],
        )

    def send_columns(self, table: Any, info: dict[str, Any]) -> ChunkResult:
        """Order records as Arrow columns (the columnar path); the answer as for `send`."""
        table = table.replace_schema_metadata({"kilde": orjson.dumps(info)})
        delay = 0.25
        for attempt in range(RETRIES):
            try:
                answer = self.client.post(
                    "/api/imports/columns",
                    content=_arrow_stream(table),
                    headers={"Content-Type": "application/vnd.apache.arrow.stream"},
                )
                break
            except KildeError as exc:
                if "(503)" not in exc.message or attempt == RETRIES - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return ChunkResult(
            stored=answer["stored"],
            duplicates=answer["duplicates"],
            flagged=answer["flagged"],
            suppressed=answer.get("suppressed", 0),
            withheld=answer.get("withheld", 0),
            rejected=answer["rejected"],
        )

    def finish(self, run_id: str | None, summary: dict[str, Any]) -> None:
        if run_id is not None:
            self._post(f"/api/imports/{run_id}/finish", {"summary": summary})


class _Pieces:
    """A file to write to whose pieces are taken out as they come, not copied: the IPC
    writer hands over the columns' own buffers for the data, and small bytes between."""

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.closed = False

    def write(self, data: Any) -> int:
        self.pieces.append(data if isinstance(data, bytes) else memoryview(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> list[Any]:
        out, self.pieces = self.pieces, []
        return out


def _arrow_stream(table: Any) -> Iterator[Any]:
    """The table as an Arrow IPC stream of one record batch, made while it is sent.

    One batch: the server reads it without a copy, as the one chunk DuckDB writes as a whole
    row group (docs/imports-performance.md). The body is the table's own buffers, sent as
    they are, so it is never a second copy of the group here either."""
    import pyarrow as pa

    out = _Pieces()
    with pa.ipc.new_stream(out, table.schema) as stream:
        for batch in table.combine_chunks().to_batches():
            stream.write_batch(batch)
            yield from out.take()
    yield from out.take()  # the end-of-stream marker
