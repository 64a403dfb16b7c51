"""What the identity engine remembers between ticks, so a tick whose records link nothing new
reads no large table.

Under a steady load most records carry identifiers seen moments before, already on one
profile, in pairs seen before. Deciding that needs each identifier's home (identity_map:
profile, closure, first sighting) and, for a one-per-person identifier, every identifier it
was ever seen with (identity_observations). Both tables grow with the history, so asking them
costs a scan per tick. This memory answers from what earlier ticks read and asks the tables
only about what it has not seen (a miss). It is emptied whenever something other than a tick
rewrites those tables (rebuild, unmerge, erasure, retention) and when it grows too large.

The decision itself is `classify`; it gives the same answer as reading the tables would.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

Key = tuple[str, str]  # id_type, id_value
Home = tuple[str, str, int]  # profile_id, closure_id, first_seen (microseconds since 1970)
Pair = tuple[str, str, str, str]  # a one-per-person identifier and one seen with it

MAX_HOMES = 500_000
MAX_PAIRED = 200_000


@dataclass
class KnownIdentities:
    homes: dict[Key, Home] = field(default_factory=dict)
    by_closure: dict[str, set[Key]] = field(default_factory=lambda: defaultdict(set))
    # `partners[s]` is complete: every identifier ever seen in one record with `s`
    partners: dict[Key, set[Key]] = field(default_factory=dict)
    # every value an alias named as previousId; None until read
    previous_values: set[str] | None = None
    # identifiers the identity map did not hold when last asked (valid until the engine's
    # next stitch: `forget_closures` empties it)
    absent: set[Key] = field(default_factory=set)

    def clear(self) -> None:
        self.homes = {}
        self.by_closure = defaultdict(set)
        self.partners = {}
        self.previous_values = None
        self.absent = set()

    # -- homes --------------------------------------------------------------------------------

    def remember(self, rows: pa.Table) -> None:
        """identity_map rows (id_type, id_value, profile_id, closure_id, first_seen)."""
        first_seen = rows.column("first_seen").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        for id_type, id_value, profile_id, closure_id, first in zip(
            *(rows.column(c).to_pylist() for c in ("id_type", "id_value", "profile_id")),
            rows.column("closure_id").to_pylist(),
            first_seen.to_pylist(),
            strict=True,
        ):
            key = (id_type, id_value)
            self.homes[key] = (profile_id, closure_id, first)
            self.by_closure[closure_id].add(key)

    def forget_closures(self, closures: Iterable[str]) -> None:
        """Closures a stitch replaced: their rows are remembered again from its output."""
        self.absent = set()
        for closure in closures:
            for key in self.by_closure.pop(closure, ()):
                self.homes.pop(key, None)

    def homes_of(self, keys: set[Key], load: Callable[[set[Key]], pa.Table]) -> dict[Key, Home]:
        """The homes of those of `keys` that have one; `load` reads the misses."""
        if len(self.homes) > MAX_HOMES:
            self.homes = {}
            self.by_closure = defaultdict(set)
        missing = {k for k in keys if k not in self.homes and k not in self.absent}
        if missing:
            self.remember(load(missing))
            self.absent |= {k for k in missing if k not in self.homes}
        return {k: home for k in keys if (home := self.homes.get(k)) is not None}

    # -- the decision -------------------------------------------------------------------------

    def classify(
        self,
        observations: pa.Table,
        strong: frozenset[str],
        load_homes: Callable[[set[Key]], pa.Table],
        load_partners: Callable[[set[Key]], list[Pair]],
    ) -> list[dict[str, Any]]:
        """Each identifier of the new observations and whether a record carrying it may change
        its closure (`linking`), with its latest time and its home.

        A record changes nothing in the identity graph when it is no alias, all its identifiers
        are known and already on one profile, none is older than its first sighting, and every
        pair of a one-per-person identifier (`strong`) with another one was seen in an earlier
        record (so no identifier gains a partner that could make it shared).

        `load_homes(keys)`: identity_map rows of these identifiers. `load_partners(keys)`:
        every (strong, other) pair of the earlier records carrying these strong identifiers.
        """
        # one key string per record and times as integers: Python objects cost most here
        record_keys = pc.binary_join_element_wise(
            observations.column("source"), observations.column("message_id"), "\x1f"
        ).to_pylist()
        times = observations.column("ts").cast(pa.int64()).to_pylist()
        records: dict[str, list[tuple[str, str, str, int]]] = defaultdict(list)
        for key, ts, id_type, id_value, role in zip(
            record_keys,
            times,
            *(observations.column(c).to_pylist() for c in ("id_type", "id_value", "role")),
            strict=True,
        ):
            records[key].append((id_type, id_value, role, ts))
        homes = self.homes_of({(r[0], r[1]) for rows in records.values() for r in rows}, load_homes)
        candidates: dict[str, list[Pair]] = {}
        for key, rows in records.items():
            profiles = set()
            for id_type, id_value, role, ts in rows:
                home = homes.get((id_type, id_value))
                if role == "previous" or home is None or ts < home[2]:
                    break
                profiles.add(home[0])
            else:
                if len(profiles) == 1:
                    candidates[key] = _pairs(rows, strong)

        if len(self.partners) > MAX_PAIRED:
            self.partners = {}
        unread = {(p[0], p[1]) for pairs in candidates.values() for p in pairs}
        unread -= self.partners.keys()
        if unread:
            found: dict[Key, set[Key]] = {k: set() for k in unread}
            for s_type, s_value, o_type, o_value in load_partners(unread):
                found[(s_type, s_value)].add((o_type, o_value))
            self.partners.update(found)
        partners = self.partners
        quiet = {
            key
            for key, pairs in candidates.items()
            if all((p[2], p[3]) in partners[(p[0], p[1])] for p in pairs)
        }
        # This tick's records are earlier records for the next tick.
        for rows in records.values():
            for s_type, s_value, o_type, o_value in _pairs(rows, strong):
                known = partners.get((s_type, s_value))
                if known is not None:
                    known.add((o_type, o_value))
        if self.previous_values is not None:
            self.previous_values.update(
                r[1] for rows in records.values() for r in rows if r[2] == "previous"
            )

        out: dict[Key, dict[str, Any]] = {}
        for key, rows in records.items():
            linking = key not in quiet
            for id_type, id_value, _, ts in rows:
                ident = (id_type, id_value)
                row = out.get(ident)
                if row is None:
                    home = homes.get(ident)
                    out[ident] = {
                        "id_type": id_type,
                        "id_value": id_value,
                        "linking": linking,
                        "ts": ts,
                        "profile_id": home[0] if home else None,
                        "closure_id": home[1] if home else None,
                    }
                    continue
                row["linking"] = row["linking"] or linking
                if ts > row["ts"]:
                    row["ts"] = ts
        return list(out.values())


def _pairs(rows: list[tuple[str, str, str, int]], strong: frozenset[str]) -> list[Pair]:
    out = []
    for s_type, s_value, _, _ in rows:
        if s_type not in strong:
            continue
        for o_type, o_value, _, _ in rows:
            if o_type != s_type or o_value != s_value:
                out.append((s_type, s_value, o_type, o_value))
    return out
