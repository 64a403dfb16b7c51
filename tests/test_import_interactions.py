"""`kilde import interactions`: tickets, chats, calls and meetings with their sentiment."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson

from tests.conftest import Server
from tests.import_support import SAMPLES, events, kilde_import, write


def _tickets(tmp_path: Path, prefix: str, long_notes: str) -> Path:
    lines = (SAMPLES / "tickets.jsonl").read_text().replace("T-900", f"{prefix}-").splitlines()
    extra = {
        "ticket_id": f"{prefix}-4",
        "requester": {"email": "lars.berg@example.com"},
        "created_at": "2026-09-16T10:00:00Z",
        "channel": "meeting",
        "subject": "Renewal of the club agreement",
        "description": long_notes,
        "team": "Sales",
    }
    return write(tmp_path / "tickets.jsonl", "\n".join([*lines, orjson.dumps(extra).decode()]))


def test_tickets_get_a_sentiment_and_keep_only_the_text_the_plan_allows(
    kilde_server: Server, tmp_path: Path
) -> None:
    prefix = f"T{uuid.uuid4().hex[:6]}"
    notes = "Excellent meeting, they are happy with us. " * 20
    file = _tickets(tmp_path, prefix, notes)
    code, summary, run = kilde_import(
        kilde_server,
        "interactions",
        file,
        "-s",
        "support",
        "-m",
        str(SAMPLES / "tickets.mapping.yaml"),
    )
    assert code == 0, run.stderr
    assert summary is not None and summary["stored"] == 4
    stored = {
        e["properties"]["interaction_id"]: e
        for e in events(kilde_server, source="support")
        if e["properties"]["interaction_id"].startswith(prefix)
    }
    broken_pole = stored[f"{prefix}-1"]
    assert broken_pole["event"] == "Support Interaction"
    assert broken_pole["properties"]["channel"] == "email"
    assert broken_pole["properties"]["topic"] == "Tent pole broke on first trip"
    assert broken_pole["properties"]["sentiment_label"] == "negative"
    assert -1 <= broken_pole["properties"]["sentiment_score"] < -0.05
    assert broken_pole["properties"]["sentiment_model"] == "vader"
    # The plan declares no text for support interactions: none of it is stored.
    assert "text" not in broken_pole["properties"]
    assert "disappointed" not in orjson.dumps(broken_pole).decode()

    club = stored[f"{prefix}-3"]
    assert club["event"] == "Sales Interaction"
    assert club["properties"]["sentiment_label"] == "positive"
    assert club["properties"]["text"].startswith("Great call.")
    # Sales notes are kept, but only the first 280 characters the plan allows.
    renewal = stored[f"{prefix}-4"]
    assert renewal["properties"]["text"] == notes[:280]
    assert renewal["properties"]["sentiment_score"] > 0.5

    code, again, _ = kilde_import(
        kilde_server,
        "interactions",
        file,
        "-s",
        "support",
        "-m",
        str(SAMPLES / "tickets.mapping.yaml"),
    )
    assert again is not None and (again["stored"], again["duplicates"]) == (0, 4)


def test_another_sentiment_model_can_be_plugged_in(kilde_server: Server, tmp_path: Path) -> None:
    ticket = f"P{uuid.uuid4().hex[:8]}"
    file = write(
        tmp_path / "calls.csv",
        "call_id,email,started_at,notes\n"
        f"{ticket},ida.lie@example.com,2026-09-20 14:00,The order was late again.\n",
    )
    mapping = write(
        tmp_path / "calls.yaml",
        "kind: interactions\nsentiment: tests.import_support:fixed_analyzer\n",
    )
    code, _, run = kilde_import(
        kilde_server, "interactions", file, "-s", "support", "-m", str(mapping)
    )
    assert code == 0, run.stderr
    [call] = [
        e
        for e in events(kilde_server, source="support")
        if e["properties"].get("interaction_id") == ticket
    ]
    assert call["properties"]["sentiment_score"] == 0.5
    assert call["properties"]["sentiment_model"] == "fixed-test-model"

    unknown = write(tmp_path / "bad.yaml", "sentiment: no.such.module:factory\n")
    code, _, run = kilde_import(
        kilde_server, "interactions", file, "-s", "support", "-m", str(unknown)
    )
    assert code == 1
    assert "could not be imported" in run.stderr
