"""Bought data lives only as long as its licence: retention deletes it once the licence expired.

The licence of an imported broker file runs until a date; the importer refuses a file whose
licence already ended. To see the day after the expiry without waiting for it, the test stops
the server and moves the licence date of the stored records into the past, as time would, then
starts the server again and runs retention as a user does (`kilde privacy retain`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import orjson

from tests.conftest import Server, start_server
from tests.import_support import SAMPLES, events, kilde_import, write
from tests.privacy_support import api, refresh_profiles


def profile_text(server: Server, email: str) -> str:
    """The profile of the person with this address, as the API shows it ("" if none)."""
    found = api(server, "POST", "/api/profiles/lookup", json={"email": email}).json()
    if not found["profiles"]:
        return ""
    return api(server, "GET", f"/api/profiles/{found['profiles'][0]['profile_id']}").text


def test_broker_records_are_deleted_when_their_licence_expires(
    own_server: Server, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    text = (SAMPLES / "broker-nordic-data.csv").read_text().replace("@example", f"@{tag}.example")
    file = write(tmp_path / "nordic-data.csv", text)
    today = datetime.now(UTC).date()
    code, summary, run = kilde_import(
        own_server,
        "broker",
        file,
        "-s",
        "databroker",
        "-m",
        str(SAMPLES / "broker.mapping.yaml"),
        "--licence-expires",
        today.isoformat(),  # still valid today
    )
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 3
    # First-party data about one of the same people stays whatever happens to bought data.
    contacts = write(
        tmp_path / "crm.csv", f"email,first_name\ningrid.hansen0@{tag}.example.com,Ingrid\n"
    )
    code, _, run = kilde_import(own_server, "contacts", contacts, "-s", "crm")
    assert code == 0, run.stderr
    refresh_profiles(own_server)
    email = f"ingrid.hansen0@{tag}.example.com"
    assert len(events(own_server, source="databroker")) == 3
    assert "household_size" in profile_text(own_server, email)
    # Today the licence still runs: retention keeps the bought records.
    kept = orjson.loads(own_server.kilde("privacy", "retain", "--json").stdout)
    assert not any(e["event"] == "broker data (licence expired)" for e in kept["events"])
    assert len(events(own_server, source="databroker")) == 3

    # A day later, as far as the store can tell.
    own_server.stop()
    yesterday = (today - timedelta(days=1)).isoformat()
    with duckdb.connect(str(own_server.data_dir / "kilde.duckdb")) as con:
        con.execute(
            "UPDATE events SET context = json_merge_patch(context, json_object('provenance', "
            "json_object('licence_expires_on', ?))) WHERE source = 'databroker'",
            [yesterday],
        )
    server = start_server(own_server.data_dir, own_server.plan_path)
    try:
        report = orjson.loads(server.kilde("privacy", "retain", "--json").stdout)
        broker = next(e for e in report["events"] if e["event"] == "broker data (licence expired)")
        assert broker["expired"] == 3
        assert events(server, source="databroker") == []
        assert len(events(server, source="crm")) == 1  # first-party data stays
        again = orjson.loads(server.kilde("privacy", "retain", "--json").stdout)
        assert not any(e["event"] == "broker data (licence expired)" for e in again["events"])
        # Nothing bought is left on the profile either; what the company knew itself is.
        refresh_profiles(server)
        profile = profile_text(server, email)
        assert profile and "crm" in profile
        assert "household_size" not in profile and "income_band" not in profile
    finally:
        server.stop()
