"""Incremental updates and full rebuilds give identical profiles, for any order of arrival.

Runs the real pipeline, writer, DuckDB store and identity engine in-process (a server per
hypothesis example would take minutes): records go through `Pipeline.ingest_sync` exactly as the
collector sends them.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kilde.identity import engine as engine_module
from kilde.identity.engine import IdentityEngine
from kilde.identity.identifiers import Identifier
from kilde.pipeline import Envelope, Pipeline
from kilde.plan import load_plan
from kilde.plan.models import Plan
from kilde.profiles import queries
from kilde.store import Store, Writer
from kilde.store.writer import WriteBatch
from tests.conftest import DEMO_PLAN

PLAN = load_plan(DEMO_PLAN)
BASE = datetime(2026, 1, 1, tzinfo=UTC)
USERS = ["u1", "u2", "u3", "null"]
ANONS = ["a1", "a2", "a3", "a4", "a5", "undefined"]
EMAILS = ["ola@example.com", "OLA@example.com ", "kari@example.com", "test@test.com"]
PHONES = ["+47 41234567", "+4791234567", "12"]


# Each example starts two stores and engines: a dozen, untimed
FEW_SLOW_EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["identify", "identify", "page", "track", "alias"]))
    at = BASE + timedelta(minutes=draw(st.integers(0, 500)))
    msg: dict[str, Any] = {"type": kind, "timestamp": at.isoformat()}
    if kind == "alias":
        msg["previousId"] = draw(st.sampled_from(ANONS + USERS))
        msg["userId"] = draw(st.sampled_from(USERS))
        return msg
    if draw(st.booleans()):
        msg["userId"] = draw(st.sampled_from(USERS))
    if "userId" not in msg or draw(st.booleans()):
        msg["anonymousId"] = draw(st.sampled_from(ANONS))
    if kind == "identify":
        traits: dict[str, Any] = {}
        if draw(st.booleans()):
            traits["email"] = draw(st.sampled_from(EMAILS))
        if draw(st.booleans()):
            traits["phone"] = draw(st.sampled_from(PHONES))
        if draw(st.booleans()):
            traits["city"] = draw(st.sampled_from(["Oslo", "Bergen"]))
        msg["traits"] = traits
    elif kind == "track":
        msg["event"] = "Order Completed"
        msg["properties"] = {"order_id": "o", "revenue": 10.0, "currency": "NOK"}
    else:
        msg["name"] = "Home"
    return msg


def order_of_u1(when: str, order_id: str = "o", revenue: float = 5.0) -> dict[str, Any]:
    """An order of user u1 (a record that links nothing new once u1 is known)."""
    return {
        "type": "track",
        "userId": "u1",
        "event": "Order Completed",
        "properties": {"order_id": order_id, "revenue": revenue, "currency": "NOK"},
        "timestamp": when,
    }


class Shop:
    """A store, writer, pipeline and identity engine in a temporary directory."""

    def __init__(self, plan: Plan = PLAN) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kilde-prop-"))
        self.store = Store(self.dir)
        self.writer = Writer(self.store)
        self.pipeline = Pipeline(plan, self.writer)
        self.engine = IdentityEngine(self.store, self.writer, lambda: plan, self.dir)
        self.writer.write_sync(
            WriteBatch(statements=[("INSERT INTO identity_state VALUES ('salt', 'fixed')", [])])
        )

    def send(self, batch: list[dict[str, Any]], received_at: datetime | None = None) -> None:
        sources = {"track": PLAN.source("backend")}
        for msg in batch:
            source = sources.get(msg["type"]) or PLAN.source("web")
            assert source is not None
            result = self.pipeline.ingest_sync(
                [msg], source, Envelope(received_at=received_at or datetime.now(UTC))
            )
            assert not result.rejected, result.rejected

    def snapshot(self) -> dict[str, Any]:
        q = self.store.query
        return {
            "map": q(
                "SELECT id_type, id_value, profile_id, closure_id, first_seen, last_seen, shared "
                "FROM identity_map ORDER BY ALL"
            ),
            "profiles": q("SELECT * EXCLUDE (updated_at) FROM profiles ORDER BY profile_id"),
            "traits": q(
                "SELECT profile_id, name, value, source, tier, observed_at, candidates "
                "FROM profile_traits ORDER BY ALL"
            ),
            "conflicts": q(
                "SELECT closure_id, reason, id_type, id_value, kept_profile, refused_profile, "
                "message_id, first_at, occurrences, detail FROM identity_conflicts ORDER BY ALL"
            ),
        }

    def close(self) -> None:
        self.engine.stop()
        self.writer.close()
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def rebuilt_and_incremental(
    records: list[dict[str, Any]], plan: Plan = PLAN
) -> Iterator[tuple[Shop, Shop]]:
    """Two shops: one that holds `records` and rebuilt everything from them, and an empty one
    for the test to feed increments to; both are closed afterwards."""
    rebuilt, incremental = Shop(plan), Shop(plan)
    try:
        rebuilt.send(records)
        rebuilt.engine.rebuild()
        yield rebuilt, incremental
    finally:
        rebuilt.close()
        incremental.close()


@contextlib.contextmanager
def after_first(
    first: list[dict[str, Any]], rest: list[dict[str, Any]], prefix: str, plan: Plan = PLAN
) -> Iterator[tuple[Shop, Shop]]:
    """`rebuilt_and_incremental` over `first` and `rest` (message ids `prefix`0, 1, ...), with
    `first` sent to the incremental shop and read by one tick."""
    for index, msg in enumerate(first + rest):
        msg["messageId"] = f"{prefix}{index}"
    with rebuilt_and_incremental(first + rest, plan) as (rebuilt, incremental):
        incremental.send(first)
        incremental.engine.step()
        yield rebuilt, incremental


@pytest.mark.timeout(1200)  # a busy machine; hypothesis examples are not timed
@FEW_SLOW_EXAMPLES
@given(
    batch=st.lists(records(), min_size=1, max_size=14),
    order=st.randoms(use_true_random=False),
    chronological=st.booleans(),
    cuts=st.lists(st.integers(1, 14), max_size=3),
    background=st.booleans(),
)
def test_incremental_equals_rebuild_for_any_order(
    batch: list[dict[str, Any]],
    order: Any,
    chronological: bool,
    cuts: list[int],
    background: bool,
) -> None:
    """`background`: steps as the server's background thread takes them, with the profiles of
    stitched closures left to the refresh thread (as on a large store)."""
    for index, msg in enumerate(batch):
        msg["messageId"] = f"m{index:03d}"
    with rebuilt_and_incremental(batch) as (rebuilt, incremental):
        shuffled = list(batch)
        order.shuffle(shuffled)
        if chronological:  # in time order most later records only repeat known identifiers
            shuffled.sort(key=lambda m: m["timestamp"])
        start = 0
        for cut in [*sorted(set(cuts)), len(shuffled)]:
            if cut <= start or start >= len(shuffled):
                continue
            incremental.send(shuffled[start:cut])
            if background:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(engine_module, "DEFER_PROFILES_AFTER", -1.0)
                    incremental.engine.step(defer_quiet=True)
            else:
                incremental.engine.step()
            start = cut
        incremental.engine.wait_idle()
        assert incremental.snapshot() == rebuilt.snapshot()


def test_records_that_link_nothing_new_refresh_profiles_like_a_rebuild() -> None:
    """Page views of known devices and logins of known pairs only refresh profiles; the
    result must still equal a rebuild."""
    first = [
        {"type": "identify", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-01-01T10:00"},
        {
            "type": "identify",
            "anonymousId": "a2",
            "traits": {"email": "kari@example.com"},
            "timestamp": "2026-01-01T10:00",
        },
    ]
    later = [
        {"type": "page", "anonymousId": "a1", "name": "Home", "timestamp": "2026-01-02T10:00"},
        {"type": "page", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-01-03T10:00"},
        {
            "type": "identify",
            "anonymousId": "a2",
            "traits": {"city": "Oslo"},
            "timestamp": "2026-01-04T10:00",
        },
        order_of_u1("2026-01-05T10:00"),
    ]
    with after_first(first, later, "q") as (rebuilt, incremental):
        incremental.send(later)
        report = incremental.engine.step()
        assert report is not None and report.rounds == 0, "nothing needed stitching"
        assert incremental.snapshot() == rebuilt.snapshot()
        seen = incremental.store.scalar("SELECT last_seen FROM identity_map WHERE id_value = 'a1'")
        assert seen.isoformat().startswith("2026-01-03T10:00")


def test_quiet_refreshes_held_by_the_background_thread_end_like_a_rebuild() -> None:
    """The background thread holds quiet profiles' refresh for a moment while it keeps
    stitching new links; new links show at once, and once idle the profiles equal a rebuild."""
    first = [
        {"type": "identify", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-01-01T10:00"},
    ]
    quiet = [
        {"type": "page", "anonymousId": "a1", "name": "Home", "timestamp": "2026-01-02T10:00"},
        order_of_u1("2026-01-03T10:00"),
    ]
    link = [
        {"type": "identify", "anonymousId": "a9", "userId": "u1", "timestamp": "2026-01-04T10:00"},
    ]
    with after_first(first, [*quiet, *link], "h") as (rebuilt, incremental):
        incremental.send(quiet)
        incremental.engine.step(defer_quiet=True)
        orders = "SELECT orders FROM profiles"
        assert incremental.store.scalar(orders) == 0, "the refresh is held"
        incremental.send(link)
        incremental.engine.step(defer_quiet=True)
        homes = incremental.store.query(
            "SELECT DISTINCT profile_id FROM identity_map WHERE id_value IN ('a9', 'u1')"
        )
        assert len(homes) == 1, "the new link shows while the refresh is held"
        assert incremental.engine.wait_idle()
        assert incremental.store.scalar(orders) == 1
        assert incremental.snapshot() == rebuilt.snapshot()


def test_a_refresh_beside_a_new_link_leaves_the_linked_profile_to_the_stitch() -> None:
    """The background thread refreshes quiet profiles beside the ticks. A link stitched while
    that refresh runs recomputes the profile whole; the refresh, computed from the state before
    the link, must not overwrite it."""
    first = [
        {"type": "identify", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-01-01T10:00"},
    ]
    quiet = [
        {"type": "page", "anonymousId": "a1", "name": "Home", "timestamp": "2026-01-02T10:00"},
    ]
    link = [  # two new identifiers: stitched (one alone would be attached, see below)
        {
            "type": "identify",
            "anonymousId": "a9",
            "userId": "u1",
            "traits": {"email": "kari@example.com"},
            "timestamp": "2026-01-04T10:00",
        },
    ]
    with after_first(first, [*quiet, *link], "b") as (rebuilt, incremental):
        engine = incremental.engine
        incremental.send(quiet)
        engine.step(defer_quiet=True)  # held
        with engine.lock:  # the refresh computes now but writes only after the link below
            engine.step(defer_quiet=True)  # nothing new: the held refresh starts
            time.sleep(1.0)  # let it read the profile as it was before the link
            incremental.send(link)
            report = engine.step(defer_quiet=True)
            assert report is not None and report.rounds > 0, "the link was stitched"
        assert engine.wait_idle()
        identifiers = incremental.store.scalar("SELECT identifiers FROM profiles")
        assert identifiers == 5, "u1, a1 and the linked a9, email and email hash"
        assert incremental.snapshot() == rebuilt.snapshot()


def test_wait_idle_waits_for_a_refresh_started_while_it_waited_for_the_lock() -> None:
    """A report asks for fresh profiles (`wait_idle`) just as the background thread hands the
    held quiet rows (here: an order of a known buyer) to its refresh thread. `wait_idle` must
    not return before that refresh has written the order into the profile."""
    first = [
        {"type": "identify", "userId": "u1", "timestamp": "2026-01-01T10:00"},
    ]
    order = [
        order_of_u1("2026-01-02T10:00", order_id="o1", revenue=900.0),
    ]
    with after_first(first, order, "w") as (rebuilt, incremental):
        engine = incremental.engine
        incremental.send(order)
        engine.step(defer_quiet=True)  # the order's profile refresh is held
        finished = threading.Event()
        with engine.lock:
            waiter = threading.Thread(target=lambda: engine.wait_idle() and finished.set())
            waiter.start()  # it finds no refresh running and queues for the lock
            time.sleep(0.5)
            engine.step(defer_quiet=True)  # nothing new: the held refresh starts
            time.sleep(1.0)  # the refresh has read the events and queues to write
        waiter.join(60)
        assert finished.is_set()
        orders = incremental.store.scalar("SELECT orders FROM profiles")
        assert orders == 1, "the report would show the buyer without the order"
        assert incremental.snapshot() == rebuilt.snapshot()


def test_links_show_before_their_profiles_on_a_large_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """When building stitched profiles is slow, the background thread writes the new links
    first and the refresh thread the profiles right after; the end state equals a rebuild."""
    monkeypatch.setattr(engine_module, "DEFER_PROFILES_AFTER", -1.0)  # "slow" from the start
    first = [
        {"type": "identify", "anonymousId": "a1", "userId": "u1", "timestamp": "2026-01-01T10:00"},
        order_of_u1("2026-01-02T10:00"),
    ]
    later = [
        {
            "type": "identify",
            "anonymousId": "a9",
            "userId": "u1",
            "traits": {"email": "kari@example.com"},
            "timestamp": "2026-01-04T10:00",
        },
        {
            "type": "identify",
            "anonymousId": "a5",
            "traits": {"email": "ola@example.com"},
            "timestamp": "2026-01-04T11:00",
        },
    ]
    with after_first(first, later, "d") as (rebuilt, incremental):
        engine = incremental.engine
        incremental.send(later)
        with engine.lock:  # the refresh thread cannot write before the checks below
            engine.step(defer_quiet=True)
            homes = incremental.store.query(
                "SELECT DISTINCT profile_id FROM identity_map WHERE id_value IN ('a9', 'u1')"
            )
            assert len(homes) == 1, "the new link shows at once"
            emails = "SELECT count(*) FROM profile_traits WHERE name = 'email'"
            assert incremental.store.scalar(emails) == 0, "the profiles follow"
        assert engine.wait_idle()
        assert incremental.store.scalar(emails) == 2
        assert incremental.snapshot() == rebuilt.snapshot()


def sign_in(anon: str, when: str, user: str = "u1") -> dict[str, Any]:
    """An identify of a user on a device."""
    return {"type": "identify", "anonymousId": anon, "userId": user, "timestamp": when}


def page_of(anon: str, when: str) -> dict[str, Any]:
    return {"type": "page", "anonymousId": anon, "name": "Home", "timestamp": when}


# At most two devices per profile, so a third is refused
TWO_DEVICES = PLAN.model_copy(
    update={"identity": PLAN.identity.model_copy(update={"limits": {"anonymous_id": 2}})}
)


def test_the_profile_page_shows_a_profile_whose_closure_was_just_renamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The profile page reads a profile's identifiers through the closure its row names. In
    the moment between a new link and the profile's rewrite, that can be a closure the link
    renamed (it takes the id of its earliest identifier); the page still shows them all."""
    monkeypatch.setattr(engine_module, "DEFER_PROFILES_AFTER", -1.0)  # "slow" from the start
    # u1's profile is full (two devices); a0, seen before all of them, joins the closure on a
    # profile of its own, and the closure takes a0's id while u1's profile keeps its own.
    first = [
        page_of("a0", "2025-12-31T09:00"),
        sign_in("a1", "2026-01-01T10:00"),
        sign_in("a2", "2026-01-02T10:00"),
    ]
    later = [sign_in("a0", "2026-01-04T10:00")]
    with after_first(first, later, "w", TWO_DEVICES) as (rebuilt, incremental):
        engine, store = incremental.engine, incremental.store
        [profile_id] = queries.lookup(store, [Identifier("user_id", "u1")])
        incremental.send(later)
        with engine.lock:  # the refresh thread cannot rewrite the profile before the checks
            engine.step(defer_quiet=True)
            assert queries.lookup(store, [Identifier("user_id", "u1")]) == [profile_id]
            named = "SELECT closure_id FROM profiles WHERE profile_id = ?"
            now = "SELECT DISTINCT closure_id FROM identity_map WHERE profile_id = ?"
            assert store.scalar(named, [profile_id]) != store.scalar(now, [profile_id])
            shown = queries.profile(store, profile_id)
            assert shown is not None
            assert {i["value"] for i in shown["identities"]} == {"a1", "a2", "u1"}
        assert engine.wait_idle()
        assert store.scalar(named, [profile_id]) == store.scalar(now, [profile_id])
        assert incremental.snapshot() == rebuilt.snapshot()


def test_a_known_person_on_a_new_device_is_attached_without_a_stitch() -> None:
    """The most common new link: a known user signs in on a new device. The device joins the
    profile in the tick that reads it without its closure being stitched again, its page views
    in the same tick come along, and the result equals a rebuild."""
    first = [sign_in("a1", "2026-01-01T10:00"), order_of_u1("2026-01-01T11:00")]
    later = [
        page_of("a2", "2026-01-02T09:00"),
        sign_in("a2", "2026-01-02T10:00"),
        page_of("a2", "2026-01-02T11:00"),
    ]
    with after_first(first, later, "n") as (rebuilt, incremental):
        incremental.send(later)
        report = incremental.engine.step()
        assert report is not None and report.attached == 1 and report.rounds == 0
        seen = incremental.store.query(
            "SELECT first_seen, last_seen FROM identity_map WHERE id_value = 'a2'"
        )
        assert [(r["first_seen"].hour, r["last_seen"].hour) for r in seen] == [(9, 11)]
        assert incremental.snapshot() == rebuilt.snapshot()


@pytest.mark.parametrize(
    ("first", "later", "conflicts"),
    [
        # the profile has its two devices already: the third is refused
        (
            [sign_in("a1", "2026-01-01T10:00"), sign_in("a2", "2026-01-01T11:00")],
            [sign_in("a3", "2026-01-02T10:00")],
            1,
        ),
        # room for one more device, two arrive in one tick: the earlier one gets it
        (
            [sign_in("a1", "2026-01-01T10:00")],
            [sign_in("a3", "2026-01-02T11:00"), sign_in("a2", "2026-01-02T10:00")],
            1,
        ),
        # a device seen before the user: it may anchor the profile
        ([sign_in("a1", "2026-01-02T10:00")], [sign_in("a0", "2026-01-01T10:00")], 0),
        # a device two users signed in on in one tick
        (
            [sign_in("a1", "2026-01-01T10:00"), sign_in("b1", "2026-01-01T10:00", user="u2")],
            [sign_in("a5", "2026-01-02T10:00"), sign_in("a5", "2026-01-02T11:00", user="u2")],
            1,
        ),
    ],
)
def test_new_devices_the_profile_has_no_room_for_are_stitched_like_a_rebuild(
    first: list[dict[str, Any]], later: list[dict[str, Any]], conflicts: int
) -> None:
    with after_first(first, later, "r", TWO_DEVICES) as (rebuilt, incremental):
        incremental.send(later)
        report = incremental.engine.step()
        assert report is not None and report.attached == 0
        assert incremental.snapshot() == rebuilt.snapshot()
        assert len(rebuilt.snapshot()["conflicts"]) == conflicts


@st.composite
def device_records(draw: st.DrawFn) -> dict[str, Any]:
    """Records of known people on devices the store has not seen yet (mostly), at any time."""
    at = (BASE + timedelta(minutes=draw(st.integers(-60, 500)))).isoformat()
    device = draw(st.sampled_from(["d1", "d2", "d3", "a1"]))
    kind = draw(st.sampled_from(["sign_in", "sign_in", "page", "other"]))
    if kind == "sign_in":
        return sign_in(device, at, user=draw(st.sampled_from(["u1", "u2", "u3"])))
    if kind == "page":
        return page_of(device, at)
    msg: dict[str, Any] = draw(records())
    return msg


@pytest.mark.timeout(1200)  # a busy machine; hypothesis examples are not timed
@FEW_SLOW_EXAMPLES
@given(
    later=st.lists(device_records(), min_size=1, max_size=10),
    cuts=st.lists(st.integers(1, 10), max_size=2),
    two_devices=st.booleans(),
)
def test_new_devices_of_known_people_equal_a_rebuild_for_any_order(
    later: list[dict[str, Any]], cuts: list[int], two_devices: bool
) -> None:
    """Known people on new devices, mostly added without a stitch: in every order and with
    any limit, the result is a rebuild's."""
    first = [sign_in("a1", BASE.isoformat()), sign_in("a2", BASE.isoformat(), user="u2")]
    first.append(sign_in("a3", BASE.isoformat(), user="u3"))
    plan = TWO_DEVICES if two_devices else PLAN
    with after_first(first, later, "p", plan) as (rebuilt, incremental):
        start = 0
        for cut in [*sorted(set(cuts)), len(later)]:
            if start < cut:
                incremental.send(later[start:cut])
                incremental.engine.step()
                start = cut
        assert incremental.snapshot() == rebuilt.snapshot()


def test_an_event_written_late_with_an_old_receipt_time_is_read() -> None:
    """A replayed dead letter keeps the time it was first received, maybe hours ago. The engine
    has read events received since; it must still read this one when it is written."""
    shop = Shop()
    try:
        shop.send(
            [
                {
                    "type": "identify",
                    "anonymousId": "a1",
                    "userId": "u1",
                    "timestamp": "2026-01-04T10:00",
                    "messageId": "now",
                }
            ]
        )
        shop.engine.step()
        late = {
            "type": "identify",
            "anonymousId": "a2",
            "userId": "u1",
            "timestamp": "2026-01-03T10:00",
            "messageId": "replayed",
        }
        shop.send([late], received_at=datetime.now(UTC) - timedelta(hours=2))
        shop.engine.step()
        homes = shop.store.query(
            "SELECT profile_id, count(*) AS ids FROM identity_map "
            "WHERE id_value IN ('a1', 'a2', 'u1') GROUP BY ALL"
        )
        assert [h["ids"] for h in homes] == [3], "a2 joined u1's profile"
        assert shop.store.scalar("SELECT count(*) FROM identity_records") == 2
    finally:
        shop.close()
