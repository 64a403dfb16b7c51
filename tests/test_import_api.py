"""The importers' admin API: chunks, runs and uploads for the dashboard."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.conftest import Server
from tests.import_support import SAMPLES, events, get, post, request


def _wait(server: Server, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run: dict[str, Any] = get(f"{server.url}/api/imports/{run_id}", headers=server.admin).json()
        if run["status"] != "running":
            return run
        time.sleep(0.2)
    raise AssertionError("the import did not finish")


def test_the_import_endpoints_need_the_admin_token(kilde_server: Server) -> None:
    for method, path in (
        ("POST", "/api/imports/chunks"),
        ("POST", "/api/imports"),
        ("GET", "/api/imports"),
        ("POST", "/api/imports/uploads?filename=a.csv"),
    ):
        answer = request(method, f"{kilde_server.url}{path}", json={})
        assert answer.status_code == 401, path
        assert answer.json()["error"] == "missing_admin_token"


def test_bad_chunks_get_a_4xx_with_the_fix(kilde_server: Server) -> None:
    url = f"{kilde_server.url}/api/imports/chunks"
    cases: list[tuple[Any, int, str]] = [
        ([1, 2], 400, "invalid_chunk"),
        ({"source": "crm", "kind": "recipes", "records": []}, 400, "invalid_chunk"),
        ({"source": "crm", "kind": "contacts", "records": {}}, 400, "invalid_chunk"),
        ({"source": "nope", "kind": "contacts", "records": []}, 422, "import_failed"),
        ({"source": "crm", "kind": "broker", "records": []}, 422, "import_failed"),
    ]
    for body, status, code in cases:
        answer = post(url, json=body, headers=kilde_server.admin)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"] == code and answer.json()["fix"]
    broken = post(url, content=b"{not json", headers=kilde_server.admin)
    assert broken.status_code == 400 and broken.json()["error"] == "malformed_json"


def test_a_bad_column_chunk_gets_a_400_with_the_fix(kilde_server: Server) -> None:
    """The columnar path's endpoint: a body that is not an Arrow stream of import records."""
    import pyarrow as pa

    url = f"{kilde_server.url}/api/imports/columns"
    headers = {**kilde_server.admin, "Content-Type": "application/vnd.apache.arrow.stream"}
    out = pa.BufferOutputStream()
    table = pa.table({"line": pa.array([2], pa.int64())})
    with pa.ipc.new_stream(out, table.schema) as stream:  # no import information, one column
        stream.write_table(table)
    unlabelled = out.getvalue().to_pybytes()
    # garbage; a stream without import information; one cut short within its message body
    for body in (b"not arrow at all", unlabelled, unlabelled[:-12]):
        answer = post(url, content=body, headers=headers)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_chunk" and answer.json()["fix"]


def test_an_uploaded_file_is_imported_in_the_background(kilde_server: Server) -> None:
    prefix = f"u{uuid.uuid4().hex[:6]}"
    text = (SAMPLES / "orders.csv").read_text().replace("o-10", f"{prefix}-")
    text += f"{prefix}-09,,,2026-09-30,X,Y,Z,1,1,1,NOK,completed\n"  # nobody: rejected
    uploaded = post(
        f"{kilde_server.url}/api/imports/uploads",
        params={"filename": "../../orders export.csv"},
        content=text.encode(),
        headers=kilde_server.admin,
    ).json()
    assert uploaded["file_name"] == "orders_export.csv"
    assert uploaded["bytes"] == len(text.encode())

    checked = post(
        f"{kilde_server.url}/api/imports/uploads/{uploaded['upload_id']}/run",
        json={"kind": "transactions", "source": "shop-orders", "dry_run": True},
        headers=kilde_server.admin,
    )
    assert checked.status_code == 202
    assert checked.json()["summary"]["stored"] == 4 and checked.json()["run_id"] is None

    started = post(
        f"{kilde_server.url}/api/imports/uploads/{uploaded['upload_id']}/run",
        json={"kind": "transactions", "source": "shop-orders"},
        headers=kilde_server.admin,
    )
    assert started.status_code == 202, started.text
    run = _wait(kilde_server, started.json()["run_id"])
    assert (run["status"], run["stored"], run["rejected"]) == ("done", 4, 1)
    assert run["summary"]["first_errors"][0]["error"] == "missing_identifier"
    stored = [
        e
        for e in events(kilde_server, source="shop-orders")
        if e["properties"]["order_id"].startswith(prefix)
    ]
    assert len(stored) == 4
    rejects = get(f"{kilde_server.url}/api/imports/{run['id']}/rejects", headers=kilde_server.admin)
    assert rejects.status_code == 200
    assert rejects.text.splitlines()[0] == "line,end_line,column,error,reason,fix"
    assert rejects.text.splitlines()[1].startswith("7,,,missing_identifier,")

    listed = get(
        f"{kilde_server.url}/api/imports",
        params={"source": "shop-orders"},
        headers=kilde_server.admin,
    ).json()["imports"]
    assert run["id"] in [r["id"] for r in listed]


def test_an_upload_that_does_not_exist_or_a_bad_mapping(kilde_server: Server) -> None:
    missing = post(
        f"{kilde_server.url}/api/imports/uploads/up_00000000000000000000/run",
        json={"kind": "contacts", "source": "crm"},
        headers=kilde_server.admin,
    )
    assert missing.status_code == 404 and missing.json()["success"] is False
    uploaded = post(
        f"{kilde_server.url}/api/imports/uploads",
        params={"filename": "crm.csv"},
        content=(SAMPLES / "crm-contacts.csv").read_bytes(),
        headers=kilde_server.admin,
    ).json()
    bad = post(
        f"{kilde_server.url}/api/imports/uploads/{uploaded['upload_id']}/run",
        json={"kind": "contacts", "source": "crm", "mapping": {"colums": {}}},
        headers=kilde_server.admin,
    )
    assert bad.status_code == 422
    assert "colums" in bad.json()["message"] and bad.json()["fix"]
