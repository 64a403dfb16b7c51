"""Audiences: segment members sent to ad platforms and files, with only what changed.

For each destination and segment Kilde remembers who it sent last time. A sync computes the
members now (segment membership, then the consent and do-not-sell checks at this moment),
writes the people added and removed since the last sync, and records the new state in the same
transaction. A full sync writes everyone and replaces the state.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from kilde.activate import hashing, uploads
from kilde.activate.permissions import permission
from kilde.activate.segments import MISSING_SEGMENT_FIX, missing_segment_message, segment_exists
from kilde.activate.uploads import UploadError
from kilde.errors import KildeError
from kilde.plan.destinations import Destination
from kilde.plan.models import Plan
from kilde.store import Store, WriteBatch, Writer

GOOGLE_COLUMNS = ["Email", "Phone", "First Name", "Last Name", "Country", "Zip"]
# Meta's customer-list file headers; its upload API calls the same columns EMAIL, PHONE, ...
META_COLUMNS = ["email", "phone", "fn", "ln", "country"]
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
    uploaded: int | None = None  # people sent to the platform, when credentials are given
    upload_error: str | None = None


def log_statement(
    destination: str,
    segment: str,
    error: str | None,
    status: int | None = None,
    *,
    at: datetime | None = None,
) -> tuple[str, list[Any]]:
    """A delivery-log row for one audience sync of one segment (its outcome or its error)."""
    return (
        "INSERT INTO delivery_log (delivery_id, destination, attempt, attempted_at, status, "
        "error, duration_ms) VALUES (?, ?, 1, ?, ?, ?, NULL)",
        [f"sync:{segment}", destination, at or datetime.now(UTC), status, error],
    )


def segment_members(store: Store, plan: Plan, segment: str) -> list[str]:
    """Profile ids currently in a segment; an error for a segment that does not exist."""
    if not segment_exists(store, plan, segment):
        # Never treat a deleted segment as empty: that would remove everyone downstream.
        raise ActivationError(missing_segment_message(segment), fix=MISSING_SEGMENT_FIX)
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
    phone = hashing.google_phone(_text(traits.get("phone")), _text(traits.get("country")))
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
        "email": hashing.hashed(hashing.meta_email(_text(traits.get("email")))),
        "phone": hashing.hashed(
            hashing.meta_phone(_text(traits.get("phone")), _text(traits.get("country")))
        ),
        "fn": hashing.hashed(hashing.meta_name(_text(traits.get("first_name")))),
        "ln": hashing.hashed(hashing.meta_name(_text(traits.get("last_name")))),
        "country": hashing.hashed(hashing.meta_country(_text(traits.get("country")))),
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
        reports = []
        for segment in destination.segments:
            try:
                reports.append(self._sync_segment(destination, segment, full=full))
            except ActivationError as exc:
                # In the delivery log too, where the scheduled syncs' outcomes are read.
                self.writer.write_sync(
                    WriteBatch(statements=[log_statement(destination.name, segment, exc.message)])
                )
                raise
        return reports

    def _sync_segment(self, destination: Destination, segment: str, *, full: bool) -> SyncReport:
        sale = destination.kind in SALE_KINDS
        # Ad lists and partner exports share data with a third party: consent for the purpose
        # is required whatever basis the plan gives it (the plan check says so too).
        allowed = permission(self.store, self.plan, destination.purpose, require_consent=sale)
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
        # A full sync sends everyone; those who left since the last sync are still removed.
        added = sorted(current if full else current - previous)
        removed = sorted(previous - current)
        report.added, report.removed = len(added), len(removed)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        folder = self._directory(destination)
        columns, added_rows = self._rows(destination, added)
        _, removed_rows = self._rows(destination, removed)
        if added or full:
            name = f"{segment}-{stamp}-{'full' if full else 'add'}"
            report.files.append(self._write(destination, folder, name, columns, added_rows))
        if removed:
            name = f"{segment}-{stamp}-remove"
            report.files.append(self._write(destination, folder, name, columns, removed_rows))
        statements: list[tuple[str, list[Any]]] = []
        for file in report.files:
            statements.extend(self._manifest(destination, segment, file, report, now))
        status: int | None = None
        if destination.upload is not None and (added or removed or full):
            try:
                result = self._upload(destination, added_rows, removed_rows, full=full)
            except UploadError as exc:
                # Nothing is lost: the state stays as it was, so the next sync sends this
                # difference again. The files and their manifests are written all the same.
                report.upload_error = exc.message
                statements.append(log_statement(destination.name, segment, exc.message, exc.status))
                self.writer.write_sync(WriteBatch(statements=statements))
                return report
            report.uploaded = result.sent_added + result.sent_removed
            status = result.last_status
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
        statements.append(log_statement(destination.name, segment, None, status, at=now))
        self.writer.write_sync(WriteBatch(statements=statements))
        return report

    def _upload(
        self,
        destination: Destination,
        added: list[dict[str, Any]],
        removed: list[dict[str, Any]],
        *,
        full: bool,
    ) -> uploads.UploadResult:
        if destination.kind == "meta_custom_audience":
            return uploads.meta_upload(
                destination,
                [[r[c] for c in META_COLUMNS] for r in added],
                [[r[c] for c in META_COLUMNS] for r in removed],
            )
        return uploads.google_upload(destination, added, removed, full=full)

    def _rows(
        self, destination: Destination, profiles: list[str]
    ) -> tuple[list[str], list[dict[str, Any]]]:
        make: Callable[[dict[str, Any]], dict[str, Any]]
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
        return columns, rows

    def _write(
        self,
        destination: Destination,
        folder: Path,
        name: str,
        columns: list[str],
        rows: list[dict[str, Any]],
    ) -> str:
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
    ) -> list[tuple[str, list[Any]]]:
        """What was shared, when, with whom and under which basis: beside the file, in
        `export_manifests` and in the audit log (`kilde privacy audit`)."""
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
        audit = (
            "INSERT INTO audit_log (logged_at, actor, action, status, personal_data, subject, "
            "detail) VALUES (?, ?, ?, NULL, TRUE, NULL, ?)",
            [
                at,
                "kilde activation",
                f"EXPORT {destination.kind} {destination.name}",
                orjson.dumps(
                    {**manifest, "rows_added": report.added, "rows_removed": report.removed}
                ).decode(),
            ],
        )
        return [
            audit,
            (
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
            ),
        ]
