"""Audiences: segment members sent to ad platforms and files, with only what changed.

For each destination and segment Kilde remembers who it sent last time. A sync computes the
members now (segment membership, then the consent and do-not-sell checks at this moment),
writes the people added and removed since the last sync, and records the new state in the same
transaction. A full sync writes everyone and replaces the state.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from kilde.activate import hashing
from kilde.activate.permissions import permission
from kilde.errors import KildeError
from kilde.plan.destinations import Destination
from kilde.plan.models import Plan
from kilde.store import Store, WriteBatch, Writer

GOOGLE_COLUMNS = ["Email", "Phone", "First Name", "Last Name", "Country", "Zip"]
META_COLUMNS = ["EMAIL", "PHONE", "FN", "LN", "COUNTRY"]
SALE_KINDS = ("google_customer_match", "meta_custom_audience", "partner_export")


class ActivationError(KildeError):
    """A destination cannot run as configured."""


@dataclass
class SyncReport:
    destination: str
    segment: str
    members: int = 0
    added: int = 0
    removed: int = 0
    excluded_no_consent: int = 0
    excluded_do_not_sell: int = 0
    files: list[str] = field(default_factory=list)


def segment_members(store: Store, plan: Plan, segment: str) -> list[str]:
    """Profile ids currently in a segment; an error for a segment that does not exist."""
    declared = plan.segments.get(segment) is not None
    if not declared:
        declared = bool(
            store.scalar("SELECT count(*) FROM segment_definitions WHERE id = ?", [segment])
        )
    if not declared:
        # Never treat a deleted segment as empty: that would remove everyone downstream.
        raise ActivationError(
            f"segment {segment!r} does not exist",
            fix="declare it under 'segments' in the plan, or remove it from the destination",
        )
    rows = store.query(
        "SELECT DISTINCT profile_id FROM segment_memberships "
        "WHERE segment_id = ? AND exited_at IS NULL ORDER BY profile_id",
        [segment],
    )
    return [r["profile_id"] for r in rows]


def _traits(store: Store, profiles: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """The winning value of each named trait per profile."""
    if not profiles or not names:
        return {p: {} for p in profiles}
    marks = ", ".join("?" for _ in names)
    rows = store.query(
        f"SELECT profile_id, name, value FROM profile_traits WHERE name IN ({marks}) "
        "AND profile_id IN (SELECT unnest(?::VARCHAR[]))",
        [*names, profiles],
    )
    found: dict[str, dict[str, Any]] = {p: {} for p in profiles}
    for row in rows:
        value = orjson.loads(row["value"]) if isinstance(row["value"], str) else row["value"]
        found[row["profile_id"]][row["name"]] = value
    return found


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def google_row(traits: dict[str, Any]) -> dict[str, str]:
    email = hashing.google_email(_text(traits.get("email")))
    phone = hashing.google_phone(_text(traits.get("phone")))
    return {
        "Email": hashing.hashed(email),
        "Phone": hashing.hashed(phone),
        "First Name": hashing.hashed(hashing.google_name(_text(traits.get("first_name")))),
        "Last Name": hashing.hashed(hashing.google_name(_text(traits.get("last_name")))),
        "Country": _text(traits.get("country")).strip().upper(),
        "Zip": _text(traits.get("zip")).strip(),
    }


def meta_row(traits: dict[str, Any]) -> dict[str, str]:
    return {
        "EMAIL": hashing.hashed(hashing.meta_email(_text(traits.get("email")))),
        "PHONE": hashing.hashed(hashing.meta_phone(_text(traits.get("phone")))),
        "FN": hashing.hashed(hashing.meta_name(_text(traits.get("first_name")))),
        "LN": hashing.hashed(hashing.meta_name(_text(traits.get("last_name")))),
        "COUNTRY": hashing.hashed(hashing.meta_country(_text(traits.get("country")))),
    }


class AudienceSync:
    def __init__(self, store: Store, writer: Writer, plan: Plan, data_dir: Path) -> None:
        self.store = store
        self.writer = writer
        self.plan = plan
        self.data_dir = data_dir

    def _directory(self, destination: Destination) -> Path:
        base = Path(destination.directory)
        folder = (base if base.is_absolute() else self.data_dir / base) / destination.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def sync(self, destination: Destination, *, full: bool = False) -> list[SyncReport]:
        if destination.kind == "webhook":
            raise ActivationError(
                "webhooks send events as they come; there is nothing to sync",
                fix="run `kilde destinations run NAME` to deliver what is due",
            )
        allowed = permission(self.store, self.plan, destination.purpose)
        sale = destination.kind in SALE_KINDS
        reports = []
        for segment in destination.segments:
            members = segment_members(self.store, self.plan, segment)
            report = SyncReport(destination.name, segment, members=len(members))
            kept: list[str] = []
            for profile in members:
                ok, why = allowed.allows(profile, sale=sale)
                if ok:
                    kept.append(profile)
                elif why == "opted out of sale or sharing":
                    report.excluded_do_not_sell += 1
                else:
                    report.excluded_no_consent += 1
            previous = {
                r["profile_id"]
                for r in self.store.query(
                    "SELECT profile_id FROM audience_syncs WHERE destination = ? AND segment = ?",
                    [destination.name, segment],
                )
            }
            now = datetime.now(UTC)
            current = set(kept)
            added = sorted(current if full else current - previous)
            removed = sorted(set() if full else previous - current)
            report.added, report.removed = len(added), len(removed)
            stamp = now.strftime("%Y%m%dT%H%M%SZ")
            folder = self._directory(destination)
            statements: list[tuple[str, list[Any]]] = []
            if added or full:
                name = f"{segment}-{stamp}-{'full' if full else 'add'}"
                report.files.append(self._write(destination, folder, name, added))
            if removed:
                report.files.append(
                    self._write(destination, folder, f"{segment}-{stamp}-remove", removed)
                )
            statements.append(
                (
                    "DELETE FROM audience_syncs WHERE destination = ? AND segment = ?",
                    [destination.name, segment],
                )
            )
            if kept:
                statements.append(
                    (
                        "INSERT INTO audience_syncs (destination, segment, profile_id, synced_at) "
                        "SELECT ?, ?, unnest(?::VARCHAR[]), ?",
                        [destination.name, segment, sorted(current), now],
                    )
                )
            for file in report.files:
                statements.append(self._manifest(destination, segment, file, report, now))
            self.writer.write_sync(WriteBatch(statements=statements))
            reports.append(report)
        return reports

    def _write(self, destination: Destination, folder: Path, name: str, profiles: list[str]) -> str:
        if destination.kind == "google_customer_match":
            columns, make = GOOGLE_COLUMNS, google_row
            wanted = ["email", "phone", "first_name", "last_name", "country", "zip"]
        elif destination.kind == "meta_custom_audience":
            columns, make = META_COLUMNS, meta_row
            wanted = ["email", "phone", "first_name", "last_name", "country"]
        else:
            wanted = destination.traits or ["email"]
            columns = ["profile_id", *wanted]

            def make(traits: dict[str, Any]) -> dict[str, Any]:
                return {t: traits.get(t) for t in wanted}

        traits = _traits(self.store, profiles, wanted)
        rows = []
        for profile in profiles:
            row = make(traits[profile])
            if "profile_id" in columns:
                row = {"profile_id": profile, **row}
            rows.append(row)
        if destination.format == "parquet" and destination.kind in ("file", "partner_export"):
            path = folder / f"{name}.parquet"
            table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in columns})
            pq.write_table(table, path)
        else:
            path = folder / f"{name}.csv"
            with path.open("w", newline="", encoding="utf-8") as out:
                writer = csv.DictWriter(out, fieldnames=columns)
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return str(path)

    def _manifest(
        self, destination: Destination, segment: str, file: str, report: SyncReport, at: datetime
    ) -> tuple[str, list[Any]]:
        """What was shared, when, with whom and under which basis (for the audit trail)."""
        purpose = next((p for p in self.plan.purposes if p.id == destination.purpose), None)
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
        manifest = {
            "destination": destination.name,
            "kind": destination.kind,
            "recipient": destination.recipient or destination.name,
            "segment": segment,
            "file": Path(file).name,
            "sha256": digest,
            "purpose": destination.purpose,
            "legal_basis": purpose.legal_basis if purpose else None,
            "excluded_no_consent": report.excluded_no_consent,
            "excluded_do_not_sell": report.excluded_do_not_sell,
            "created_at": at.isoformat(),
        }
        Path(file).with_suffix(".manifest.json").write_bytes(
            orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
        )
        return (
            "INSERT INTO export_manifests (destination, segment, file, sha256, rows_added, "
            "rows_removed, purpose, legal_basis, recipient, excluded_no_consent, "
            "excluded_do_not_sell, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                destination.name,
                segment,
                Path(file).name,
                digest,
                report.added,
                report.removed,
                destination.purpose,
                manifest["legal_basis"],
                manifest["recipient"],
                report.excluded_no_consent,
                report.excluded_do_not_sell,
                at,
            ],
        )
