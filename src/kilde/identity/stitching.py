"""Stitching: from the identifiers records carried to profiles, by the plan's merge rules.

1. Links come from records: the identifiers one record carried are linked. An alias's
   previousId is the user id of that value if one exists, else the anonymous id.
2. Shared identifiers (seen with more one-per-person ids than `identity.shared_after` allows)
   link nothing.
3. Raw closures are the connected components of all links ignoring limits (graph.py).
4. A closure within every limit, with no admin split, is one profile. Otherwise the links are
   applied greedily in a canonical order (record time, source, message id): a link that would
   break a limit or an admin split is refused and recorded as a merge conflict.
5. A profile's id derives from its earliest identifier, so it survives merges, and an id that
   disappears in a merge can always be followed to the profile holding its identifier.

Incremental updates run the same function on the closures new records touch, so a rebuild and
any sequence of increments give identical results.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from kilde.identity import keyed
from kilde.identity.conflicts import Conflict
from kilde.identity.graph import connected_components
from kilde.identity.identifiers import Identifier, identifier_order
from kilde.identity.runner import Runner
from kilde.plan.models import IDENTIFIER_TYPES, IdentityRules


@dataclass(frozen=True)
class Separation:
    """An admin's unmerge: no profile may hold identifiers of both sides."""

    id: str
    keep: frozenset[Identifier]
    split: frozenset[Identifier]


@dataclass
class StitchResult:
    identities: ir.Table  # k_identities: id_type, id_value, profile_id, closure_id, ...
    conflicts: list[Conflict]
    rounds: int = 0
    dirty_closures: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def profile_id_of(salt: str, id_type: str, value: str) -> str:
    """The profile id an identifier gives the profile it anchors (same formula as in SQL)."""
    return "p_" + hashlib.sha256(f"{salt}|{id_type}|{value}".encode()).hexdigest()[:20]


def _hash_expr(salt: str, id_type: ir.StringValue, value: ir.StringValue) -> ir.StringValue:
    text = ibis.literal(salt + "|") + id_type + "|" + value
    return text.hexdigest("sha256").substr(0, 20)


def profile_id_expr(salt: str, id_type: ir.StringValue, value: ir.StringValue) -> ir.StringValue:
    """`profile_id_of` as an expression."""
    return ibis.literal("p_") + _hash_expr(salt, id_type, value)


def _rank_expr(rules: IdentityRules, id_type: ir.StringValue) -> ir.IntegerValue:
    order = identifier_order(rules)
    return id_type.cases(*[(t, i) for i, t in enumerate(order)], else_=len(order))


SCOPE_SCHEMA = pa.schema([("id_type", pa.string()), ("id_value", pa.string())])


def stitch(
    run: Runner,
    rules: IdentityRules,
    salt: str,
    scope: pa.Table | None,
    separations: list[Separation],
) -> StitchResult:
    """Profiles for the identifiers in `scope` (whole closures), or for everything (None).

    The result is the temporary table `k_identities` of the runner.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    mode = "all" if scope is None else "scoped"
    obs = run.source("identity_observations")
    if scope is not None:
        run.put("k_scope", scope.select(["id_type", "id_value"]).cast(SCOPE_SCHEMA))

        sc = run.temp("k_scope")
        mine = keyed.lookup(run, "k_r_ids", obs, "id_value", sc, ["id_type", "id_value"])
        records = mine.select("source", "message_id")
        found = keyed.lookup(run, "k_r_rows", obs, "message_id", records, ["source", "message_id"])
        rows = run.make("k_rows", "rows", lambda: found)
    else:
        rows = obs

    def resolved_expr() -> ir.Table:
        own = rows.filter(rows.role == "self")
        users = own.filter(own.id_type == "user_id").select("id_value").distinct()
        prev = rows.filter(rows.role == "previous")
        return (
            _loose(own)
            .union(_loose(prev.filter(prev.id_type == "user_id").semi_join(users, "id_value")))
            .union(_loose(prev.filter(prev.id_type == "anonymous_id").anti_join(users, "id_value")))
        )

    resolved = run.make("k_resolved", f"resolved/{mode}", resolved_expr)

    def numbered_expr() -> ir.Table:
        # Shared identifiers: seen with too many distinct one-per-person identifiers.
        strong_types = [t for t in IDENTIFIER_TYPES if rules.limit(t) == 1]
        thresholds = {
            t: n for t in IDENTIFIER_TYPES if (n := rules.shared_threshold(t)) is not None
        }
        src = resolved
        if scope is not None:
            src = resolved.semi_join(run.temp("k_scope"), ["id_type", "id_value"])
        stats = src.group_by("id_type", "id_value").aggregate(
            first_seen=src.ts.min(), last_seen=src.ts.max()
        )
        if strong_types and thresholds:
            me = resolved.mutate(me=resolved.id_type + ":" + resolved.id_value)
            strong = resolved.filter(resolved.id_type.isin(strong_types))
            strong = strong.select(
                "source", "message_id", partner=strong.id_type + ":" + strong.id_value
            )
            pairs = me.join(strong, ["source", "message_id"])
            pairs = pairs.filter(pairs.me != pairs.partner)
            partners = pairs.group_by("id_type", "id_value").aggregate(n=pairs.partner.nunique())
            threshold = partners.id_type.cases(*thresholds.items(), else_=None)
            shared = partners.filter(partners.n > threshold).select("id_type", "id_value", "n")
            stats = stats.left_join(shared, ["id_type", "id_value"]).select(
                "id_type", "id_value", "first_seen", "last_seen", shared_n=ibis._.n
            )
        else:
            stats = stats.mutate(shared_n=ibis.null().cast("int64"))
        return stats.mutate(nid=ibis.row_number().over(order_by=[stats.id_type, stats.id_value]))

    numbered = run.make("k_numbered", f"numbered/{mode}", numbered_expr)
    timings["prepare"] = time.perf_counter() - started

    def linkable_expr() -> ir.Table:
        free = numbered.filter(numbered.shared_n.isnull())
        return resolved.join(free, ["id_type", "id_value"]).select(
            "source", "message_id", "ts", "role", "nid"
        )

    linkable = run.make("k_linkable", "linkable", linkable_expr)

    def edges_expr() -> ir.Table:
        rec_min = linkable.group_by("source", "message_id").aggregate(m=linkable.nid.min())
        edges = linkable.join(rec_min, ["source", "message_id"])
        return edges.filter(edges.nid != edges.m).select(a=edges.nid, b=edges.m).distinct()

    run.make("k_edges", "edges", edges_expr)
    _release(run, "k_resolved")
    t0 = time.perf_counter()
    labels, rounds = connected_components(run, "k_numbered", "k_edges")
    timings["components"] = time.perf_counter() - t0

    lab = run.make("k_lab", "lab", lambda: numbered.join(run.temp(labels), "nid"))
    _release(run, "k_edges", "k_both", "k_spread", "k_cc_0", "k_cc_1")

    sep_ids = sorted({i for s in separations for i in (*s.keep, *s.split)})
    run.put(
        "k_separated",
        pa.table(
            {"id_type": [i.type for i in sep_ids], "id_value": [i.value for i in sep_ids]},
            schema=SCOPE_SCHEMA,
        ),
    )

    def dirty_expr() -> ir.Table:
        counts = lab.group_by("label", "id_type").aggregate(c=lab.count())
        limit = counts.id_type.cases(*[(t, rules.limit(t)) for t in IDENTIFIER_TYPES], else_=1)
        over = counts.filter(counts.c > limit).select("label")
        split = lab.semi_join(run.temp("k_separated"), ["id_type", "id_value"]).select("label")
        return over.union(split).distinct()

    run.make("k_dirty", "dirty", dirty_expr)

    t0 = time.perf_counter()

    def dirty_nodes_expr() -> ir.Table:
        return lab.semi_join(run.temp("k_dirty"), "label").select(
            "nid", "label", "id_type", "id_value"
        )

    node_info = {
        r["nid"]: (r["label"], Identifier(r["id_type"], r["id_value"]))
        for r in run.arrow("dirty_nodes", dirty_nodes_expr).to_pylist()
    }

    def dirty_rows_expr() -> ir.Table:
        nodes = lab.semi_join(run.temp("k_dirty"), "label").select("nid")
        return linkable.semi_join(nodes, "nid").order_by("ts", "source", "message_id", "nid")

    greedy = Greedy(rules, separations)
    if node_info:
        for rec in _records(run.arrow("dirty_rows", dirty_rows_expr)):
            greedy.record(rec, node_info)
    assignment = greedy.groups(node_info)
    run.put(
        "k_assign",
        pa.table(
            {"nid": list(assignment), "dgrp": list(assignment.values())},
            schema=pa.schema([("nid", pa.int64()), ("dgrp", pa.string())]),
        ),
    )
    timings["greedy"] = time.perf_counter() - t0

    t0 = time.perf_counter()

    def identities_expr() -> ir.Table:
        assign = run.temp("k_assign")
        assigned = lab.mutate(rank=_rank_expr(rules, lab.id_type))
        assigned = assigned.left_join(assign, "nid").drop("nid_right")
        assigned = assigned.mutate(grp=assigned.dgrp.fill_null(assigned.label.cast("string")))
        order = [assigned.first_seen, assigned.rank, assigned.id_value]
        anchors = assigned.mutate(rn=ibis.row_number().over(group_by=assigned.grp, order_by=order))
        anchors = anchors.filter(anchors.rn == 0).select(
            "grp",
            anchor_type=anchors.id_type,
            anchor_value=anchors.id_value,
            profile_id=profile_id_expr(salt, anchors.id_type, anchors.id_value),
        )
        closures = assigned.mutate(
            rn=ibis.row_number().over(group_by=assigned.label, order_by=order)
        )
        closures = closures.filter(closures.rn == 0).select(
            "label",
            closure_id=ibis.literal("c_") + _hash_expr(salt, closures.id_type, closures.id_value),
        )
        out = assigned.join(anchors, "grp").join(closures, "label")
        return out.select(
            "id_type",
            "id_value",
            "profile_id",
            "closure_id",
            "first_seen",
            "last_seen",
            "nid",
            "anchor_type",
            "anchor_value",
            shared=out.shared_n.notnull(),
            shared_n=out.shared_n,
        )

    identities = run.make("k_identities", "identities", identities_expr)
    timings["assign"] = time.perf_counter() - t0

    conflicts = greedy.conflicts(run, node_info)

    def shared_expr() -> ir.Table:
        return identities.filter(identities.shared).select(
            "id_type", "id_value", "profile_id", "closure_id", "shared_n", "first_seen"
        )

    for r in run.arrow("shared", shared_expr).to_pylist():
        conflicts.append(
            Conflict(
                closure_id=r["closure_id"],
                reason="shared_identifier",
                id_type=r["id_type"],
                id_value=r["id_value"],
                kept_profile=r["profile_id"],
                refused_profile=None,
                source=None,
                message_id=None,
                at=r["first_seen"],
                occurrences=int(r["shared_n"]),
                detail=f"seen with {r['shared_n']} different one-per-person identifiers",
            )
        )
    conflicts.extend(_circular_aliases(run, rows, mode))
    timings["total"] = time.perf_counter() - started
    return StitchResult(
        identities=identities,
        conflicts=conflicts,
        rounds=rounds,
        dirty_closures=len({label for label, _ in node_info.values()}),
        timings=timings,
    )


def _release(run: Runner, *names: str) -> None:
    """Free intermediate tables no later stage reads (a rebuild's are large). Only on the
    DuckDB runner: other runners keep theirs until `drop_temps`."""
    if type(run) is Runner:
        run.drop(*names)


def _loose(table: ir.Table) -> ir.Table:
    """The same table with every column nullable (set operations need equal schemas)."""
    schema = table.schema()
    return table.cast({name: dtype.copy(nullable=True) for name, dtype in schema.items()})


def _records(table: pa.Table) -> list[dict[str, Any]]:
    """Group rows (sorted by ts, source, message_id) into records with their node ids."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for row in table.to_pylist():
        key = (row["source"], row["message_id"])
        if current is None or current["key"] != key:
            current = {"key": key, "ts": row["ts"], "alias": False, "nids": []}
            out.append(current)
        current["nids"].append(row["nid"])
        if row["role"] == "previous":
            current["alias"] = True
    return out


class Greedy:
    """Apply links one record at a time in canonical order, refusing what breaks a rule."""

    def __init__(self, rules: IdentityRules, separations: list[Separation]) -> None:
        self.rules = rules
        self.rank = {t: i for i, t in enumerate(identifier_order(rules))}
        self.separations = separations
        self.parent: dict[int, int] = {}
        self.counts: dict[int, dict[str, int]] = {}
        self.sides: dict[int, set[tuple[int, int]]] = {}
        # (reason, refused nid, kept nid) -> [first record key, first ts, occurrences, detail]
        self.refused: dict[tuple[str, int, int], list[Any]] = {}

    def _init(self, nid: int, ident: Identifier) -> None:
        if nid in self.parent:
            return
        self.parent[nid] = nid
        self.counts[nid] = {ident.type: 1}
        sides: set[tuple[int, int]] = set()
        for index, sep in enumerate(self.separations):
            if ident in sep.keep:
                sides.add((index, 0))
            if ident in sep.split:
                sides.add((index, 1))
        self.sides[nid] = sides

    def find(self, nid: int) -> int:
        root = nid
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[nid] != root:
            self.parent[nid], nid = root, self.parent[nid]
        return root

    def record(self, rec: dict[str, Any], info: dict[int, tuple[int, Identifier]]) -> None:
        nids = sorted(set(rec["nids"]), key=lambda n: (self.rank[info[n][1].type], info[n][1]))
        for nid in nids:
            self._init(nid, info[nid][1])
        first = nids[0]
        for nid in nids[1:]:
            a, b = self.find(first), self.find(nid)
            if a == b:
                continue
            reason, detail = self._refusal(a, b, rec)
            if reason is None:
                # union: smaller root id wins, for determinism
                keep, gone = (a, b) if a < b else (b, a)
                self.parent[gone] = keep
                merged = self.counts[keep]
                for t, n in self.counts.pop(gone).items():
                    merged[t] = merged.get(t, 0) + n
                self.sides[keep] |= self.sides.pop(gone)
                continue
            key = (reason, nid, first)
            seen = self.refused.get(key)
            if seen is None:
                self.refused[key] = [rec["key"], rec["ts"], 1, detail]
            else:
                seen[2] += 1

    def _refusal(self, a: int, b: int, rec: dict[str, Any]) -> tuple[str | None, str | None]:
        sa, sb = self.sides[a], self.sides[b]
        for index, side in sa:
            if (index, 1 - side) in sb:
                return "unmerged", f"split by unmerge {self.separations[index].id}"
        ca, cb = self.counts[a], self.counts[b]
        for t in sorted(set(ca) | set(cb), key=lambda t: self.rank[t]):
            total = ca.get(t, 0) + cb.get(t, 0)
            limit = self.rules.limit(t)
            if total > limit:
                detail = f"would give one profile {total} {t} identifiers (limit {limit})"
                if rec["alias"] and t == "user_id":
                    return "alias_to_other_person", detail
                return "limit_exceeded", detail
        return None, None

    def groups(self, info: dict[int, tuple[int, Identifier]]) -> dict[int, str]:
        """nid -> group key for every node of a dirty closure."""
        out: dict[int, str] = {}
        for nid, (label, _) in info.items():
            root = self.find(nid) if nid in self.parent else nid
            out[nid] = f"{label}.{root}"
        return out

    def conflicts(self, run: Runner, info: dict[int, tuple[int, Identifier]]) -> list[Conflict]:
        if not self.refused:
            return []
        wanted = sorted({n for _, refused, kept in self.refused for n in (refused, kept)})
        run.put("k_wanted", pa.table({"nid": pa.array(wanted, pa.int64())}))

        def where_expr() -> ir.Table:
            ids = run.temp("k_identities")
            return ids.semi_join(run.temp("k_wanted"), "nid").select(
                "nid", "profile_id", "closure_id"
            )

        where = {r["nid"]: r for r in run.arrow("conflict_where", where_expr).to_pylist()}
        out = []
        for (reason, refused, kept), (key, ts, n, detail) in sorted(
            self.refused.items(), key=lambda kv: (kv[1][1], kv[1][0], kv[0])
        ):
            ident = info[refused][1]
            out.append(
                Conflict(
                    closure_id=where[kept]["closure_id"],
                    reason=reason,
                    id_type=ident.type,
                    id_value=ident.value,
                    kept_profile=where[kept]["profile_id"],
                    refused_profile=where[refused]["profile_id"],
                    source=key[0],
                    message_id=key[1],
                    at=ts,
                    occurrences=n,
                    detail=detail,
                )
            )
        return out


def _circular_aliases(run: Runner, rows: ir.Table, mode: str) -> list[Conflict]:
    """Aliases that point at themselves or reverse an earlier alias (recorded, no effect)."""

    def aliases_expr() -> ir.Table:
        prev = rows.filter((rows.role == "previous") & (rows.id_type == "user_id"))
        prev = prev.select("source", "message_id", "ts", previous=prev.id_value)
        users = rows.filter((rows.role == "self") & (rows.id_type == "user_id"))
        users = users.select("source", "message_id", user=users.id_value)
        ids = run.temp("k_identities")
        home = ids.filter(ids.id_type == "user_id").select(
            user=ids.id_value, profile_id=ids.profile_id, closure_id=ids.closure_id
        )
        return (
            prev.join(users, ["source", "message_id"])
            .join(home, "user")
            .order_by("ts", "source", "message_id")
        )

    seen: set[tuple[str, str]] = set()
    out: list[Conflict] = []
    for alias in run.arrow(f"aliases/{mode}", aliases_expr).to_pylist():
        pair = (alias["previous"], alias["user"])
        detail = None
        if alias["previous"] == alias["user"]:
            detail = "previousId and userId are the same"
        elif (alias["user"], alias["previous"]) in seen:
            detail = "reverses an earlier alias"
        seen.add(pair)
        if detail is None:
            continue
        out.append(
            Conflict(
                closure_id=alias["closure_id"],
                reason="circular_alias",
                id_type="user_id",
                id_value=alias["previous"],
                kept_profile=alias["profile_id"],
                refused_profile=None,
                source=alias["source"],
                message_id=alias["message_id"],
                at=alias["ts"],
                detail=detail,
            )
        )
    return out
