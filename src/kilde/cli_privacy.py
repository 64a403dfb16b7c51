"""`kilde privacy ...` (access, erasure, suppression, consent, retention, requests, audit) and
`kilde plan register`.

Every command goes through the running server's admin API, or serves the same API in-process
when no server runs. A person is named by an email, user id, phone, profile id or TYPE:VALUE;
give `-` to read it from standard input instead of the command line.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kilde.cli_common import (
    DataOpt,
    JsonOpt,
    PlanOpt,
    TokenOpt,
    console,
    fail,
    print_json,
    settings_from,
)
from kilde.client import Client
from kilde.errors import KildeError

privacy_app = typer.Typer(
    help="Privacy: subject access, erasure, suppression, consent, retention, requests, audit.",
    no_args_is_help=True,
)
requests_app = typer.Typer(
    help="Data subject requests: log, verify, answer within the legal deadline.",
    invoke_without_command=True,
)
privacy_app.add_typer(requests_app, name="requests")

Who = Annotated[
    str,
    typer.Argument(
        help="The person: email, user id, phone, profile id (p_...) or TYPE:VALUE; - reads stdin"
    ),
]
RequestOpt = Annotated[
    str | None, typer.Option("--request", help="The tracked request this answers (req_...)")
]


def say(*objects: Any, **options: Any) -> None:
    """Print without wrapping long lines (scripts read them) or colouring values."""
    console.print(*objects, **{"highlight": False, "soft_wrap": True, **options})


def register(app: typer.Typer, plan_app: typer.Typer) -> None:
    app.add_typer(privacy_app, name="privacy")
    plan_app.command("register")(plan_register)


def _client(data: Path | None, plan: Path | None, token: str | None) -> Client:
    return Client(settings_from(data, plan), token)


def _who(text: str) -> dict[str, str]:
    if text == "-":
        text = sys.stdin.readline().strip()
    if not text:
        raise KildeError("no person named", fix="give an email, user id, phone or profile id")
    return {"identifier": text}


# -- access and erasure -------------------------------------------------------------------------


@privacy_app.command("export")
def export(
    who: Who,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="ZIP file to write [kilde-export-ID.zip]")
    ] = None,
    request: RequestOpt = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Everything Kilde holds on a person, as one ZIP (JSON, CSV and a summary page)."""
    try:
        body = {**_who(who), "request_id": request}
        with _client(data, plan, token) as client:
            response = client.raw("POST", "/api/privacy/export", json=body)
            client.raise_for(response)
            disposition = response.headers.get("content-disposition", "")
            name = disposition.partition('filename="')[2].rstrip('"') or "kilde-export.zip"
            target = output or Path(name)
            target.write_bytes(response.content)
    except KildeError as exc:
        fail(exc)
    say(f"wrote {target} ({len(response.content) // 1024 + 1} KB)", highlight=False)


@privacy_app.command("erase")
def erase(
    who: Who,
    request: RequestOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    no_compact: Annotated[
        bool, typer.Option("--no-compact", help="Skip rewriting the database file (faster)")
    ] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Erase a person from every table and file for good, and keep them from coming back."""
    try:
        body = {**_who(who), "request_id": request, "compact": not no_compact}
        if not yes and not typer.confirm(
            "Erase this person for good? This cannot be undone", default=False
        ):
            raise typer.Exit(1)
        with _client(data, plan, token) as client:
            result = client.post("/api/privacy/erase", json=body)
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    if result["status"] == "already_erased":
        say(
            f"already erased on {str(result['completed_at'])[:19]} ({result['erasure_id']}); "
            "nothing left to remove",
            highlight=False,
        )
        return
    say(
        f"[green]erased[/] ({result['erasure_id']}): {result['rows_removed']} rows from "
        f"{len(result['removed'])} tables, {len(result['files_cleaned'])} files; "
        f"{result['suppressed']} identifiers suppressed; store "
        + ("compacted" if result["compacted"] else "[yellow]not compacted[/]"),
        highlight=False,
    )
    for table, count in sorted(result["removed"].items()):
        say(f"  {table}: {count}", highlight=False)
    if result.get("notify"):
        say(
            "[yellow]sent before to[/] "
            + ", ".join(
                n["destination"] + (f" ({n['recipient']})" if n.get("recipient") else "")
                for n in result["notify"]
            )
            + ": ask them to delete it too (GDPR Art. 17(2), 19)",
            highlight=False,
        )


@privacy_app.command("suppress")
def suppress(
    who: Annotated[list[str] | None, typer.Argument(help="People to suppress")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take them off the list")] = False,
    show: Annotated[bool, typer.Option("--list", help="Show the list and its counts")] = False,
    request: RequestOpt = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Stop collecting people (without erasing them), or show what the list kept out."""
    try:
        with _client(data, plan, token) as client:
            done = [
                client.post(
                    "/api/privacy/suppress",
                    json={**_who(w), "remove": remove, "request_id": request},
                )
                for w in who or []
            ]
            listing = client.get("/api/privacy/suppression") if show or not who else None
    except KildeError as exc:
        fail(exc)
    if json:
        print_json({"changed": done, "list": listing})
        return
    for result in done:
        if remove:
            say(f"removed {result['removed']} entries ({result['entries']} left)")
        else:
            say(f"suppressed {result['suppressed']} identifiers ({result['entries']} in all)")
    if listing is not None:
        say(
            f"{listing['entries']} entries on the suppression list; "
            f"{listing['dropped']} records dropped at the door"
        )
        table = Table()
        for column in ("day", "source", "channel", "records"):
            table.add_column(column)
        for row in listing["by_source"]:
            table.add_row(str(row["day"]), row["source"], row["channel"], str(row["records"]))
        if listing["by_source"]:
            say(table)


# -- consent and do-not-sell ----------------------------------------------------------------------


@privacy_app.command("consent")
def consent(
    who: Who,
    grant: Annotated[list[str] | None, typer.Option("--grant", help="Purpose granted")] = None,
    deny: Annotated[list[str] | None, typer.Option("--deny", help="Purpose refused")] = None,
    evidence: Annotated[
        str, typer.Option(help="How the choice was made, e.g. 'signed form 2026-05-01'")
    ] = "admin",
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show a person's consent, or record a choice they made outside Kilde."""
    choices = {p: True for p in grant or []} | {p: False for p in deny or []}
    try:
        with _client(data, plan, token) as client:
            person = _who(who)
            if choices:
                client.post(
                    "/api/privacy/consent",
                    json={**person, "purposes": choices, "evidence": evidence},
                )
            result = client.post("/api/privacy/consent/state", json=person)
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    table = Table(title=f"{result['count']} consent records")
    for column in ("purpose", "state", "since", "channel", "evidence"):
        table.add_column(column)
    for purpose, state in sorted(result["current"].items()):
        table.add_row(
            purpose,
            state["state"],
            str(state["decided_at"])[:19],
            state["channel"] or "",
            state["evidence"] or "",
        )
    say(table)


@privacy_app.command("do-not-sell")
def do_not_sell(
    who: Who,
    undo: Annotated[bool, typer.Option("--undo", help="The person allows it again")] = False,
    evidence: Annotated[str, typer.Option(help="How the request came")] = "do-not-sell request",
    request: RequestOpt = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Record that a person opts out of the sale or sharing of their data (CCPA)."""
    try:
        with _client(data, plan, token) as client:
            result = client.post(
                "/api/privacy/do-not-sell",
                json={
                    **_who(who),
                    "opt_out": not undo,
                    "evidence": evidence,
                    "request_id": request,
                },
            )
    except KildeError as exc:
        fail(exc)
    say(
        "do not sell or share: " + ("[bold]yes[/]" if result["do_not_sell"] else "no"),
        highlight=False,
    )


@privacy_app.command("status")
def status(
    days: Annotated[int, typer.Option(help="Over the last DAYS days")] = 30,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """What the consent gate and the suppression list kept out, per purpose and source."""
    try:
        with _client(data, plan, token) as client:
            result = client.get("/api/privacy/gate", params={"days": days})
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    say(
        f"consent gate: [bold]{result['mode']}[/]; {result['suppression_entries']} entries on "
        "the suppression list",
        highlight=False,
    )
    table = Table(title=f"Not stored for lack of a lawful basis (last {days} days)")
    for column in ("purpose", "what", "records"):
        table.add_column(column)
    for row in result["withheld_by_purpose"]:
        what = "whole records" if row["kind"] == "event" else "traits left out"
        table.add_row(row["purpose"], what, str(row["records"]))
    say(table)
    table = Table(title="Dropped at the door: suppressed people")
    for column in ("source", "channel", "records"):
        table.add_column(column)
    for row in result["suppressed_by_source"]:
        table.add_row(row["source"], row["channel"], str(row["records"]))
    say(table)


# -- retention ------------------------------------------------------------------------------------


@privacy_app.command("retain")
def retain(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; change nothing")] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Delete or anonymise what is past its retention in the plan, and report it."""
    try:
        with _client(data, plan, token) as client:
            report = client.post("/api/privacy/retain", json={"dry_run": dry_run})
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(report)
        return
    verb = "would " + report["action"] if dry_run else report["action"] + "d"
    table = Table(title=f"Retention ({'dry run' if dry_run else report['action']})")
    for column in ("data", "kept for", "older than", "expired"):
        table.add_column(column)
    for row in report["events"]:
        table.add_row(row["event"], row["retention"], str(row["cutoff"])[:10], str(row["expired"]))
    for row in report["traits"]:
        table.add_row(
            f"trait {row['trait']}",
            row["retention"],
            str(row["cutoff"])[:10],
            f"{row['events']} events, {row['profiles']} profiles",
        )
    say(table)
    say(
        f"{verb} {report['expired_events']} events and {report['expired_traits']} trait values; "
        f"{report['kept_without_retention']} events have no retention in the plan",
        highlight=False,
    )


# -- requests -------------------------------------------------------------------------------------


@requests_app.callback()
def requests_list(
    ctx: typer.Context,
    state: Annotated[str, typer.Option(help="open, in_progress, done, refused or all")] = "open",
    overdue: Annotated[
        bool, typer.Option("--overdue", help="Only those past the deadline")
    ] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """List data subject requests, the most urgent first (add, update, show: see --help)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        with _client(data, plan, token) as client:
            result = client.get(
                "/api/privacy/requests", params={"state": state, "overdue": overdue}
            )
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    table = Table(title=f"{result['count']} requests ({state}), {result['overdue']} overdue")
    table.add_column("id", no_wrap=True, min_width=16)
    for column in ("kind", "law", "received", "due", "days left", "verified", "state"):
        table.add_column(column)
    for row in result["requests"]:
        left = row["days_left"]
        shown = "" if left is None else (f"[red]{left}[/]" if row["overdue"] else str(left))
        table.add_row(
            row["id"],
            row["kind"],
            row["law"],
            str(row["received_at"])[:10],
            str(row["due_at"])[:10],
            shown,
            row["verification"],
            row["state"],
        )
    say(table)


@requests_app.command("add")
def requests_add(
    kind: Annotated[str, typer.Option(help="access, erasure, correction or opt_out")],
    law: Annotated[str, typer.Option(help="gdpr (30 days) or ccpa (45 days)")] = "gdpr",
    who: Annotated[
        str | None, typer.Option("--person", help="Who it is about (kept only as a hash)")
    ] = None,
    received: Annotated[
        datetime | None, typer.Option(help="When it reached the company [now]")
    ] = None,
    note: Annotated[str | None, typer.Option(help="A note (no personal data)")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Log a request as received; its legal deadline starts running."""
    body: dict[str, Any] = {"kind": kind, "law": law, "note": note}
    if received is not None:
        body["received_at"] = received.isoformat()
    try:
        if who:
            body["person"] = _who(who)
        with _client(data, plan, token) as client:
            result = client.post("/api/privacy/requests", json=body)
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    say(
        f"logged {result['id']} ({result['kind']}, {result['law']}): answer by "
        f"{str(result['due_at'])[:10]}",
        highlight=False,
    )


@requests_app.command("update")
def requests_update(
    request_id: Annotated[str, typer.Argument(help="The request (req_...)")],
    verified: Annotated[bool, typer.Option("--verified", help="Identity verified")] = False,
    failed: Annotated[bool, typer.Option("--failed", help="Verification failed")] = False,
    method: Annotated[str | None, typer.Option(help="How the identity was verified")] = None,
    state: Annotated[str | None, typer.Option(help="open, in_progress, done, refused")] = None,
    outcome: Annotated[str | None, typer.Option(help="What was done")] = None,
    extend: Annotated[bool, typer.Option("--extend", help="Use the legal extension")] = False,
    note: Annotated[str | None, typer.Option(help="A note (no personal data)")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Record verification, progress, an extension or the outcome of a request."""
    body: dict[str, Any] = {
        "verification": "verified" if verified else ("failed" if failed else None),
        "verification_method": method,
        "state": state,
        "outcome": outcome,
        "extend": extend,
        "note": note,
    }
    try:
        with _client(data, plan, token) as client:
            result = client.post(f"/api/privacy/requests/{request_id}", json=body)
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    say(
        f"{result['id']}: {result['state']}, verification {result['verification']}, due "
        f"{str(result['due_at'])[:10]}" + (f"; {result['outcome']}" if result["outcome"] else ""),
        highlight=False,
    )


@requests_app.command("show")
def requests_show(
    request_id: Annotated[str, typer.Argument(help="The request (req_...)")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """One request with its history."""
    try:
        with _client(data, plan, token) as client:
            result = client.get(f"/api/privacy/requests/{request_id}")
    except KildeError as exc:
        fail(exc)
    print_json(result)


# -- audit ----------------------------------------------------------------------------------------


@privacy_app.command("audit")
def audit(
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 50,
    personal: Annotated[
        bool, typer.Option("--personal", help="Only actions that handed out personal data")
    ] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """The audit log: who did what, when (no personal data in it)."""
    try:
        with _client(data, plan, token) as client:
            result = client.get(
                "/api/privacy/audit", params={"limit": limit, "personal_only": personal}
            )
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    table = Table(title=f"{result['count']} audit entries")
    table.add_column("when", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("status")
    table.add_column("personal data")
    table.add_column("who", overflow="fold")
    for row in result["entries"]:
        table.add_row(
            str(row["logged_at"])[:19],
            row["action"],
            str(row["status"]),
            "yes" if row["personal_data"] else "",
            row["actor"],
        )
    say(table)


# -- the Art. 30 register -------------------------------------------------------------------------


def plan_register(
    format: Annotated[str, typer.Option("--format", "-f", help="md, html or csv")] = "md",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write [standard output]")
    ] = None,
    plan: PlanOpt = None,
) -> None:
    """The GDPR Art. 30 record of processing activities, generated from the plan."""
    from kilde.plan import load_plan
    from kilde.privacy.register import FORMATS, render

    if format not in FORMATS:
        fail(KildeError(f"unknown format {format!r}", fix="use md, html or csv"))
    settings = settings_from(None, plan)
    try:
        text = render(load_plan(settings.plan_path), format)
    except KildeError as exc:
        fail(exc)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        say(f"wrote {output}", highlight=False)
