"""The writer's memory of recent message ids: what it answers, and what it keeps in memory."""

from __future__ import annotations

import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from kilde.store.writer import RecentIds


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=40),
    batches=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=25),
    probe_gone=st.booleans(),
)
def test_the_last_ids_are_always_remembered_and_others_never_invented(
    capacity: int, batches: list[int], probe_gone: bool
) -> None:
    recent = RecentIds(capacity)
    added: list[str] = []
    for size in batches:
        keys = [f"src\x1fm-{len(added) + n}" for n in range(size)]
        if size == 1:
            recent.add(keys[0])
        else:
            recent.add_all(keys)
        added.extend(keys)
        answers = recent.seen([*added, "src\x1fnever-sent"])
        remembered = dict(zip(added, answers, strict=False))
        assert answers[-1] is False
        # at least the last `capacity` ids, whatever the mix of sets and arrays
        assert all(remembered[k] for k in added[-capacity:])
        assert len(recent) == sum(answers)
        # forgotten only whole, oldest first: once one is forgotten, so are all before it
        first_kept = answers.index(True)
        assert all(answers[first_kept : len(added)])
        assert recent.seen(["src\x1fnever-sent", added[-1]]) == [False, True]
        assert (added[-1] in recent) is True
    if probe_gone:
        gone = added[-1]
        recent.discard(gone)
        assert gone not in recent
        assert all(recent.seen(added[-capacity:-1]))


def test_half_a_million_ids_take_a_few_megabytes() -> None:
    """What made the server pass 500 MB in a 2M-row import: sets of Python ints took about
    100 bytes an id; the older generations are now arrays of 8 bytes an id."""
    recent = RecentIds(500_000)
    for start in range(0, 620_000, 122_880):
        recent.add_all([f"shop-orders\x1fo-{n}" for n in range(start, start + 122_880)])
    for n in range(5_000):  # then single events, as the collector sends them
        recent.add(f"web\x1fe-{n}")
    young = recent._young
    held = recent._old.nbytes + recent._old_generation.nbytes + sys.getsizeof(young)
    held += 32 * len(young)  # the ints in the set
    assert len(recent) >= 500_000
    assert held < 8 * 1024 * 1024, held
    assert recent.seen(["shop-orders\x1fo-614399", "web\x1fe-4999", "web\x1fe-5000"]) == [
        True,
        True,
        False,
    ]
