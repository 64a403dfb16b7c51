"""`kilde email`: render a mail campaign with tracked links, and report its opens and clicks."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import Progress
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

email_app = typer.Typer(
    help="Tracked mail campaigns: personal links and an open pixel per recipient, and the "
    "campaign's report (human opens, machine opens, clicks).",
    no_args_is_help=True,
)

CHUNK = 200
CampaignOpt = Annotated[
    str, typer.Option("--campaign", help="Campaign id, e.g. spring-sale-2026", show_default=False)
]


def read_recipients(path: Path) -> list[dict[str, str | None]]:
    """Rows of `user_id` and/or `email`, from CSV with a header or from JSON lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise KildeError(
            f"cannot read {path} ({type(exc).__name__})", fix="pass a UTF-8 CSV or JSON-lines file"
        ) from None
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise KildeError(
                    f"{path}: line {number} is not a JSON object",
                    fix='write one object per line, like {"user_id": "u-1"}',
                ) from None
            if not isinstance(value, dict):
                raise KildeError(
                    f"{path}: line {number} is not a JSON object",
                    fix='write one object per line, like {"user_id": "u-1"}',
                )
            rows.append(value)
    else:
        reader = csv.DictReader(io.StringIO(text))
        columns = {name.strip().lower() for name in reader.fieldnames or []}
        if not columns & {"user_id", "email"}:
            raise KildeError(
                f"{path} has no user_id or email column",
                fix="start the CSV with a header line such as user_id,email",
            )
        rows = [{(k or "").strip().lower(): v for k, v in row.items()} for row in reader]
    people: list[dict[str, str | None]] = []
    for number, row in enumerate(rows, start=1):
        user_id = str(row.get("user_id") or "").strip() or None
        email = str(row.get("email") or "").strip() or None
        if user_id is None and email is None:
            raise KildeError(
                f"{path}: recipient {number} has neither user_id nor email",
                fix="give every recipient a user_id (preferred) or an email",
            )
        people.append({"user_id": user_id, "email": email})
    if not people:
        raise KildeError(f"{path} lists no recipients", fix="add one recipient per line")
    return people


@email_app.command("links")
def links(
    campaign: CampaignOpt,
    recipients: Annotated[
        Path,
        typer.Option(
            "--recipients",
            help="CSV with a header (user_id and/or email) or JSON lines",
            show_default=False,
        ),
    ],
    template: Annotated[
        Path, typer.Option("--template", help="The mail's HTML", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the mails [default: mails-<campaign>]"),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            envvar="KILDE_PUBLIC_URL",
            help="Where mail clients reach Kilde, e.g. https://kilde.example.com [env "
            "KILDE_PUBLIC_URL; default: the running server's address]",
        ),
    ] = None,
    purpose: Annotated[
        str | None,
        typer.Option(help="The purpose unsubscribing opts out of [default: marketing_email]"),
    ] = None,
    expires_days: Annotated[int, typer.Option(help="How many days the links work")] = 365,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write each recipient's copy of an HTML mail, with tracked links and an open pixel.

    Every http(s) link becomes a signed click link, `href="kilde:unsubscribe"` (or a link with
    `data-kilde-unsubscribe`) becomes the recipient's unsubscribe link, and a 1x1 open pixel is
    added. The folder gets one `<recipient>.html` per recipient and `manifest.csv`, which maps
    each file to its recipient and gives the List-Unsubscribe headers to send with it.
    """
    try:
        html = template.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(KildeError(f"cannot read {template} ({type(exc).__name__})", fix="pass UTF-8 HTML"))
    folder = out or Path(f"mails-{campaign}")
    try:
        people = read_recipients(recipients)
        with Client(settings_from(data, plan), token) as client:
            base = base_url or client.remote
            if not base:
                raise KildeError(
                    "no server is running, so Kilde cannot tell its public address",
                    fix="pass --base-url (or set KILDE_PUBLIC_URL) with the address where "
                    "recipients' mail clients reach Kilde",
                )
            folder.mkdir(parents=True, exist_ok=True)
            manifest: list[dict[str, Any]] = []
            result: dict[str, Any] = {}
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("rendering", total=len(people))
                for at in range(0, len(people), CHUNK):
                    chunk = people[at : at + CHUNK]
                    result = client.post(
                        f"/api/email/campaigns/{campaign}/render",
                        json={
                            "html": html,
                            "recipients": chunk,
                            "base_url": base,
                            "purpose": purpose,
                            "expires_days": expires_days,
                        },
                    )
                    for mail in result["mails"]:
                        person = chunk[mail["index"]]
                        name = f"{mail['recipient']}.html"
                        (folder / name).write_text(mail["html"], encoding="utf-8")
                        manifest.append(
                            {
                                "file": name,
                                "user_id": person["user_id"] or "",
                                "email": person["email"] or "",
                                "recipient": mail["recipient"],
                                "list_unsubscribe": mail["list_unsubscribe"],
                                "list_unsubscribe_post": mail["list_unsubscribe_post"],
                            }
                        )
                    progress.advance(task, len(chunk))
    except KildeError as exc:
        fail(exc)
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(manifest[0]))
        writer.writeheader()
        writer.writerows(manifest)
    console.print(
        f"[green]{len(manifest)} mails[/] for campaign [bold]{result['campaign']}[/] "
        f"(purpose {result['purpose']}) written to {folder}/ with manifest.csv",
        highlight=False,
        soft_wrap=True,
    )
    for link in result["links"]:
        label = f" ({link['label']})" if link["label"] else ""
        console.print(
            f"  link {link['link_id']}{label}: {link['url']}", highlight=False, soft_wrap=True
        )
    for warning in result["warnings"]:
        console.print(f"  [yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


@email_app.command("report")
def report(
    campaign: CampaignOpt,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Human opens, machine opens (privacy proxies, prefetchers), clicks and unsubscribes."""
    try:
        with Client(settings_from(data, plan), token) as client:
            result = client.get(f"/api/email/campaigns/{campaign}/report")
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result)
        return
    opens, clicks, rates = result["opens"], result["clicks"], result["rates"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    table = Table(title=f"Campaign {result['campaign']}: {result['recipients']} recipients")
    for column in ("", "total", "unique recipients", "rate"):
        table.add_column(column)
    table.add_row(
        "human opens",
        str(opens["human"]),
        str(opens["unique_human"]),
        pct(rates["human_open_rate"]),
    )
    table.add_row("machine opens", str(opens["machine"]), str(opens["unique_machine"]), "")
    table.add_row(
        "human clicks", str(clicks["human"]), str(clicks["unique_human"]), pct(rates["click_rate"])
    )
    table.add_row("machine clicks", str(clicks["machine"]), str(clicks["unique_machine"]), "")
    table.add_row("unsubscribes", "", str(result["unsubscribes"]), pct(rates["unsubscribe_rate"]))
    console.print(table)
    if opens["machine_by_rule"]:
        rules = ", ".join(f"{k} {v}" for k, v in opens["machine_by_rule"].items())
        console.print(f"machine opens by rule: {rules}", highlight=False, soft_wrap=True)
    links = Table(title="Links")
    for column in ("id", "url", "label", "human clicks", "unique", "machine clicks"):
        links.add_column(column, overflow="fold")
    for link in result["links"]:
        links.add_row(
            str(link["link_id"]),
            link["url"],
            link["label"] or "",
            str(link["human_clicks"]),
            str(link["unique_human_clickers"]),
            str(link["machine_clicks"]),
        )
    console.print(links)


@email_app.command("campaigns")
def campaigns(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """The campaigns rendered so far."""
    try:
        with Client(settings_from(data, plan), token) as client:
            result = client.get("/api/email/campaigns")
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(result["campaigns"])
        return
    table = Table(title="Mail campaigns")
    for column in ("campaign", "purpose", "created", "links", "recipients"):
        table.add_column(column)
    for row in result["campaigns"]:
        table.add_row(
            row["campaign"],
            row["purpose"],
            str(row["created_at"])[:19],
            str(row["links"]),
            str(row["recipients"]),
        )
    console.print(table)
