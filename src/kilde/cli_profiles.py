"""`kilde profile ...`, `kilde profiles rebuild` and `kilde identity report`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from kilde.client import Client
from kilde.config import Settings
from kilde.errors import KildeError

profile_app = typer.Typer(help="Look at unified customer profiles; fix wrong merges.")
profiles_app = typer.Typer(help="Maintain all profiles at once.", no_args_is_help=True)
identity_app = typer.Typer(help="Identity resolution: status, accuracy, conflicts.")

console = Console()
errors = Console(stderr=True, soft_wrap=True)

DataOpt = Annotated[
    Path | None, typer.Option("--data", help="Data directory [env KILDE_DATA, default kilde-data]")
]
PlanOpt = Annotated[
    Path | None, typer.Option("--plan", help="Plan file [env KILDE_PLAN, default kilde.yaml]")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Admin token of a running server [env KILDE_ADMIN_TOKEN]"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a layout")]


def register(app: typer.Typer) -> None:
    app.add_typer(profile_app, name="profile")
    app.add_typer(profiles_app, name="profiles")
    app.add_typer(identity_app, name="identity")


def _client(data: Path | None, plan: Path | None, token: str | None) -> Client:
    return Client(Settings.from_env(data_dir=data, plan_path=plan), token)


def _fail(exc: KildeError) -> None:
    errors.print(f"[bold red]error:[/] {exc.message}", highlight=False, markup=True)
    if exc.fix:
        errors.print(f"[bold]fix:[/] {exc.fix}", highlight=False)
    raise typer.Exit(1)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _fetch(client: Client, who: str) -> dict[str, Any]:
    """A profile by id (p_...), or by any identifier (email, user id, TYPE:VALUE)."""
    client.post("/api/profiles/refresh")
    if who.startswith("p_"):
        result: dict[str, Any] = client.get(f"/api/profiles/{who}")
        return result
    found = client.post("/api/profiles/lookup", json={"identifier": who})
    if not found["profiles"]:
        raise KildeError(
            "no profile holds that identifier",
            fix="check the spelling, or search with `kilde profile search TEXT`",
        )
    if len(found["profiles"]) > 1:
        ids = ", ".join(p["profile_id"] for p in found["profiles"])
        raise KildeError(
            f"several profiles hold that identifier: {ids}",
            fix="show one by its profile id, or pass TYPE:VALUE (for example user_id:...)",
        )
    result = client.get(f"/api/profiles/{found['profiles'][0]['profile_id']}")
    return result


@profile_app.command("show")
def show(
    who: Annotated[str, typer.Argument(help="Profile id, email, user id or TYPE:VALUE")],
    events: Annotated[int, typer.Option(help="How many timeline events to show")] = 15,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """One profile: identities, traits with where they came from, computed traits, timeline."""
    try:
        with _client(data, plan, token) as client:
            found = _fetch(client, who)
            timeline = client.get(
                f"/api/profiles/{found['profile_id']}/events", params={"limit": events}
            )
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json({**found, "timeline": timeline["events"]})
        return
    console.print(render(found, timeline["events"]))


def render(found: dict[str, Any], timeline: list[dict[str, Any]]) -> Group:
    traits = found["traits"]
    name = " ".join(
        str(traits[k]["value"]) for k in ("first_name", "last_name") if k in traits
    ) or str(traits.get("name", {}).get("value", "(no name)"))
    title = f"[bold]{name}[/]  {found['profile_id']}"
    if found.get("redirected_from"):
        title += f"  (merged from {found['redirected_from']})"
    if found.get("shared"):
        title += "  [yellow]shared identifier[/]"
    ids = Table(title="Identities", show_edge=False, expand=False)
    for column in ("type", "value", "first seen", "last seen"):
        ids.add_column(column, overflow="fold")
    for i in found["identities"]:
        value = i["value"] if i["type"] != "email_sha256" else i["value"][:16] + "…"
        if i.get("shared"):
            value += " (shared)"
        ids.add_row(i["type"], value, str(i["first_seen"])[:19], str(i["last_seen"])[:19])
    tr = Table(title="Traits", show_edge=False)
    for column in ("trait", "value", "source", "tier", "observed", "candidates"):
        tr.add_column(column, overflow="fold")
    for key, t in traits.items():
        tr.add_row(
            key,
            str(t["value"]),
            t["source"] or "",
            t["tier"] or "",
            str(t["observed_at"])[:19],
            str(t["candidates"]),
        )
    comp = Table(title="Computed", show_edge=False, show_header=False)
    comp.add_column("trait")
    comp.add_column("value", overflow="fold")
    for key, value in found["computed"].items():
        if value is None or value == []:
            continue
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        if isinstance(value, float):
            shown = f"{value:,.2f}"
        comp.add_row(key.replace("_", " "), shown[:60])
    parts: list[Any] = [ids, tr, comp]
    if found.get("consents"):
        cons = Table(title="Consents", show_edge=False)
        for column in ("purpose", "state", "since", "source"):
            cons.add_column(column)
        for purpose, c in found["consents"].items():
            cons.add_row(purpose, c["state"], str(c["changed_at"])[:19], c.get("source") or "")
        parts.append(cons)
    if found.get("conflicts"):
        conf = Table(title="Refused merges", show_edge=False)
        for column in ("reason", "identifier", "detail"):
            conf.add_column(column, overflow="fold")
        for c in found["conflicts"][:10]:
            conf.add_row(c["reason"], f"{c['id_type']}:{c['id_value']}", c["detail"] or "")
        parts.append(conf)
    tl = Table(title=f"Timeline (newest {len(timeline)})", show_edge=False)
    for column in ("time", "source", "type", "event", "page"):
        tl.add_column(column, overflow="fold")
    for e in timeline:
        tl.add_row(
            str(e["timestamp"])[:19],
            e["source"],
            e["type"],
            e["event"] or "",
            (e.get("page_url") or "")[:50],
        )
    parts.append(tl)
    return Group(Panel.fit(title, border_style="green"), *parts)


@profile_app.command("search")
def search(
    text: Annotated[str, typer.Argument(help="Part of an email, name, id or other trait")],
    limit: Annotated[int, typer.Option(help="How many at most")] = 20,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Profiles whose identifiers or traits contain TEXT."""
    try:
        with _client(data, plan, token) as client:
            client.post("/api/profiles/refresh")
            found = client.post("/api/profiles/search", json={"query": text, "limit": limit})
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(found["profiles"])
        return
    table = Table(title=f"{found['count']} profiles")
    for column in ("profile", "name", "email", "identifiers", "events", "orders", "last seen"):
        table.add_column(column, overflow="fold")
    for p in found["profiles"]:
        table.add_row(
            p["profile_id"],
            str(p["name"] or ""),
            str(p["email"] or ""),
            str(p["identifiers"]),
            str(p["events"]),
            str(p["orders"]),
            str(p["last_seen"])[:19],
        )
    console.print(table)


@profile_app.command("unmerge")
def unmerge(
    profile_id: Annotated[str, typer.Argument(help="The profile that merged two people")],
    identifiers: Annotated[
        list[str], typer.Argument(help="TYPE:VALUE of each identifier that belongs elsewhere")
    ],
    reason: Annotated[str | None, typer.Option(help="Why (kept with the unmerge)")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Split identifiers off a wrong merge into their own profile; rebuilds keep the split."""
    try:
        with _client(data, plan, token) as client:
            result = client.post(
                f"/api/profiles/{profile_id}/unmerge",
                json={"identifiers": identifiers, "reason": reason},
            )
    except KildeError as exc:
        _fail(exc)
        return
    split = ", ".join(result["split_into"]) or "(none)"
    console.print(f"kept [bold]{result['profile_id']}[/]; split off into [bold]{split}[/]")


@profiles_app.command("rebuild")
def rebuild(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Recompute every identity and profile from the stored events."""
    try:
        with _client(data, plan, token) as client, console.status("rebuilding profiles") as shown:
            report = client.post("/api/profiles/rebuild", params={"wait": 60})
            while report.get("running"):
                status = client.get("/api/identity/status")
                shown.update(f"rebuilding profiles: {status['progress'] or 'working'}")
                if not status["rebuilding"]:
                    if status["last_rebuild"] is None:
                        raise KildeError(
                            "the rebuild failed", fix="see the server's log, then run it again"
                        )
                    report = status["last_rebuild"]
                    break
                time.sleep(1)
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(report)
        return
    console.print(
        f"[green]rebuilt[/] {report['profiles']} profiles from {report['events_read']} events "
        f"({report['identifiers']} identifiers, {report['conflicts']} refused merges) "
        f"in {report['seconds']:.1f} s"
    )


@identity_app.command("report")
def report(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Merge precision and recall against the demo's truth (who each person really is)."""
    try:
        with _client(data, plan, token) as client:
            result = client.get("/api/identity/report")
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(result)
        return
    table = Table(title="Identity resolution against the demo's truth")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in (
        "people",
        "profiles",
        "precision",
        "recall",
        "f1",
        "people_split",
        "profiles_mixed",
        "conflicts",
    ):
        value = result[key]
        table.add_row(
            key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) else str(value)
        )
    console.print(table)
    console.print(result["explanation"], highlight=False)


@identity_app.command("status")
def status(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Profiles, identifiers by type, refused merges and dropped (junk) identifiers."""
    try:
        with _client(data, plan, token) as client:
            client.post("/api/profiles/refresh")
            result = client.get("/api/identity/status")
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(result)
        return
    console.print(
        f"{result['profiles']} profiles, {result['identifiers']} identifiers "
        f"({result['shared_identifiers']} shared), {result['conflicts']} refused merges, "
        f"{result['unmerges']} unmerges; {result['unread_events']} events not read yet"
    )
    table = Table(title="Identifiers by type")
    table.add_column("type")
    table.add_column("identifiers", justify="right")
    for row in result["by_type"]:
        table.add_row(row["id_type"], str(row["identifiers"]))
    console.print(table)
    if result["dropped"]:
        dropped = Table(title="Dropped from records (junk or wrong shape)")
        for column in ("field", "reason", "records"):
            dropped.add_column(column)
        for row in result["dropped"]:
            dropped.add_row(row["field"], row["reason"], str(row["records"]))
        console.print(dropped)


@identity_app.command("conflicts")
def conflicts(
    reason: Annotated[str | None, typer.Option(help="Only this reason")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 30,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Merges the rules refused, with the reason."""
    params: dict[str, Any] = {"limit": limit}
    if reason:
        params["reason"] = reason
    try:
        with _client(data, plan, token) as client:
            client.post("/api/profiles/refresh")
            result = client.get("/api/merge-conflicts", params=params)
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(result)
        return
    table = Table(title=f"{result['total']} refused merges")
    for column in ("when", "reason", "identifier", "kept on", "detail", "times"):
        table.add_column(column, overflow="fold")
    for c in result["conflicts"]:
        table.add_row(
            str(c["first_at"])[:19],
            c["reason"],
            f"{c['id_type']}:{c['id_value']}",
            c["kept_profile"] or "",
            c["detail"] or "",
            str(c["occurrences"]),
        )
    console.print(table)
