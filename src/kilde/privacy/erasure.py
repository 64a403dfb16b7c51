"""Erasure (GDPR Art. 17, CCPA right to delete): remove a person for good, and prove it.

`erase` works in this order, so that no half-erased person is ever visible and nothing of the
person gets in again:

1. Every identifier of the person (from the identity map) goes on the suppression list in
   memory: from this moment the door drops their records, whatever channel they come through.
2. Identity resolution catches up with what was stored before, and the person is resolved
   again, so identifiers linked at the last moment are erased (and suppressed) too.
3. On the writer thread, with no other write in between (`Writer.exclusive`), one transaction
   deletes every row of the person in every table (events, identities, profiles, traits,
   consents, dead letters, email recipients, survey invitations, segment memberships, scores,
   deliveries, ...), removes their values where they appear in rows of other tables, and
   records the erasure (hashes and counts only) and the suppression list entries.
4. Still alone on the writer thread, the store is compacted: copied with COPY FROM DATABASE
   into a fresh file that is swapped in for the old one, whose write-ahead log goes with it.
   Deleted rows no longer linger in free blocks of the file.
5. Files under the data directory that mention the person (uploaded import files, exports)
   are cleaned: text files lose the lines, other files are deleted. Customer lists for ad
   platforms hold SHA-256 hashes of the normalised email and phone, so those are looked for too.

The answer names the destinations the person's data was sent to before (`notify`): copies
there are outside Kilde's reach, and their recipients must be told (GDPR Art. 17(2) and 19).

Batches that were already screened when step 1 happened are screened again by the writer at
commit (kilde.privacy.enforcement), so a record on its way during the erasure cannot land after
it. Erasing someone already erased answers `already_erased`; someone never seen, 404.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import phonenumbers

from kilde.activate import hashing
from kilde.errors import ConfigError
from kilde.identity.identifiers import Identifier
from kilde.pipeline.dead_letter import payload_field
from kilde.privacy.services import Privacy
from kilde.privacy.subjects import RECIPIENT, Subject, SubjectError, expand
from kilde.store.ack_log import LOG_DIR
from kilde.store.database import DB_FILE, Store

log = logging.getLogger("kilde.privacy")

# Tables whose rows are the person's own: a row that mentions them is removed.
PERSON_TABLES = (
    "events",
    "dead_letters",
    "consent_ledger",
    "identity_records",
    "identity_observations",
    "identity_map",
    "identity_conflicts",
    "identity_separations",
    "profiles",
    "profile_traits",
    "profile_ids",
    "email_campaign_recipients",
    "form_invites",
    "segment_memberships",
    "profile_insights",
    "audience_syncs",
    "deliveries",
)
# Tables that never hold a customer's data in clear (hashes, counts, staff accounts).
SKIP_TABLES = frozenset(
    {
        "schema_migrations",
        "privacy_state",
        "suppression_list",
        "suppression_counts",
        "consent_gate_counts",
        "erasures",
        "privacy_requests",
        "audit_log",
        "retention_runs",
        "identity_state",
        "dashboard_users",
        "dashboard_sessions",
    }
)
MIN_SWEEP_LENGTH = 6  # shorter values (user id "42") are matched in id columns only
REDACTED = "[erased]"
_TEXT_FILES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson", ".md", ".html", ".log")
_KEEP_FILES = frozenset({DB_FILE, "secret.key", "server.json", "admin-token.sha256"})


def erase(
    privacy: Privacy,
    body: dict[str, Any],
    *,
    request_id: str | None = None,
    actor: str | None = None,
    compact: bool = True,
) -> dict[str, Any]:
    """Erase the person a request body names; see the module docstring."""
    privacy.catch_up()
    with privacy.lock:
        started = time.perf_counter()
        requested_at = datetime.now(UTC)
        subject = privacy.subject(body)
        subject_hash = privacy.subject_hash(subject)
        suppression = privacy.screen.suppression
        if not subject.known and not _holds_anything(privacy.store, subject):
            prior = _prior(privacy, subject)
            if prior is None:
                raise SubjectError(
                    404,
                    "person_not_found",
                    "Kilde holds nothing under that identifier",
                    fix="check it (a whole email address, user id or phone number); to keep "
                    "someone from being collected in future, use `kilde privacy suppress`",
                )
            if not prior["compacted"] and compact:
                privacy.writer.exclusive(lambda: _compact(privacy.store))
                privacy.writer.write_sync(_mark_compacted(prior["id"]))
                prior["compacted"] = True
            return {"status": "already_erased", **_public(prior)}
        erasure_id = "er_" + uuid.uuid4().hex[:20]
        identifiers = set(subject.identifiers)
        suppression.add(_suppressible(privacy, identifiers))  # 1. the door closes now
        engine = privacy.identity
        lock = engine.lock if engine is not None else contextlib.nullcontext()
        if engine is not None:
            engine.stop()
        try:
            with lock:
                if engine is not None:
                    _catch_up(engine)
                subject = expand(privacy.store, subject)  # 2. linked at the last moment
                identifiers = set(subject.identifiers)
                suppressed = _suppressible(privacy, identifiers)
                hashes = suppression.add(suppressed)
                if engine is not None:
                    engine.stop()  # its connection must not outlive the file
                record = {
                    "id": erasure_id,
                    "requested_at": requested_at,
                    "request_id": request_id,
                    "subject": subject_hash,
                    "identifiers": len(identifiers),
                    "profiles": len(subject.profile_ids),
                    "actor": actor,
                }
                rows = suppression.rows(hashes, "erasure", erasure_id)
                notify = shared_with(privacy, subject)  # read before the rows go
                removed = privacy.writer.exclusive(
                    lambda: _erase_in_store(privacy.store, subject, suppressed, rows, record)
                )
                compacted = False
                if compact:
                    try:
                        privacy.writer.exclusive(lambda: _compact(privacy.store))
                        compacted = True
                    except Exception as exc:  # the rows are gone; the file keeps free blocks
                        log.error("compacting the store failed: %s", type(exc).__name__)
        finally:
            if engine is not None and _identity_runs():
                engine.start()
        privacy.screen.consent.forget(subject.values("user_id"), subject.values("anonymous_id"))
        files = clean_files(
            privacy.data_dir, _sweep_values(subject, suppressed) + _hashed_values(suppressed)
        )
        details = {"tables": removed, "files": files, "notify": notify}
        privacy.writer.write_sync(_finish(erasure_id, details, compacted))
        return {
            "status": "erased",
            "erasure_id": erasure_id,
            "requested_at": requested_at,
            "completed_at": datetime.now(UTC),
            "profiles": len(subject.profile_ids),
            "identifiers": len(identifiers),
            "suppressed": len(hashes),
            "removed": removed,
            "rows_removed": sum(removed.values()),
            "files_cleaned": files,
            "notify": notify,
            "compacted": compacted,
            "seconds": round(time.perf_counter() - started, 3),
        }


# -- who exactly --------------------------------------------------------------------------------


def _identity_runs() -> bool:
    import os

    return os.environ.get("KILDE_IDENTITY_BACKGROUND", "1") != "0"


def _catch_up(engine: Any, seconds: float = 20.0) -> None:
    """Let identity resolution read what was stored before the door closed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if engine.step() is None:
                return
        except Exception as exc:  # erase with what is known; the sweep finds the rest
            log.error("identity catch-up before an erasure failed: %s", type(exc).__name__)
            return


def _suppressible(privacy: Privacy, identifiers: Iterable[Identifier]) -> list[Identifier]:
    """The person's identifiers, and the pseudonyms their mail was tracked under."""
    out = list(identifiers)
    try:
        signer = privacy.signer_of()
    except ConfigError:  # no secret key: no tracked mail either
        return out
    for ident in list(out):
        if ident.type == "user_id":
            value = signer.pseudonym("email-recipient", "user:" + ident.value)
        elif ident.type == "email":
            value = signer.pseudonym("email-recipient", "email:" + ident.value)
        else:
            continue
        out.append(Identifier(RECIPIENT, value))
    return out


def _holds_anything(store: Store, subject: Subject) -> bool:
    users, anons = subject.values("user_id"), subject.values("anonymous_id")
    plain = users + anons
    if plain and store.scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events WHERE list_contains(?, trim(user_id)) "
        "OR list_contains(?, trim(anonymous_id)) LIMIT 1)",
        [users, anons],
    ):
        return True
    if plain and store.scalar(
        "SELECT count(*) FROM (SELECT 1 FROM consent_ledger WHERE "
        "list_contains(?, trim(user_id)) OR list_contains(?, trim(anonymous_id)) LIMIT 1)",
        [users, anons],
    ):
        return True
    values = _sweep_values(subject, subject.identifiers)
    if not values:
        return False
    pattern = _pattern(values)
    for table, columns in (
        ("dead_letters", ("payload",)),
        ("events", ("traits", "context", "properties")),
    ):
        where = " OR ".join(f"regexp_matches(lower({c}), ?)" for c in columns)
        if store.scalar(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {where} LIMIT 1)",
            [pattern] * len(columns),
        ):
            return True
    return False


def _prior(privacy: Privacy, subject: Subject) -> dict[str, Any] | None:
    """The erasure that already took this person, if one did."""
    hashes = [privacy.hasher.ident(i) for i in subject.given]
    if not hashes:
        return None
    rows = privacy.store.query(
        "SELECT e.* FROM suppression_list s JOIN erasures e ON e.id = s.erasure_id "
        "WHERE list_contains(?, s.hash) ORDER BY e.requested_at DESC LIMIT 1",
        [hashes],
    )
    return rows[0] if rows else None


def _public(record: dict[str, Any]) -> dict[str, Any]:
    removed = record.get("removed")
    details = orjson.loads(removed) if isinstance(removed, str) else (removed or {})
    tables = details.get("tables", {})
    return {
        "erasure_id": record["id"],
        "requested_at": record["requested_at"],
        "completed_at": record["completed_at"],
        "profiles": record["profiles"],
        "identifiers": record["identifiers"],
        "removed": tables,
        "rows_removed": sum(tables.values()),
        "files_cleaned": details.get("files", []),
        "notify": details.get("notify", []),
        "compacted": record["compacted"],
    }


def shared_with(privacy: Privacy, subject: Subject) -> list[dict[str, Any]]:
    """The destinations the person's data was sent to (audience syncs, delivered events): the
    recipients to tell about the erasure (GDPR Art. 17(2), 19). Names only, no personal data."""
    store = privacy.store
    profiles = subject.profile_ids
    people = [*profiles, *subject.values("user_id", "anonymous_id")]
    names: set[str] = set()
    for table, sql, params in (
        (
            "audience_syncs",
            "SELECT DISTINCT destination FROM audience_syncs WHERE list_contains(?, profile_id)",
            [profiles],
        ),
        (
            "deliveries",
            "SELECT DISTINCT destination FROM deliveries "
            "WHERE state = 'delivered' AND list_contains(?, person)",
            [people],
        ),
    ):
        exists = store.scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        )
        if exists and (profiles if table == "audience_syncs" else people):
            names |= {r["destination"] for r in store.query(sql, params)}
    by_name = {d.name: d for d in privacy.plan.destinations}
    return [
        {
            "destination": name,
            "kind": by_name[name].kind if name in by_name else None,
            "recipient": by_name[name].recipient if name in by_name else None,
        }
        for name in sorted(names)
    ]


# -- in the store (on the writer thread) ---------------------------------------------------------


def _sweep_values(subject: Subject, identifiers: Iterable[Identifier]) -> list[str]:
    """Values distinctive enough to look for anywhere: emails, phones, long ids, pseudonyms."""
    values: set[str] = set()
    for ident in identifiers:
        candidates = [ident.value]
        if ident.type == "external_id":
            candidates.append(ident.value.split(":", 1)[-1])
        if ident.type == "phone":
            candidates += _phone_formats(ident.value)
        for value in candidates:
            if len(value) >= MIN_SWEEP_LENGTH:
                values.add(value.lower())
    return sorted(values)


def _hashed_values(identifiers: Iterable[Identifier]) -> list[str]:
    """The SHA-256 hashes ad platforms' customer lists carry for the person's emails and phones
    (kilde.activate.hashing: Google's and Meta's normalisations)."""
    plain: set[str | None] = set()
    for ident in identifiers:
        if ident.type == "email":
            plain |= {hashing.google_email(ident.value), hashing.meta_email(ident.value)}
        elif ident.type == "phone":
            plain |= {hashing.google_phone(ident.value), hashing.meta_phone(ident.value)}
    return sorted(hashing.sha256(value) for value in plain if value)


def _phone_formats(e164: str) -> list[str]:
    """The ways a number is commonly written: +4741234567, 4741234567, +47 412 34 567, ..."""
    out = [e164.lstrip("+")]
    try:
        number = phonenumbers.parse(e164)
    except phonenumbers.NumberParseException:
        return out
    for fmt in (
        phonenumbers.PhoneNumberFormat.INTERNATIONAL,
        phonenumbers.PhoneNumberFormat.NATIONAL,
    ):
        out.append(phonenumbers.format_number(number, fmt))
    return out


def _pattern(values: list[str]) -> str:
    """A RE2 pattern for any of `values` as a whole JSON string or a whole field."""
    alternatives = "|".join(re.escape(v) for v in values)
    return f'(^|")({alternatives})("|$)'


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_catalog = current_database() "
        "ORDER BY table_name, ordinal_position"
    ).fetchall()
    out: dict[str, dict[str, str]] = {}
    for table, column, kind in rows:
        out.setdefault(table, {})[column] = kind
    return out


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> int:
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _erase_in_store(
    store: Store,
    subject: Subject,
    suppressed: list[Identifier],
    suppression_rows: list[tuple[str, list[Any]]],
    record: dict[str, Any],
) -> dict[str, int]:
    """One transaction: every row of the person, their values elsewhere, the proof."""
    con = store.cursor()
    removed: dict[str, int] = {}
    ids = sorted(set(subject.identifiers))
    plain = subject.values("user_id", "anonymous_id")  # a previousId may be either
    users = subject.values("user_id")
    anons = subject.values("anonymous_id")
    emails = subject.values("email")
    profiles = subject.profile_ids
    recipients = sorted({i.value for i in suppressed if i.type == RECIPIENT})
    values = _sweep_values(subject, suppressed)
    equal = sorted({*values, *profiles})  # whole-field matches; short ids: id columns only
    pattern = _pattern(values) if values else None
    tables = _tables(con)

    def text_match(table: str) -> str:
        """SQL: does a row of `table` mention the person anywhere in its text columns."""
        parts = []
        for column, kind in tables[table].items():
            if kind not in ("VARCHAR", "JSON"):
                continue
            text = f'lower(CAST("{column}" AS VARCHAR))'
            if pattern is not None:
                parts.append(f"regexp_matches({text}, $pattern)")
            parts.append(f"list_contains($equal, trim({text}))")
        return "(" + " OR ".join(parts) + ")" if parts else "false"

    def run(table: str, sql: str, **params: Any) -> None:
        if table not in tables:
            return
        used = {k: v for k, v in params.items() if f"${k}" in sql}
        n = _count(con, sql, used)  # type: ignore[arg-type]
        if n:
            removed[table] = removed.get(table, 0) + n

    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(
            "CREATE OR REPLACE TEMP TABLE erase_ids AS SELECT unnest($t) AS id_type, "
            "unnest($v) AS id_value",
            {"t": [i.type for i in ids], "v": [i.value for i in ids]},
        )
        p: dict[str, Any] = {
            "plain": plain,
            "users": users,
            "anons": anons,
            "emails": emails,
            "profiles": profiles,
            "recipients": recipients,
            "equal": equal,
            "pattern": pattern,
        }
        # the person's events: by their ids, by what identity read in them, by their values
        con.execute(
            "CREATE OR REPLACE TEMP TABLE erase_events AS "
            "SELECT source, message_id FROM events WHERE list_contains($users, trim(user_id)) "
            "OR list_contains($anons, trim(anonymous_id)) "
            "OR list_contains($plain, trim(previous_id)) "
            "UNION SELECT r.source, r.message_id FROM identity_records r JOIN erase_ids i "
            "ON r.primary_type = i.id_type AND r.primary_value = i.id_value "
            "UNION SELECT o.source, o.message_id FROM identity_observations o JOIN erase_ids i "
            "ON o.id_type = i.id_type AND o.id_value = i.id_value "
            f"UNION SELECT source, message_id FROM events WHERE {text_match('events')}",
            {
                k: v
                for k, v in p.items()
                if f"${k}" in text_match("events") or k in ("plain", "users", "anons")
            },
        )
        run(
            "events",
            "DELETE FROM events e USING erase_events x "
            "WHERE e.source = x.source AND e.message_id = x.message_id",
        )
        run(
            "identity_records",
            "DELETE FROM identity_records r WHERE EXISTS (SELECT 1 FROM erase_events x "
            "WHERE x.source = r.source AND x.message_id = r.message_id) OR EXISTS ("
            "SELECT 1 FROM erase_ids i WHERE i.id_type = r.primary_type "
            "AND i.id_value = r.primary_value)",
        )
        run(
            "identity_observations",
            "DELETE FROM identity_observations o WHERE EXISTS (SELECT 1 FROM erase_events x "
            "WHERE x.source = o.source AND x.message_id = o.message_id) OR EXISTS ("
            "SELECT 1 FROM erase_ids i WHERE i.id_type = o.id_type AND i.id_value = o.id_value)",
        )
        by_id = "EXISTS (SELECT 1 FROM erase_ids i WHERE i.id_type = t.{0} AND i.id_value = t.{1})"
        run(
            "identity_map",
            "DELETE FROM identity_map t WHERE list_contains($profiles, profile_id) OR "
            + by_id.format("id_type", "id_value"),
            **p,
        )
        run(
            "identity_conflicts",
            "DELETE FROM identity_conflicts t WHERE list_contains($profiles, kept_profile) "
            "OR list_contains($profiles, refused_profile) OR "
            + by_id.format("id_type", "id_value"),
            **p,
        )
        run(
            "profile_ids",
            "DELETE FROM profile_ids t WHERE list_contains($profiles, profile_id) OR "
            + by_id.format("anchor_type", "anchor_value"),
            **p,
        )
        run(
            "consent_ledger",
            "DELETE FROM consent_ledger WHERE list_contains($users, trim(user_id)) "
            "OR list_contains($anons, trim(anonymous_id))",
            **p,
        )
        run(
            "dead_letters",
            "DELETE FROM dead_letters WHERE "
            "list_contains($users, trim(" + payload_field("$.userId") + ")) OR "
            "list_contains($anons, trim(" + payload_field("$.anonymousId") + "))",
            **p,
        )
        run(
            "email_campaign_recipients",
            "DELETE FROM email_campaign_recipients WHERE list_contains($users, trim(user_id)) "
            "OR list_contains($recipients, recipient)",
            **p,
        )
        run(
            "form_invites",
            "DELETE FROM form_invites WHERE list_contains($users, trim(user_id)) "
            "OR list_contains($emails, lower(trim(email)))",
            **p,
        )
        if "deliveries" in tables and "delivery_log" in tables:
            run(
                "delivery_log",
                "DELETE FROM delivery_log WHERE delivery_id IN (SELECT id FROM deliveries "
                f"WHERE {text_match('deliveries')})",
                **p,
            )
        # every other table keyed by the person, whoever added it
        for table, columns in tables.items():
            if table in SKIP_TABLES:
                continue
            for column, key in (
                ("profile_id", "profiles"),
                ("user_id", "users"),
                ("anonymous_id", "anons"),
            ):
                if columns.get(column) == "VARCHAR":
                    run(
                        table,
                        f'DELETE FROM "{table}" WHERE list_contains(${key}, trim("{column}"))',
                        **p,
                    )
        # what is left anywhere: rows of the person go, their values in other rows are redacted
        for table in tables:
            if table in SKIP_TABLES:
                continue
            where = text_match(table)
            if where == "false":
                continue
            if table in PERSON_TABLES or table == "delivery_log":
                run(table, f'DELETE FROM "{table}" WHERE {where}', **p)
            else:
                _redact(con, table, tables[table], p, removed)
        for sql, params in suppression_rows:
            con.execute(sql, params)
        con.execute(
            "INSERT INTO erasures (id, requested_at, request_id, subject, identifiers, profiles, "
            "removed, compacted, actor) VALUES (?, ?, ?, ?, ?, ?, ?, false, ?)",
            [
                record["id"],
                record["requested_at"],
                record["request_id"],
                record["subject"],
                record["identifiers"],
                record["profiles"],
                orjson.dumps({"tables": removed}).decode(),
                record["actor"],
            ],
        )
        con.execute("DROP TABLE erase_events")
        con.execute("DROP TABLE erase_ids")
        con.execute("COMMIT")
    except Exception:
        with contextlib.suppress(Exception):
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return removed


def _redact(
    con: duckdb.DuckDBPyConnection,
    table: str,
    columns: dict[str, str],
    params: dict[str, Any],
    removed: dict[str, int],
) -> None:
    """Replace the person's values in rows that are not theirs (e.g. a segment rule)."""
    for column, kind in columns.items():
        if kind not in ("VARCHAR", "JSON"):
            continue
        text = f'lower(CAST("{column}" AS VARCHAR))'
        clauses = [f"list_contains($equal, trim({text}))"]
        if params["pattern"] is not None:
            clauses.append(f"regexp_matches({text}, $pattern)")
        where = " OR ".join(clauses)
        used = {k: params[k] for k in ("equal", "pattern") if f"${k}" in where}
        found = _count(con, f'SELECT count(*) FROM "{table}" WHERE {where}', used)  # type: ignore[arg-type]
        if not found:
            continue
        replacement = f"CASE WHEN list_contains($equal, trim({text})) THEN '{REDACTED}' " + (
            f"ELSE regexp_replace(CAST(\"{column}\" AS VARCHAR), '(?i)' || $pattern, "
            f"'\\1{REDACTED}\\3', 'g') END"
            if params["pattern"] is not None
            else f'ELSE "{column}" END'
        )
        used = {k: params[k] for k in ("equal", "pattern") if f"${k}" in replacement + where}
        con.execute(f'UPDATE "{table}" SET "{column}" = {replacement} WHERE {where}', used)
        removed[f"{table} (redacted)"] = removed.get(f"{table} (redacted)", 0) + found


# -- compaction -----------------------------------------------------------------------------------


def _compact(store: Store) -> None:
    """Rewrite the store into a fresh file and swap it in (run on the writer thread)."""
    for stale in store.path.parent.glob(f".{store.path.stem}.compact-*"):
        stale.unlink(missing_ok=True)  # left by a compaction that was interrupted
    fresh = store.path.with_name(f".{store.path.stem}.compact-{uuid.uuid4().hex[:8]}.duckdb")
    con = store.cursor()
    try:
        name = con.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        con.execute(f"ATTACH '{_sql_text(str(fresh))}' AS kilde_compact")
        try:
            con.execute(f'COPY FROM DATABASE "{name}" TO kilde_compact')
            for (table,) in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND NOT temporary",
                [name],
            ).fetchall():
                before = con.execute(f'SELECT count(*) FROM "{name}"."{table}"').fetchone()
                after = con.execute(f'SELECT count(*) FROM kilde_compact."{table}"').fetchone()
                if before != after:
                    raise RuntimeError("the compacted copy differs from the store")
            con.execute("CHECKPOINT kilde_compact")
        finally:
            con.execute("DETACH kilde_compact")
    except Exception:
        con.close()
        _remove(fresh)
        raise
    con.close()
    store.replace_file(fresh)
    _remove(fresh)
    temp = store.path.with_name(store.path.name + ".tmp")
    if temp.is_dir():
        shutil.rmtree(temp, ignore_errors=True)


def _remove(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".wal")):
        candidate.unlink(missing_ok=True)


def _sql_text(text: str) -> str:
    return text.replace("'", "''")


def _finish(erasure_id: str, details: dict[str, Any], compacted: bool) -> Any:
    from kilde.store.writer import WriteBatch

    return WriteBatch(
        statements=[
            (
                "UPDATE erasures SET completed_at = ?, removed = ?, compacted = ? WHERE id = ?",
                [datetime.now(UTC), orjson.dumps(details).decode(), compacted, erasure_id],
            )
        ]
    )


def _mark_compacted(erasure_id: str) -> Any:
    from kilde.store.writer import WriteBatch

    return WriteBatch(
        statements=[("UPDATE erasures SET compacted = true WHERE id = ?", [erasure_id])]
    )


# -- files under the data directory ------------------------------------------------------------


def _files(data_dir: Path) -> Iterator[Path]:
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        name = path.name
        if name in _KEEP_FILES or name.startswith(DB_FILE) or ".compact-" in name:
            continue
        if LOG_DIR in path.relative_to(data_dir).parts:
            # The writer empties its log before an erasure runs (Writer._drain); what it
            # logged since was screened, and rewriting a record would break its checksum.
            continue
        yield path


def clean_files(data_dir: Path, values: list[str]) -> list[str]:
    """Remove the person from files under the data directory; their relative paths."""
    if not values:
        return []
    needles = [v.encode() for v in values]
    cleaned = []
    for path in _files(data_dir):
        try:
            if path.suffix.lower() == ".parquet":
                changed = _clean_parquet(path, values)
            else:
                changed = _clean_bytes(path, needles)
        except OSError as exc:
            log.error("cleaning a file after an erasure failed: %s", type(exc).__name__)
            continue
        if changed:
            cleaned.append(str(path.relative_to(data_dir)))
    return cleaned


def _clean_bytes(path: Path, needles: list[bytes]) -> bool:
    data = path.read_bytes()
    lowered = data.lower()
    if not any(n in lowered for n in needles):
        return False
    if path.suffix.lower() in _TEXT_FILES:
        lines = data.splitlines(keepends=True)
        kept = [line for line in lines if not any(n in line.lower() for n in needles)]
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        temp.write_bytes(b"".join(kept))
        temp.replace(path)
    else:
        path.unlink()
    return True


def _clean_parquet(path: Path, values: list[str]) -> bool:
    con = duckdb.connect()
    try:
        source = _sql_text(str(path))
        pattern = _pattern(values)
        # Each row as JSON, so every text value is a quoted string the pattern can match whole
        # (a row cast to VARCHAR leaves strings unquoted).
        where = f"regexp_matches(lower(CAST(to_json(t) AS VARCHAR)), '{_sql_text(pattern)}')"
        hits = con.execute(f"SELECT count(*) FROM read_parquet('{source}') t WHERE {where}")
        row = hits.fetchone()
        if not row or not row[0]:
            return False
        temp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.parquet")
        con.execute(
            f"COPY (SELECT * FROM read_parquet('{source}') t WHERE NOT {where}) "
            f"TO '{_sql_text(str(temp))}' (FORMAT parquet)"
        )
        temp.replace(path)
        return True
    finally:
        con.close()
