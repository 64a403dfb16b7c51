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

It also spots the most common new link, a known person on a new device: a record carrying one
known identifier and one never seen before (see `Attach`). Stitching its closure again would
give the same profiles with the new identifier added, so the engine adds it to the identity
map directly and leaves the stitch out: a stitch costs hundreds of milliseconds on a large
store, mostly in reading the closure's records.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kilde.plan.models import IdentityRules

Key = tuple[str, str]  # id_type, id_value
Home = tuple[str, str, int]  # profile_id, closure_id, first_seen (microseconds since 1970)
Pair = tuple[str, str, str, str]  # a one-per-person identifier and one seen with it

MAX_HOMES = 500_000
MAX_PAIRED = 200_000


@dataclass(frozen=True)
class Attach:
    """What decides whether a record that brings a new identifier to a known profile may add it
    to the identity map without a stitch.

    The stitch would give the same result when the record is no alias and carries exactly two
    identifiers: one known, not shared, on a closure that is one profile, first seen before
    the record's time; and one new, in no other record of the tick but ones that carry it
    alone (which link nothing), of a type that is not one-per-person (so no identifier gains
    a partner that could make it shared), not in an admin's split, not a value an alias named
    (whose reading it could change), and with room under its type's limit on that profile.
    The profile and closure ids derive from their earliest identifiers, which stay the same.
    """

    rules: IdentityRules  # the limits and shared thresholds
    separated: Callable[[], frozenset[Key]]
    previous_values: Callable[[], set[str]]
    # (closure_id, profile_id, id_type, identifiers) of every profile of these closures
    load_counts: Callable[[set[str]], list[tuple[str, str, str, int]]]


@dataclass
class Classified:
    """`classify`'s answer."""

    # one row per identifier of the new observations (see `classify`)
    rows: list[dict[str, Any]]
    # identity_map rows of new identifiers added without a stitch (see `Attach`)
    attached: list[dict[str, Any]] = field(default_factory=list)


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
    # the remembered identifiers marked shared in the identity map (they link nothing)
    shared: set[Key] = field(default_factory=set)

    def clear(self) -> None:
        self.homes = {}
        self.by_closure = defaultdict(set)
        self.partners = {}
        self.previous_values = None
        self.absent = set()
        self.shared = set()

    # -- homes --------------------------------------------------------------------------------

    def remember(self, rows: pa.Table) -> None:
        """identity_map rows (id_type, id_value, profile_id, closure_id, first_seen, shared)."""
        first_seen = rows.column("first_seen").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        for id_type, id_value, profile_id, closure_id, first, shared in zip(
            *(rows.column(c).to_pylist() for c in ("id_type", "id_value", "profile_id")),
            rows.column("closure_id").to_pylist(),
            first_seen.to_pylist(),
            rows.column("shared").to_pylist(),
            strict=True,
        ):
            self._place((id_type, id_value), (profile_id, closure_id, first), shared)

    def _place(self, key: Key, home: Home, shared: bool) -> None:
        """Remember where `key` lives (an identity_map row)."""
        self.homes[key] = home
        self.by_closure[home[1]].add(key)
        self.absent.discard(key)
        if shared:
            self.shared.add(key)
        else:
            self.shared.discard(key)

    def forget_closures(self, closures: Iterable[str]) -> None:
        """Closures a stitch replaced: their rows are remembered again from its output."""
        self.absent = set()
        for closure in closures:
            for key in self.by_closure.pop(closure, ()):
                self.homes.pop(key, None)
                self.shared.discard(key)

    def homes_of(self, keys: set[Key], load: Callable[[set[Key]], pa.Table]) -> dict[Key, Home]:
        """The homes of those of `keys` that have one; `load` reads the misses."""
        if len(self.homes) > MAX_HOMES:
            self.homes = {}
            self.by_closure = defaultdict(set)
            self.shared = set()
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
        attach: Attach,
    ) -> Classified:
        """Each identifier of the new observations and whether a record carrying it may change
        its closure (`linking`), with its latest time and its home; and the identity_map rows
        of the new identifiers `attach` allows to add without a stitch.

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
        # record -> (its new identifier, its known one): a known person on a new device
        newcomers: dict[str, tuple[Key, Key]] = {}
        for key, rows in records.items():
            profiles = set()
            new: list[Key] = []
            for id_type, id_value, role, ts in rows:
                home = homes.get((id_type, id_value))
                if role == "previous" or (home is not None and ts < home[2]):
                    break
                if home is None:
                    new.append((id_type, id_value))
                else:
                    profiles.add(home[0])
            else:
                if not new and len(profiles) == 1:
                    candidates[key] = _pairs(rows, strong)
                elif len(new) == 1 and len(rows) == 2:
                    known = next((r[0], r[1]) for r in rows if (r[0], r[1]) != new[0])
                    newcomers[key] = (new[0], known)

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
        attached: list[dict[str, Any]] = []
        if newcomers:
            keys, attached = self._attach(records, newcomers, quiet, homes, strong, attach)
            quiet |= keys
        # This tick's records are earlier records for the next tick.
        for rows in records.values():
            for s_type, s_value, o_type, o_value in _pairs(rows, strong):
                known_partners = partners.get((s_type, s_value))
                if known_partners is not None:
                    known_partners.add((o_type, o_value))
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
        return Classified(list(out.values()), attached)

    def _attach(
        self,
        records: dict[str, list[tuple[str, str, str, int]]],
        newcomers: dict[str, tuple[Key, Key]],
        quiet: set[str],
        homes: dict[Key, Home],
        strong: frozenset[str],
        attach: Attach,
    ) -> tuple[set[str], list[dict[str, Any]]]:
        """The records that need no stitch once the new identifiers of `newcomers` join their
        known ones' profiles (see `Attach`), and the identity_map rows that add them; `homes`
        and the engine's memory learn those rows.

        Besides its newcomer record, a new identifier may be in records that carry it alone
        (the new device's page views): they link nothing, only its first and last sighting
        are theirs too."""
        seen = Counter((r[0], r[1]) for rows in records.values() for r in rows)
        alone: dict[Key, list[str]] = defaultdict(list)
        for key, rows in records.items():
            if (
                len(rows) == 1
                and rows[0][2] != "previous"
                and (rows[0][0], rows[0][1]) not in homes
            ):
                alone[(rows[0][0], rows[0][1])].append(key)
        fits: dict[str, tuple[Key, Home, list[int]]] = {}
        for key, (new, known) in newcomers.items():
            home = homes[known]
            times = [r[3] for k in (key, *alone[new]) for r in records[k] if (r[0], r[1]) == new]
            partners = 1 if known[0] in strong else 0
            threshold = attach.rules.shared_threshold(new[0])
            if (
                seen[new] == 1 + len(alone[new])
                and new[0] not in strong
                and (threshold is None or partners <= threshold)
                and known not in self.shared
                and min(times) > home[2]  # an identifier seen as early could anchor the profile
            ):
                fits[key] = (new, home, times)
        if fits and any(f[0][0] in ("user_id", "anonymous_id") for f in fits.values()):
            named = attach.previous_values()
            fits = {k: f for k, f in fits.items() if f[0][1] not in named}
        if fits:
            separated = attach.separated()
            fits = {k: f for k, f in fits.items() if f[0] not in separated}
        # closures that the other linking records touch are stitched anyway
        stitched = {
            place[1]
            for key, rows in records.items()
            if key not in quiet and key not in fits
            for r in rows
            if (place := homes.get((r[0], r[1]))) is not None
        }
        fits = {k: f for k, f in fits.items() if f[1][1] not in stitched}
        if not fits:
            return set(), []
        profiles: dict[str, set[str]] = defaultdict(set)
        counts: Counter[tuple[str, str]] = Counter()
        for closure, profile, id_type, n in attach.load_counts({f[1][1] for f in fits.values()}):
            profiles[closure].add(profile)
            counts[(profile, id_type)] = n
        adding = Counter((f[1][0], f[0][0]) for f in fits.values())
        keys: set[str] = set()
        added: list[dict[str, Any]] = []
        for key, (new, home, times) in fits.items():
            profile, closure, _ = home
            room = attach.rules.limit(new[0]) - counts[(profile, new[0])]
            # one profile: its closure was stitched without refusing a link
            if profiles[closure] == {profile} and adding[(profile, new[0])] <= room:
                keys.add(key)
                keys.update(alone[new])
                added.append(
                    {
                        "id_type": new[0],
                        "id_value": new[1],
                        "profile_id": profile,
                        "closure_id": closure,
                        "first_seen": min(times),
                        "last_seen": max(times),
                        "shared": False,
                    }
                )
                homes[new] = (profile, closure, min(times))
                self._place(new, homes[new], shared=False)
        return keys, added


def _pairs(rows: list[tuple[str, str, str, int]], strong: frozenset[str]) -> list[Pair]:
    out = []
    for s_type, s_value, _, _ in rows:
        if s_type not in strong:
            continue
        for o_type, o_value, _, _ in rows:
            if o_type != s_type or o_value != s_value:
                out.append((s_type, s_value, o_type, o_value))
    return out
