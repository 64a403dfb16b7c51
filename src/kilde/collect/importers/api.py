"""HTTP endpoints of the importers.

Admin API (bearer admin token), used by `kilde import` and, later, the dashboard:
- POST /api/imports                     start a run (kind, source, file, broker terms)
- POST /api/imports/chunks              a chunk of records (and unreadable rows) into the pipeline
- POST /api/imports/{run}/finish        the run's summary
- GET  /api/imports, /api/imports/{run} runs and their summaries
- POST /api/imports/uploads?filename=   upload a file (the raw body), for a server-side import
- POST /api/imports/uploads/{id}/run    import an uploaded file in the background
- GET  /api/imports/{run}/rejects       the reject file of a server-side import

Collection API (the source's write key, like /v1/identify):
- POST /v1/social-login                 OpenID Connect claims from a social login
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response

from kilde.collect import segment_api
from kilde.collect.importers.base import KINDS, Kind
from kilde.collect.importers.engine import ChunkResult, RunInfo, run_import
from kilde.collect.importers.mapping import parse_mapping
from kilde.collect.importers.runs import (
    Services,
    finish_run,
    ingest_chunk,
    run_row,
    source_for,
    start_run,
)
from kilde.collect.importers.social_login import ClaimsProblem, claims_message
from kilde.errors import KildeError
from kilde.pipeline import Envelope, Pipeline
from kilde.store.writer import StoreUnavailableError
from kilde.thread_names import NamedThread
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem, JsonResponse

router = APIRouter()
_admin = [Depends(require_admin)]
MAX_CHUNK_BYTES = 64 * 1024 * 1024
MAX_CHUNK_RECORDS = 20_000
MAX_UPLOAD_BYTES = 20 * 1024 * 1024 * 1024
_UPLOAD_ID = re.compile(r"^up_[0-9a-f]{20}$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._\-]+")


def services(request: Request) -> Services:
    state = request.app.state
    return Services(state.pipeline, state.store, state.writer)


def _problem(exc: KildeError, status: int = 422, code: str = "import_failed") -> HttpProblem:
    return HttpProblem(status, code, exc.message, exc.fix or "see docs/importing.md")


# -- runs and chunks ----------------------------------------------------------------------------


class StartBody(BaseModel):
    kind: Kind
    source: str
    file_name: str = Field(max_length=500)
    file_format: str = "csv"
    file_bytes: int = 0
    tier: Literal["first_party", "broker"] = "first_party"
    provenance: dict[str, Any] = Field(default_factory=dict)


@router.post("/api/imports", dependencies=_admin)
def start(request: Request, body: StartBody) -> dict[str, Any]:
    info = RunInfo(
        body.kind,
        body.source,
        body.file_name,
        body.file_format,
        body.file_bytes,
        body.tier,
        body.provenance,
        False,
    )
    try:
        run_id = start_run(services(request), info)
    except KildeError as exc:
        raise _problem(exc) from None
    return {"id": run_id}


async def _read_json(request: Request, limit: int) -> Any:
    size = 0
    parts: list[bytes] = []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise HttpProblem(
                413,
                "payload_too_large",
                f"the body is larger than {limit // (1024 * 1024)} MB",
                "send smaller chunks",
            )
        parts.append(part)
    try:
        return orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        raise HttpProblem(
            400, "malformed_json", "the body is not valid JSON", "send one JSON object"
        ) from None


def _chunk_fields(body: Any) -> tuple[str, str, list[Any], list[dict[str, Any]], bool, int]:
    def bad(path: str, message: str) -> HttpProblem:
        return HttpProblem(
            400,
            "invalid_chunk",
            message,
            'send {"source": ..., "kind": ..., "records": [...], "rejects": [...]}',
            path=path,
        )

    if not isinstance(body, dict):
        raise bad("", "the body must be a JSON object")
    source, kind = body.get("source"), body.get("kind")
    records, rejects = body.get("records", []), body.get("rejects", [])
    if not isinstance(source, str):
        raise bad("source", "source must be the name of a source in the plan")
    if kind not in KINDS:
        raise bad("kind", "kind must be one of " + ", ".join(KINDS))
    if not isinstance(records, list):
        raise bad("records", "records must be a list of messages")
    if len(records) > MAX_CHUNK_RECORDS:
        raise HttpProblem(
            413,
            "too_many_records",
            f"a chunk holds at most {MAX_CHUNK_RECORDS} records",
            "send smaller chunks",
            path="records",
        )
    if not isinstance(rejects, list) or not all(isinstance(r, dict) for r in rejects):
        raise bad("rejects", "rejects must be a list of objects")
    preview = body.get("preview", 0)
    preview = preview if isinstance(preview, int) and 0 <= preview <= 100 else 0
    return source, str(kind), records, rejects, bool(body.get("dry_run")), preview


@router.post("/api/imports/chunks", dependencies=_admin)
async def chunk(request: Request) -> Response:
    """Records of one chunk go through the pipeline; with dry_run nothing is written."""
    source, kind, records, rejects, dry_run, preview = _chunk_fields(
        await _read_json(request, MAX_CHUNK_BYTES)
    )
    return await _answer(
        True,
        ingest_chunk,
        services(request),
        source_name=source,
        kind=kind,
        records=records,
        rejects=rejects,
        dry_run=dry_run,
        preview=preview,
    )


async def _answer(
    with_preview: bool, ingest: Callable[..., ChunkResult], *args: Any, **kwargs: Any
) -> Response:
    """Run one chunk's ingest off the event loop and answer with its counts."""
    try:
        result: ChunkResult = await run_in_threadpool(ingest, *args, **kwargs)
    except StoreUnavailableError as exc:
        raise HttpProblem(
            503, "store_busy", exc.message, "retry with backoff", headers={"Retry-After": "1"}
        ) from None
    except KildeError as exc:
        raise _problem(exc) from None
    except ValueError as exc:  # a column the columnar path cannot take as it is
        raise HttpProblem(400, "invalid_chunk", str(exc), "import orders this way") from None
    answer = {
        "success": True,
        "stored": result.stored,
        "duplicates": result.duplicates,
        "flagged": result.flagged,
        "suppressed": result.suppressed,
        "withheld": result.withheld,
        "rejected": result.rejected,
    }
    if with_preview:
        answer["preview"] = result.preview
    return JsonResponse(answer)


MAX_COLUMN_BYTES = 256 * 1024 * 1024


@router.post("/api/imports/columns", dependencies=_admin)
async def columns(request: Request) -> Response:
    """Order records as an Arrow IPC stream (the columnar path of `kilde import`)."""
    import pyarrow as pa

    from kilde.collect.importers.columnar_ingest import ingest_columns

    # The body grows in place as it arrives: no list of pieces joined into a second copy.
    body = bytearray()
    async for part in request.stream():
        if len(body) + len(part) > MAX_COLUMN_BYTES:
            raise HttpProblem(
                413, "payload_too_large", "the body is larger than 256 MB", "send smaller chunks"
            )
        body += part
    try:
        with pa.ipc.open_stream(pa.py_buffer(body)) as stream:
            # One chunk, as the writer hands it to DuckDB. `kilde import` sends one record
            # batch, whose columns are read where they are, in the body (no copy); several
            # batches are combined into one, a copy.
            table = stream.read_all().combine_chunks()
        del body  # the table holds what it uses of it
        info = orjson.loads((table.schema.metadata or {}).get(b"kilde", b"null"))
        if not isinstance(info, dict) or not isinstance(info.get("source"), str):
            raise ValueError("no import information")
        from kilde.collect.importers.columnar import RECORD_SCHEMA

        table = table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
        info = {
            "source": info["source"],
            "kind": str(info.get("kind")),
            "tier": str(info.get("tier") or "first_party"),
            "file": str(info.get("file") or ""),
            "run_id": info.get("run_id") if isinstance(info.get("run_id"), str) else None,
            "provenance": info.get("provenance")
            if isinstance(info.get("provenance"), dict)
            else {},
        }
    # OSError: a stream cut short within a message body (pyarrow's IOError, not ArrowException)
    except (pa.ArrowException, OSError, ValueError, KeyError, orjson.JSONDecodeError):
        raise HttpProblem(
            400,
            "invalid_chunk",
            "the body is not an Arrow stream of import records",
            "send the columns kilde import sends (see docs/imports-performance.md)",
        ) from None
    return await _answer(
        False,
        ingest_columns,
        services(request),
        source_name=info["source"],
        kind=info["kind"],
        table=table,
        info=info,
    )


class FinishBody(BaseModel):
    summary: dict[str, Any]


@router.post("/api/imports/{run_id}/finish", dependencies=_admin)
def finish(request: Request, run_id: str, body: FinishBody) -> dict[str, Any]:
    svc = services(request)
    if run_row(svc, run_id) is None:
        raise _no_run()
    finish_run(svc, run_id, body.summary)
    return {"finished": True}


def _no_run() -> HttpProblem:
    return HttpProblem(
        404, "not_found", "there is no import run with that id", "list them with GET /api/imports"
    )


@router.get("/api/imports", dependencies=_admin)
def runs(
    request: Request,
    source: str | None = None,
    limit: int = Query(50, ge=1, le=500),
) -> dict[str, Any]:
    where, params = ("WHERE source = ?", [source]) if source else ("", [])
    rows = services(request).store.query(
        "SELECT id, kind, source, file_name, tier, broker, licence_expires_on, started_at, "
        f"finished_at, status, rows_read, stored, duplicates, rejected FROM import_runs {where} "
        "ORDER BY started_at DESC LIMIT ?",
        [*params, limit],
    )
    return {"imports": rows}


@router.get("/api/imports/{run_id}", dependencies=_admin)
def run(request: Request, run_id: str) -> dict[str, Any]:
    row = run_row(services(request), run_id)
    if row is None:
        raise _no_run()
    return row


# -- uploads (for the dashboard) ----------------------------------------------------------------


def _uploads(request: Request) -> Path:
    path: Path = request.app.state.settings.data_dir / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


@router.post("/api/imports/uploads", dependencies=_admin)
async def upload(request: Request, filename: str = Query(..., max_length=200)) -> dict[str, Any]:
    """Store the raw request body as a file to import; answers its upload id."""
    upload_id = "up_" + uuid.uuid4().hex[:20]
    name = _SAFE_NAME.sub("_", Path(filename).name).strip("._") or "upload"
    folder = _uploads(request) / upload_id
    folder.mkdir()
    target = folder / name
    size = 0
    with target.open("wb") as handle:
        async for part in request.stream():
            size += len(part)
            if size > MAX_UPLOAD_BYTES:
                handle.close()
                target.unlink()
                raise HttpProblem(
                    413, "payload_too_large", "the file is too large", "split the file"
                )
            handle.write(part)
    return {"upload_id": upload_id, "file_name": name, "bytes": size}


class UploadRunBody(BaseModel):
    kind: Kind
    source: str
    mapping: dict[str, Any] = Field(default_factory=dict)
    dry_run: bool = False


class LocalSink:
    """Chunks of a server-side import, handed to the same functions the endpoints use."""

    def __init__(self, svc: Services, kind: str, source: str, dry_run: bool) -> None:
        self.svc = svc
        self.kind = kind
        self.source = source
        self.dry_run = dry_run
        self.run_id: str | None = None
        self.started = threading.Event()

    def start(self, info: RunInfo) -> str | None:
        self.run_id = None if info.dry_run else start_run(self.svc, info)
        self.started.set()
        return self.run_id

    def send(
        self, records: list[dict[str, Any]], rejects: list[dict[str, Any]], preview: int
    ) -> ChunkResult:
        return ingest_chunk(
            self.svc,
            source_name=self.source,
            kind=self.kind,
            records=records,
            rejects=rejects,
            dry_run=self.dry_run,
            preview=preview,
        )

    def send_columns(self, table: Any, info: dict[str, Any]) -> ChunkResult:
        from kilde.collect.importers.columnar_ingest import ingest_columns

        return ingest_columns(
            self.svc, source_name=self.source, kind=self.kind, table=table, info=info
        )

    def finish(self, run_id: str | None, summary: dict[str, Any]) -> None:
        if run_id is not None:
            finish_run(self.svc, run_id, summary)


@router.post("/api/imports/uploads/{upload_id}/run", dependencies=_admin, status_code=202)
def run_upload(request: Request, upload_id: str, body: UploadRunBody) -> dict[str, Any]:
    """Import an uploaded file in the background; poll GET /api/imports/{id} for the result."""
    if not _UPLOAD_ID.match(upload_id):
        raise HttpProblem(404, "not_found", "there is no such upload", "upload the file first")
    folder = _uploads(request) / upload_id
    files = (
        [p for p in folder.iterdir() if p.is_file() and p.name != "rejects.csv"]
        if folder.is_dir()
        else []
    )
    if not files:
        raise HttpProblem(404, "not_found", "there is no such upload", "upload the file first")
    svc = services(request)
    pipeline: Pipeline = svc.pipeline
    try:
        mapping = parse_mapping(body.mapping or {}, "mapping")
        source_for(svc, body.source, body.kind)
    except KildeError as exc:
        raise _problem(exc) from None
    sink = LocalSink(svc, body.kind, body.source, body.dry_run)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            summary = run_import(
                files[0],
                kind=body.kind,
                source=body.source,
                plan=pipeline.plan,
                mapping=mapping,
                sink=sink,
                dry_run=body.dry_run,
                reject_path=folder / "rejects.csv",
            )
            outcome["summary"] = summary.as_dict()
        except KildeError as exc:
            outcome["error"] = exc
        finally:
            sink.started.set()

    thread = NamedThread(target=work, name=f"kilde-upload-{upload_id}", daemon=True)
    thread.start()
    sink.started.wait(timeout=60)
    if body.dry_run:
        thread.join()
    error = outcome.get("error")
    if isinstance(error, KildeError):
        raise _problem(error)
    return {"run_id": sink.run_id, "summary": outcome.get("summary")}


@router.get("/api/imports/{run_id}/rejects", dependencies=_admin)
def rejects(request: Request, run_id: str) -> Response:
    row = run_row(services(request), run_id)
    if row is None:
        raise _no_run()
    uploads = _uploads(request).resolve()
    recorded = (row.get("summary") or {}).get("reject_file")
    if isinstance(recorded, str):
        candidate = Path(recorded).resolve()
        if candidate.is_relative_to(uploads) and candidate.is_file():
            return FileResponse(candidate, media_type="text/csv", filename=f"{run_id}-rejects.csv")
    raise HttpProblem(
        404,
        "not_found",
        "this import has no reject file",
        "only imports with rejected rows have one",
    )


# -- social login -------------------------------------------------------------------------------


@router.post("/v1/social-login")
async def social_login(request: Request) -> Response:
    """OIDC claims of a social login, sent by the company's backend with a write key.

    Body: {"provider": "google", "claims": {"sub": ..., "email": ..., ...},
    "userId": optional, "anonymousId": optional, "timestamp": optional}
    """
    segment_api.check_content_type(request)
    header_key = segment_api.basic_auth_key(request)
    source = segment_api.resolve_source(request, header_key) if header_key else None
    raw = await segment_api.read_body(request, segment_api.MAX_EVENT_BYTES)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HttpProblem(
            400, "malformed_json", "the body is not valid JSON", "send one JSON object"
        ) from None
    if not isinstance(body, dict):
        raise HttpProblem(400, "invalid_body", "the body must be a JSON object", "send an object")
    if source is None:
        key = body.get("writeKey")
        source = segment_api.resolve_source(request, key if isinstance(key, str) else None)
    provider, claims = body.get("provider"), body.get("claims")
    if not isinstance(provider, str) or not isinstance(claims, dict):
        raise HttpProblem(
            400,
            "invalid_body",
            "provider (a string) and claims (an object) are required",
            'send {"provider": "google", "claims": {"sub": "...", "email": "..."}}',
        )
    ids = {k: body.get(k) for k in ("userId", "anonymousId", "timestamp")}
    if not all(v is None or isinstance(v, str) for v in ids.values()):
        raise HttpProblem(
            400, "invalid_field", "userId, anonymousId and timestamp must be strings", "fix them"
        )
    pipeline: Pipeline = request.app.state.pipeline
    try:
        message, left_out = claims_message(
            plan=pipeline.plan,
            source=source.name,
            provider=provider,
            claims=claims,
            user_id=ids["userId"],
            anonymous_id=ids["anonymousId"],
            timestamp=ids["timestamp"],
        )
    except ClaimsProblem as problem:
        raise HttpProblem(
            400, "invalid_claims", problem.reason, problem.fix, path=f"claims.{problem.field}"
        ) from None
    env = Envelope(
        received_at=datetime.now(UTC),
        channel="social_login",
        ip=segment_api.client_ip(request),
        user_agent=request.headers.get("user-agent"),
    )
    try:
        result = await pipeline.ingest([message], source, env, "identify")
    except StoreUnavailableError as exc:
        raise HttpProblem(
            503, "store_busy", exc.message, "retry with backoff", headers={"Retry-After": "1"}
        ) from None
    outcome = result.outcomes[0]
    if outcome.status == "dead_lettered":
        return JsonResponse(
            {
                "success": False,
                "error": outcome.code,
                "message": outcome.reason,
                "path": outcome.path,
                "fix": outcome.fix,
                "dead_letter_id": outcome.dead_letter_id,
            },
            status_code=400,
        )
    return JsonResponse(
        {
            "success": True,
            "userId": message["userId"],
            "externalId": "{type}:{id}".format(**message["context"]["externalIds"][0]),
            "traits": sorted(message["traits"]),
            "left_out": left_out,
            "stored": result.stored,
            "duplicates": result.duplicates,
        }
    )
