"""The acknowledgement log: answered events are readable at once and survive a crash.

The writer answers a group of plain events once it is synced to the log; its applier inserts
the groups into DuckDB later, several in one commit (kilde.store.ack_log, kilde.store.writer).
These tests hold the applier back (a long `apply_after`), so that what they check depends on
the log and the read barrier, not on the applier having been quick.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zlib
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from kilde.store import Store, WriteBatch, Writer
from kilde.store.ack_log import HEADER, log_dir

HOLD = 3600.0  # seconds the applier would wait for more rows before inserting


def _events(user: str, count: int, prefix: str) -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [
        {
            "message_id": f"{prefix}-{number}",
            "source": "web",
            "type": "track",
            "event": "Product Viewed",
            "user_id": user,
            "timestamp": now,
            "received_at": now,
            "properties": "{}",
            "plan_status": "ok",
        }
        for number in range(count)
    ]


def _full_row() -> dict[str, object]:
    """An events row with every column set, and text a JSON log could get wrong."""
    row: dict[str, object] = {name: f'{name} æøå "quoted"\nnext line \u2028' for name in _TEXT}
    row.update(
        properties='{"price": 3490.0, "note": "line\\nbreak", "tags": ["a", "b"]}',
        traits='{"email": "ada@example.com"}',
        context='{"page": {"path": "/p"}}',
        integrations='{"All": true}',
        plan_issues='[{"path": "properties.x", "message": "m"}]',
        timestamp=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        original_timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        sent_at=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        received_at=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
    )
    return row


_TEXT = [
    "message_id", "source", "type", "event", "user_id", "anonymous_id", "group_id",
    "previous_id", "ip", "country", "browser", "browser_version", "os", "os_version",
    "device", "page_url", "page_path", "referrer", "plan_status",
]  # fmt: skip


def _count(store: Store, user: str) -> int:
    return int(store.scalar("SELECT count(*) FROM events WHERE user_id = ?", [user]))


def test_a_read_sees_every_acknowledged_event_while_the_applier_waits(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = Writer(store, apply_after=HOLD)
    try:
        result = writer.write_sync(WriteBatch(events=_events("ada", 30, "a")))
        assert result.stored == 30
        assert writer.tally.logged == 1  # answered from the log ...
        assert writer.tally.applies == 0  # ... before DuckDB had the rows
        assert list(log_dir(tmp_path).iterdir())
        assert _count(store, "ada") == 30  # the read waited for them
        assert writer.tally.applies == 1
        again = writer.write_sync(WriteBatch(events=_events("ada", 30, "a")))
        assert (again.stored, again.duplicates) == (0, 30)
    finally:
        writer.close()
        store.close()
    assert not list(log_dir(tmp_path).iterdir())  # all in DuckDB: nothing left to replay


def _crash_after(data_dir: Path, body: str) -> None:
    """Run `body` with `store` and `writer` in a fresh process that then dies unannounced."""
    script = (
        textwrap.dedent(
            f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from kilde.store import Store, WriteBatch, Writer
        from tests.test_ack_log import _events, _full_row
        store = Store(__import__("pathlib").Path({str(data_dir)!r}))
        writer = Writer(store, apply_after={HOLD})
        """
        )
        + textwrap.dedent(body)
        + "\nos._exit(0)  # no close: the applier's rows are lost\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_events_answered_before_a_crash_are_in_the_store_after_it(tmp_path: Path) -> None:
    _crash_after(
        tmp_path,
        """
        writer.write_sync(WriteBatch(events=_events("ada", 40, "a")))
        writer.write_sync(WriteBatch(events=_events("bob", 25, "b")))
        """,
    )
    segments = list(log_dir(tmp_path).iterdir())
    assert segments
    with segments[0].open("ab") as torn:  # a group cut short as the power went: never answered
        torn.write(b"\x01\x02\x03partial record")
    store = Store(tmp_path)
    try:
        assert (_count(store, "ada"), _count(store, "bob")) == (40, 25)
        assert store.scalar("SELECT count(DISTINCT write_seq) FROM events") == 2
    finally:
        store.close()
    assert not list(log_dir(tmp_path).iterdir())
    store = Store(tmp_path)  # and a second start inserts nothing twice
    try:
        assert store.scalar("SELECT count(*) FROM events") == 65
    finally:
        store.close()


def test_events_deleted_after_they_were_answered_do_not_come_back_after_a_crash(
    tmp_path: Path,
) -> None:
    # An erasure or a retention run deletes through Writer.exclusive, like this task.
    _crash_after(
        tmp_path,
        """
        writer.write_sync(WriteBatch(events=_events("ada", 10, "a")))
        writer.write_sync(WriteBatch(events=_events("eve", 10, "e")))
        con = store.cursor()
        deleted = writer.exclusive(
            lambda: con.execute("DELETE FROM events WHERE user_id = 'eve'").fetchall()
        )
        writer.write_sync(WriteBatch(events=_events("bob", 5, "b")))
        """,
    )
    store = Store(tmp_path)
    try:
        assert (_count(store, "ada"), _count(store, "eve"), _count(store, "bob")) == (10, 0, 5)
    finally:
        store.close()


@pytest.mark.parametrize("rows", [1, 2_500])
def test_a_group_logged_and_replayed_keeps_every_column(tmp_path: Path, rows: int) -> None:
    _crash_after(tmp_path, f"writer.write_sync(WriteBatch(events=_events('ada', {rows}, 'a')))")
    store = Store(tmp_path)
    try:
        row = store.query(
            "SELECT count(*) AS n, min(event) AS event, min(plan_status) AS status, "
            "count(DISTINCT message_id) AS ids FROM events"
        )[0]
    finally:
        store.close()
    assert row == {"n": rows, "event": "Product Viewed", "status": "ok", "ids": rows}


def test_a_logged_row_comes_back_with_every_column_as_written(tmp_path: Path) -> None:
    _crash_after(tmp_path, "writer.write_sync(WriteBatch(events=[_full_row()]))")
    store = Store(tmp_path)
    try:
        [row] = store.query("SELECT * EXCLUDE (write_seq) FROM events")
    finally:
        store.close()
    assert row == _full_row()


def test_a_group_logged_as_a_json_array_by_an_older_kilde_is_replayed(tmp_path: Path) -> None:
    # the record as the version before JSON lines wrote it, left behind by a crash
    row = {**_full_row(), "write_seq": None}
    payload = orjson.dumps([row])
    record = HEADER.pack(zlib.crc32(payload), 1, len(payload)) + payload
    Store(tmp_path).close()  # the schema
    log_dir(tmp_path).mkdir()
    (log_dir(tmp_path) / f"{1:020d}.log").write_bytes(record)
    store = Store(tmp_path)
    try:
        [stored] = store.query("SELECT * EXCLUDE (write_seq) FROM events")
    finally:
        store.close()
    assert stored == _full_row()
    assert not list(log_dir(tmp_path).iterdir())
