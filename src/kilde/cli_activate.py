"""`kilde destinations`: where data goes, run it now, see what was delivered."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kilde.cli_common import DataOpt, JsonOpt, PlanOpt, TokenOpt, console, fail, print_json
from kilde.cli_common import settings_from as _settings
from kilde.client import Client
from kilde.errors import KildeError

destinations_app = typer.Typer(
    help="Destinations: webhooks, ad-platform lists, files, partner exports.",
    no_args_is_help=True,
)
# Report lines are not wrapped: scripts and readers get one line per fact.
say = Console(soft_wrap=True, highlight=False)
NameArg = Annotated[str, typer.Argument(help="The destination's name in the plan")]


def _call(data: Any, plan: Any, token: Any, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with Client(_settings(data, plan), token) as client:
            return client.request(method, path, **kwargs)
    except KildeError as exc:
        fail(exc)


@destinations_app.command("list")
def destinations_list(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Every destination with its purpose and delivery counts."""
    result = _call(data, plan, token, "GET", "/api/destinations")
    if json:
        print_json(result)
        return
    table = Table(title="Destinations")
    for column in ("name", "kind", "purpose", "sends", "delivered", "pending", "dead"):
        table.add_column(column, overflow="fold")
    for d in result["destinations"]:
        sends = ", ".join(d["events"] + [f"segment {s}" for s in d["segments"]])
        counts = d["deliveries"]
        table.add_row(
            d["name"],
            d["kind"],
            d["purpose"],
            sends,
            str(counts["delivered"]),
            str(counts["pending"]),
            str(counts["dead"]),
        )
    console.print(table)


@destinations_app.command("test")
def destinations_test(
    name: NameArg, data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None
) -> None:
    """Send one signed test request, or check that the output folder is writable."""
    result = _call(data, plan, token, "POST", f"/api/destinations/{name}/test")
    print_json(result)
    if not result.get("ok"):
        raise typer.Exit(1)


@destinations_app.command("run")
def destinations_run(
    name: NameArg,
    full: Annotated[bool, typer.Option(help="Send every member, not only the changes")] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Deliver what is due now (webhooks) or sync the audiences now (lists, files)."""
    result = _call(data, plan, token, "POST", f"/api/destinations/{name}/run", json={"full": full})
    if json:
        print_json(result)
        if any(sync.get("upload_error") for sync in result.get("syncs", [])):
            raise typer.Exit(1)
        return
    if result["kind"] == "webhook":
        say.print(
            f"{name}: {result['enqueued']} new, {result['delivered']} delivered, "
            f"{result['failed']} to retry, {result['dead']} dead, {result['skipped']} skipped "
            "(no consent)"
        )
        for error in sorted(set(result["errors"])):
            say.print(f"  error: {error}")
        return
    failed = False
    for sync in result["syncs"]:
        say.print(
            f"{name} / {sync['segment']}: {sync['members']} members, +{sync['added']} "
            f"-{sync['removed']}; left out {sync['excluded_no_consent']} without consent and "
            f"{sync['excluded_do_not_sell']} who opted out of sale or sharing"
        )
        for file in sync["files"]:
            say.print(f"  wrote {file}")
        if sync.get("uploaded") is not None:
            say.print(f"  uploaded {sync['uploaded']} changes to the platform")
        if sync.get("upload_error"):
            failed = True
            say.print(
                f"  upload failed: {sync['upload_error']}; nothing is lost: the next run "
                "sends these changes again"
            )
    if failed:
        raise typer.Exit(1)


@destinations_app.command("replay")
def destinations_replay(
    name: NameArg, data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None
) -> None:
    """Make dead deliveries due again."""
    result = _call(data, plan, token, "POST", f"/api/destinations/{name}/replay")
    say.print(f"{name}: {result['requeued']} dead deliveries queued again")


@destinations_app.command("log")
def destinations_log(
    name: NameArg,
    limit: Annotated[int, typer.Option(help="How many attempts, newest first")] = 20,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """The delivery log: every attempt (or audience sync) with its status and error."""
    result = _call(
        data, plan, token, "GET", f"/api/destinations/{name}/deliveries", params={"limit": limit}
    )
    if json:
        print_json(result)
        return
    table = Table(title=f"Delivery log of {name}")
    for column in ("when", "delivery", "attempt", "status", "error"):
        table.add_column(column, overflow="fold")
    for row in result["log"]:
        table.add_row(
            str(row["attempted_at"])[:19],
            row["delivery_id"],
            str(row["attempt"]),
            "" if row["status"] is None else str(row["status"]),
            row["error"] or "ok",
        )
    console.print(table)
