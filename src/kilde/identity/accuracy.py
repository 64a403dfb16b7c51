"""Merge precision and recall against a known truth (the demo knows who sent each message).

Pairwise over events: two events are "merged" when they land on the same profile, and "the same
person" when the same synthetic person sent them. Precision is the share of merged pairs that
are the same person (wrong merges lower it); recall is the share of same-person pairs that were
merged (missed merges lower it). Events whose identifiers were all junk count as profiles of
their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kilde.demo.generator import TRUTH_FILE
from kilde.errors import KildeError
from kilde.store.database import Store


def accuracy_report(store: Store, data_dir: Path) -> dict[str, Any]:
    path = data_dir / TRUTH_FILE
    if not path.exists():
        raise KildeError(
            "there is no demo truth in this data directory",
            fix="run `kilde demo` first; the report compares profiles with the demo's people",
        )
    rows = store.query(
        "WITH truth AS (SELECT message_id, person FROM read_parquet(?)), "
        "placed AS ("
        " SELECT t.person, coalesce(m.profile_id, 'none:' || t.message_id) AS profile"
        " FROM truth t"
        " JOIN identity_records r ON r.message_id = t.message_id"
        " LEFT JOIN identity_map m"
        "  ON m.id_type = r.primary_type AND m.id_value = r.primary_value), "
        "cells AS (SELECT person, profile, count(*)::DOUBLE AS n FROM placed GROUP BY ALL), "
        "people AS (SELECT person, sum(n) AS n, count(*) AS profiles FROM cells GROUP BY ALL), "
        "profs AS (SELECT profile, sum(n) AS n, count(*) AS people FROM cells GROUP BY ALL) "
        "SELECT"
        " (SELECT sum(n * (n - 1) / 2) FROM cells) AS both_pairs,"
        " (SELECT sum(n * (n - 1) / 2) FROM profs) AS merged_pairs,"
        " (SELECT sum(n * (n - 1) / 2) FROM people) AS true_pairs,"
        " (SELECT count(*) FROM people) AS people,"
        " (SELECT count(*) FROM profs) AS profiles,"
        " (SELECT count(*) FROM people WHERE profiles > 1) AS people_split,"
        " (SELECT count(*) FROM profs WHERE people > 1) AS profiles_mixed,"
        " (SELECT sum(n) FROM cells) AS events",
        [str(path)],
    )
    row = rows[0]
    both = float(row["both_pairs"] or 0)
    merged = float(row["merged_pairs"] or 0)
    true = float(row["true_pairs"] or 0)
    precision = both / merged if merged else 1.0
    recall = both / true if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    conflicts = store.query(
        "SELECT reason, count(*) AS n FROM identity_conflicts GROUP BY ALL ORDER BY reason"
    )
    return {
        "events": int(row["events"] or 0),
        "people": int(row["people"] or 0),
        "profiles": int(row["profiles"] or 0),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "people_split": int(row["people_split"] or 0),
        "profiles_mixed": int(row["profiles_mixed"] or 0),
        "conflicts": {r["reason"]: r["n"] for r in conflicts},
        "explanation": (
            "Pairs of events: precision = share of pairs on one profile that one person sent "
            "(wrong merges lower it); recall = share of one person's pairs that ended on one "
            "profile (missed merges, such as a mistyped email on a device never logged in, "
            "lower it)."
        ),
    }
