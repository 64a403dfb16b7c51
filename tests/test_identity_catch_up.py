"""After a burst, identity resolution catches up the cheaper way: a store that is small next to
its unread events is rebuilt, a large one reads them in increments (see REBUILD_BACKLOG).

Runs the real writer, DuckDB store and identity engine in-process. The events are written
straight into the events table, as `bench/identity.py` does, since hundreds of thousands of
them through HTTP would take minutes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kilde.identity.engine import REBUILD_BACKLOG, REBUILD_SHARE, TICK_BATCH
from tests.test_identity_properties import Shop

BURST = REBUILD_BACKLOG + 5_000

# page views of 50,000 devices, a quarter of them signed in (20,000 people); write_seq goes on
# from the last commit, 500 events a transaction
EVENTS = """
INSERT INTO events BY NAME
SELECT 'burst-' || i AS message_id, 'web' AS source, 'page' AS type, 'Home' AS event,
    CASE WHEN i % 4 = 0 THEN 'u-' || (i // 4 % 20000) END AS user_id,
    'a-' || (i % 50000) AS anonymous_id,
    TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i) AS timestamp,
    TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i) AS received_at,
    '{}' AS properties, '{}' AS context, 'ok' AS plan_status,
    (SELECT coalesce(max(write_seq), 0) FROM events) + 1 + (i - ?) // 500 AS write_seq
FROM range(?, ?) t(i)
"""


def add_events(shop: Shop, first: int, count: int) -> None:
    shop.store.cursor().execute(EVENTS, [first, first, first + count])


@contextlib.contextmanager
def caught_up_with(stored: int) -> Iterator[Shop]:
    """A shop whose identity resolution has read `stored` events; closed afterwards."""
    shop = Shop()
    try:
        add_events(shop, 0, stored)
        report = shop.engine.step()  # nothing was read before: a rebuild
        assert report is not None and report.mode == "rebuild"
        assert shop.engine.unread() == 0
        yield shop
    finally:
        shop.close()


def test_a_burst_larger_than_a_tenth_of_the_store_is_caught_up_by_a_rebuild() -> None:
    with caught_up_with(10_000) as shop:
        add_events(shop, 10_000, BURST)
        report = shop.engine.step()
        assert report is not None and report.mode == "rebuild"
        assert report.events_read == 10_000 + BURST
        assert shop.engine.unread() == 0


def test_a_burst_smaller_than_a_tenth_of_the_store_is_read_in_increments() -> None:
    stored = int(BURST / REBUILD_SHARE) + 10_000
    with caught_up_with(stored) as shop:
        add_events(shop, stored, BURST)
        report = shop.engine.step()
        assert report is not None and report.mode == "incremental"
        assert 0 < report.events_read < BURST  # one tick's worth
        assert 0 < shop.engine.unread() < BURST


def test_a_tick_that_ends_on_a_transactions_last_event_leaves_nothing_unread() -> None:
    # TICK_BATCH events in whole transactions: the first tick reads them all but cannot know
    # that the last transaction is complete, the second finds nothing new to read
    with caught_up_with(10_000) as shop:
        add_events(shop, 10_000, TICK_BATCH)
        first = shop.engine.step()
        assert first is not None and first.events_read == TICK_BATCH
        assert shop.engine.step() is None
        assert shop.engine.unread() == 0


def identifiers_read(shop: Shop) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return (
        shop.store.query("SELECT * FROM identity_records ORDER BY ALL"),
        shop.store.query("SELECT * FROM identity_observations ORDER BY ALL"),
    )


def test_a_rebuild_to_catch_up_keeps_what_was_read_and_equals_a_full_rebuild() -> None:
    with caught_up_with(10_000) as shop:
        # a tick that stops at its limit: its last transaction is read, but not marked so
        add_events(shop, 10_000, TICK_BATCH + 250)
        shop.engine.step()
        assert 0 < shop.engine.unread() <= 750
        add_events(shop, 10_000 + TICK_BATCH + 250, BURST)
        report = shop.engine.step()
        assert report is not None and report.mode == "rebuild"
        assert report.events_read == 10_000 + TICK_BATCH + 250 + BURST
        assert shop.engine.unread() == 0
        caught_up = shop.snapshot(), identifiers_read(shop)
        shop.engine.rebuild()  # everything read again
        assert (shop.snapshot(), identifiers_read(shop)) == caught_up
