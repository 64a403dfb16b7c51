"""The `kilde` command."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kilde.cli_activate import destinations_app
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
from kilde.cli_email import email_app
from kilde.cli_forms import forms_app, surveys_app
from kilde.cli_import import import_file
from kilde.cli_insights import register as register_insights
from kilde.cli_privacy import register as register_privacy
from kilde.cli_profiles import register as register_profiles
from kilde.cli_scale import LakeOpt, serve_collector
from kilde.cli_scale import register as register_scale
from kilde.cli_users import users_app
from kilde.cli_web import snippet as snippet_command
from kilde.client import Client, remove_server_file, write_server_file
from kilde.errors import KildeError
from kilde.plan import PlanError, load_plan

app = typer.Typer(
    help="Kilde: a self-hostable, privacy-first customer data platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
plan_app = typer.Typer(
    help="Check and show the collection plan (kilde.yaml).", no_args_is_help=True
)
bad_app = typer.Typer(
    help="Records the plan rejected: list, inspect, replay.", no_args_is_help=True
)
admin_app = typer.Typer(help="Administration of the server.", no_args_is_help=True)
events_app = typer.Typer(help="Look at stored events.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
app.add_typer(bad_app, name="bad-events")
app.add_typer(admin_app, name="admin")
app.add_typer(events_app, name="events")
register_profiles(app)  # profile, profiles, identity
register_scale(app)  # compute, lake
register_privacy(app, plan_app)  # privacy ..., plan register
register_insights(app)  # segment, insights
app.add_typer(email_app, name="email")
app.command("snippet")(snippet_command)
app.add_typer(forms_app, name="forms")
app.add_typer(destinations_app, name="destinations")
app.add_typer(surveys_app, name="surveys")
app.command("import")(import_file)
app.add_typer(users_app, name="users")


def example_plan_path() -> Path:
    return Path(str(resources.files("kilde") / "demo" / "kilde.yaml"))


# Kept under their old names for the commands below.
_settings = settings_from
_fail = fail
_print_json = print_json


# -- serve --------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [env KILDE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env KILDE_PORT, default 8321]")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    collector_only: Annotated[
        bool,
        typer.Option(
            "--collector-only",
            help="Only collect, appending to the lake (--lake): stateless, run many behind a "
            "load balancer; no admin API or dashboard",
        ),
    ] = False,
    lake: LakeOpt = None,
) -> None:
    """Run the collector, admin API and dashboard on the embedded store."""
    if collector_only:
        serve_collector(host, port, data, plan, lake)
        return
    import uvicorn

    from kilde.web.admin_token import ensure_admin_token
    from kilde.web.app import create_app
    from kilde.web.errors import configure_server_logging

    settings = _settings(data, plan, host=host, port=port)
    configure_server_logging()
    try:
        new_token = ensure_admin_token(settings.data_dir, settings.admin_token)
        application = create_app(settings)
    except KildeError as exc:
        _fail(exc)
        return
    url = f"http://{settings.host}:{settings.port}"
    pipeline = application.state.pipeline
    console.print(f"[bold green]Kilde[/] for {pipeline.plan.company.name} at [bold]{url}[/]")
    console.print(f"  store: {application.state.store.path}   plan: {settings.plan_path}")
    for source in pipeline.plan.sources:
        keys = ", ".join(source.write_keys) or "(none)"
        console.print(f"  source [bold]{source.name}[/] ({source.kind}) write key: {keys}")
    if new_token:
        console.print(
            f"  admin token (shown once, stored hashed): [bold yellow]{new_token}[/]\n"
            "  keep it: `export KILDE_ADMIN_TOKEN=...`; `kilde admin token` makes a new one"
        )
    write_server_file(settings.data_dir, url)
    try:
        uvicorn.run(
            application, host=settings.host, port=settings.port, access_log=False, log_config=None
        )
    finally:
        remove_server_file(settings.data_dir)


# -- plan ---------------------------------------------------------------------------------------


@plan_app.command("check")
def plan_check(file: Annotated[Path, typer.Argument(help="The plan file to check")]) -> None:
    """Print every problem of a plan with its line and column; exit 1 if there are any."""
    try:
        plan = load_plan(file)
    except PlanError as exc:
        for problem in exc.problems:
            where = problem.path or "(plan)"
            print(f"{file}:{problem.line}:{problem.column}: {where}: {problem.message}")
        print(f"{len(exc.problems)} problem(s) found")
        raise typer.Exit(1) from None
    except KildeError as exc:
        _fail(exc)
        return
    console.print(
        f"[green]ok[/]: {file} — {len(plan.sources)} sources, {len(plan.purposes)} purposes, "
        f"{len(plan.events)} events, {len(plan.traits)} traits",
        highlight=False,
        soft_wrap=True,
    )


@plan_app.command("show")
def plan_show(plan: PlanOpt = None) -> None:
    """Summarise the plan: goals, sources, purposes, events and traits."""
    settings = _settings(None, plan)
    try:
        loaded = load_plan(settings.plan_path)
    except KildeError as exc:
        _fail(exc)
        return
    console.print(f"[bold]{loaded.company.name}[/] — collection plan {settings.plan_path}")
    for goal in loaded.goals:
        console.print(f"  goal [bold]{goal.id}[/]: {goal.description}")
    table = Table(title="Sources")
    for column in ("name", "kind", "owner", "tool", "mode", "write keys"):
        table.add_column(column)
    for s in loaded.sources:
        table.add_row(s.name, s.kind, s.owner, s.tool, s.mode, str(len(s.write_keys)))
    console.print(table)
    table = Table(title="Purposes")
    for column in ("id", "legal basis", "description"):
        table.add_column(column)
    for p in loaded.purposes:
        table.add_row(p.id, p.legal_basis, p.description)
    console.print(table)
    table = Table(title="Events")
    for column in ("type", "name", "purposes", "retention", "required properties"):
        table.add_column(column)
    for e in loaded.events:
        required = ", ".join(e.properties.get("required", []))
        table.add_row(e.type, e.name or "(any)", ", ".join(e.purposes), e.retention or "", required)
    console.print(table)
    table = Table(title="Traits")
    for column in ("name", "type", "PII", "purposes", "retention"):
        table.add_column(column)
    for t in loaded.traits:
        table.add_row(t.name, t.type, t.pii, ", ".join(t.purposes), t.retention or "")
    console.print(table)


@plan_app.command("init")
def plan_init(
    file: Annotated[Path, typer.Argument(help="Where to write the example")] = Path("kilde.yaml"),
) -> None:
    """Write the commented example plan of a small online shop."""
    if file.exists():
        _fail(KildeError(f"{file} already exists", fix="choose another path or remove it"))
    file.write_text(example_plan_path().read_text())
    console.print(f"wrote {file}; edit it, then `kilde plan check {file}`")


# -- admin --------------------------------------------------------------------------------------


@admin_app.command("token")
def admin_token(data: DataOpt = None) -> None:
    """Make a new admin token; the old one stops working at once."""
    from kilde.web.admin_token import rotate_admin_token

    settings = _settings(data, None)
    token = rotate_admin_token(settings.data_dir)
    console.print(f"new admin token (shown once): [bold yellow]{token}[/]")


# -- stats and events ---------------------------------------------------------------------------


@app.command()
def stats(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Events per source and type, and dead letters."""
    try:
        with Client(_settings(data, plan), token) as client:
            result = client.get("/api/stats")
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(result)
        return
    table = Table(
        title=f"{result['events']} events, {result['dead_letters_pending']} pending dead letters"
    )
    for column in ("source", "type", "events", "last received"):
        table.add_column(column)
    for row in result["by_source_and_type"]:
        table.add_row(row["source"], row["type"], str(row["events"]), str(row["last_received"]))
    store = result.get("store")
    if store:
        table.caption = (
            f"store: DuckDB with {store['duckdb_threads']} threads, "
            f"memory limit {store['duckdb_memory_limit']}"
            f", using {_mb(store['duckdb_memory_bytes'])}"
        )
    process = result.get("process")
    if process and process.get("rss_bytes") is not None:
        table.caption = (table.caption or "") + (
            f"\nserving process: {_mb(process['rss_bytes'])} resident "
            f"(peak {_mb(process['peak_rss_bytes'])}), "
            f"{process['remembered_message_ids']} message ids remembered for deduplication"
        )
    writer = result["writer"]
    if writer["commits"]:
        table.caption = (table.caption or "") + "\nwriter since the start: " + _writer_line(writer)
    console.print(table)


def _writer_line(writer: dict[str, Any]) -> str:
    """The writer's totals (GET /api/stats) as averages per commit, batch and request."""
    commits, batches = writer["commits"], writer["batches"]
    line = (
        f"{commits:,} commits of {writer['events'] / commits:,.0f} events on average, "
        f"{writer['commit_seconds'] / commits * 1000:.1f} ms each; batches waited "
        f"{writer['queue_seconds'] / batches * 1000:.1f} ms for their commit to begin"
    )
    if writer["resumed"]:
        line += (
            f"; requests went on {writer['resume_seconds'] / writer['resumed'] * 1000:.1f} ms "
            "after their commit"
        )
    if writer["applies"]:
        line += (
            f"; {writer['logged']:,} of the commits went through the acknowledgement log, "
            f"whose events reached DuckDB in {writer['applies']:,} commits of "
            f"{writer['applied_events'] / writer['applies']:,.0f} events on average"
        )
    return line


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 2**20:,.0f} MB"


@events_app.command("list")
def events_list(
    source: Annotated[str | None, typer.Option(help="Only this source")] = None,
    type: Annotated[str | None, typer.Option("--type", help="track, page, identify, ...")] = None,
    event: Annotated[str | None, typer.Option(help="Only this event name")] = None,
    user_id: Annotated[str | None, typer.Option(help="Only this user id")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 20,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """The newest stored events."""
    params = {"source": source, "type": type, "event": event, "user_id": user_id, "limit": limit}
    try:
        with Client(_settings(data, plan), token) as client:
            result = client.get("/api/events", params={k: v for k, v in params.items() if v})
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(result["events"])
        return
    table = Table(title=f"{result['count']} events")
    for column in ("timestamp", "source", "type", "event", "user", "anonymous id", "plan"):
        table.add_column(column)
    for e in result["events"]:
        table.add_row(
            str(e["timestamp"]),
            e["source"],
            e["type"],
            e["event"] or "",
            e["user_id"] or "",
            e["anonymous_id"] or "",
            e["plan_status"],
        )
    console.print(table)


# -- bad events ---------------------------------------------------------------------------------


@bad_app.command("list")
def bad_list(
    status: Annotated[str, typer.Option(help="pending, replayed or all")] = "pending",
    source: Annotated[str | None, typer.Option(help="Only this source")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 50,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Dead letters with their reasons."""
    params: dict[str, Any] = {"status": status, "limit": limit}
    if source:
        params["source"] = source
    try:
        with Client(_settings(data, plan), token) as client:
            result = client.get("/api/bad-events", params=params)
    except KildeError as exc:
        _fail(exc)
        return
    if json:
        _print_json(result)
        return
    table = Table(title=f"{result['total']} dead letters ({status})")
    for column in ("id", "received", "source", "reason", "path", "status"):
        table.add_column(column, overflow="fold")
    for row in result["dead_letters"]:
        table.add_row(
            row["id"],
            str(row["received_at"])[:19],
            row["source"] or "",
            row["reason"],
            row["path"] or "",
            row["status"],
        )
    console.print(table)


@bad_app.command("show")
def bad_show(
    letter_id: Annotated[str, typer.Argument(help="The dead letter's id")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """One dead letter with its original payload."""
    try:
        with Client(_settings(data, plan), token) as client:
            result = client.get(f"/api/bad-events/{letter_id}")
    except KildeError as exc:
        _fail(exc)
        return
    _print_json(result)


@bad_app.command("replay")
def bad_replay(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Ids to replay; all pending if none")
    ] = None,
    source: Annotated[str | None, typer.Option(help="Only this source's dead letters")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Re-read the plan and run dead letters through the pipeline again."""
    try:
        with Client(_settings(data, plan), token) as client:
            result = client.post(
                "/api/bad-events/replay", json={"ids": ids or None, "source": source}
            )
    except KildeError as exc:
        _fail(exc)
        return
    console.print(
        f"replayed {result['replayed']} (stored {result['events_stored']} events), "
        f"{result['still_failing']} still failing"
    )
    for failure in result["failures"][:20]:
        console.print(f"  {failure['id']}: {failure['reason']}", highlight=False, markup=False)


# -- demo ---------------------------------------------------------------------------------------


@app.command()
def demo(
    customers: Annotated[int, typer.Option(help="How many synthetic customers")] = 2000,
    days: Annotated[int, typer.Option(help="Days of history")] = 90,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same shop)")] = 7,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Generate a realistic synthetic shop and send it through the collection API."""
    import dataclasses

    from kilde.demo.forms_demo import send_form_demo
    from kilde.demo.generator import send_demo
    from kilde.demo.imports_demo import send_import_demo

    # The demo posts many forms from one address; an in-process run lifts the rate limit.
    settings = dataclasses.replace(_settings(data, plan), form_rate_limit=0)
    try:
        with Client(settings, token) as client:
            summary = send_demo(client, customers=customers, days=days, seed=seed, console=console)
            forms = send_form_demo(client, customers=customers, seed=seed)
            # order history, CRM, helpdesk and broker files, through `kilde import`'s engine
            send_import_demo(client, customers=customers, seed=seed, console=console)
    except KildeError as exc:
        _fail(exc)
        return
    console.print(
        f"[green]demo shop ready[/]: {summary['events']} events sent, {summary['stored']} stored, "
        f"{summary['duplicates']} already there, {summary['rejected']} in the dead letter; "
        f"forms: {forms['newsletter']} newsletter signups, {forms['b2b-lead']} group requests, "
        f"{forms['nps']} NPS answers ({forms['refused']} refused)"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
