"""`kilde import KIND FILE --source NAME`: order history, CRM contacts, support tickets,
social logins and broker files, streamed through the server's admin API into the pipeline."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kilde.cli_common import (
    DataOpt,
    JsonOpt,
    PlanOpt,
    TokenOpt,
    console,
    errors,
    fail,
    print_json,
    settings_from,
)
from kilde.errors import KildeError

if TYPE_CHECKING:
    from kilde.collect.importers.base import Kind
    from kilde.collect.importers.engine import Summary
    from kilde.collect.importers.sink import ApiSink

# Generation 2 runs after this many generation-1 runs: not within any import.
FULL_COLLECTIONS_NEVER = 1_000_000_000
# Kept here so `kilde --help` does not import the importers.
KINDS = ("transactions", "contacts", "interactions", "broker", "social_login")

KindArg = Annotated[
    str,
    typer.Argument(
        help="transactions (orders), contacts (CRM), interactions (tickets, chats, calls, "
        "meetings), broker (bought data) or social_login (OIDC claims)",
        show_default=False,
    ),
]


def _default_rejects(file: Path) -> Path:
    candidate = file.with_name(file.stem + ".rejects.csv")
    try:
        with candidate.open("a"):
            pass
        candidate.unlink()
    except OSError:
        candidate = Path.cwd() / candidate.name
    return candidate


def import_file(
    kind: KindArg,
    file: Annotated[Path, typer.Argument(help="CSV, TSV, JSON Lines, Parquet or Excel file")],
    source: Annotated[
        str, typer.Option("--source", "-s", help="The plan source the data belongs to")
    ],
    mapping: Annotated[
        Path | None,
        typer.Option("--map", "-m", help="YAML mapping of columns to Kilde fields"),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check every row and show the first as stored; write none"),
    ] = False,
    encoding: Annotated[
        str | None, typer.Option(help="Text encoding of a CSV file [default: detected]")
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="CSV delimiter, e.g. ';' or '\\t' [default: detected]")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help="csv, jsonl, parquet or excel [default: by file name]"),
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="Where to write rejected rows [default: FILE.rejects.csv]"),
    ] = None,
    broker: Annotated[str | None, typer.Option(help="broker: who sold the file")] = None,
    acquired: Annotated[
        str | None, typer.Option(help="broker: date the file was bought (YYYY-MM-DD)")
    ] = None,
    licence_expires: Annotated[
        str | None, typer.Option(help="broker: date the licence ends (YYYY-MM-DD)")
    ] = None,
    purpose: Annotated[
        str | None, typer.Option(help="broker: the plan purpose the data is for")
    ] = None,
    preview: Annotated[int, typer.Option(help="How many rows --dry-run shows")] = 5,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Import orders, CRM contacts, tickets, social logins or bought data.

    Every row is checked against the collection plan like a tracked event.

    Rejected rows go to a reject file (line, column, reason) and the dead letter.

    Importing the same file again stores nothing twice. See docs/importing.md.

    kilde import transactions orders.csv --source shop-orders

    kilde import contacts crm.xlsx -s crm --map crm.mapping.yaml --dry-run
    """
    if kind not in KINDS:
        fail(KildeError(f"{kind!r} is not a kind of import", fix="use one of: " + ", ".join(KINDS)))
    from kilde.client import Client
    from kilde.collect.importers.mapping import load_mapping
    from kilde.collect.importers.sink import ApiSink
    from kilde.plan import load_plan

    chosen: Kind = kind  # type: ignore[assignment]
    settings = settings_from(data, plan)
    if delimiter is not None:
        delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    try:
        loaded_plan = load_plan(settings.plan_path)
        loaded = load_mapping(mapping)
        terms = loaded.broker
        updates: dict[str, Any] = {}
        for key, value in (("name", broker), ("purpose", purpose)):
            if value:
                updates[key] = value
        for key, value in (("acquired", acquired), ("licence_expires", licence_expires)):
            if value:
                try:
                    updates[key] = date.fromisoformat(value)
                except ValueError:
                    raise KildeError(
                        f"--{key.replace('_', '-')} is not a date",
                        fix="write it as YYYY-MM-DD",
                    ) from None
        if updates:
            loaded = loaded.model_copy(update={"broker": terms.model_copy(update=updates)})
        reject_path = rejects or _default_rejects(file)
        with Client(settings, token) as client:
            sink = ApiSink(client, chosen, source, dry_run)
            summary = _run(
                file,
                chosen,
                source,
                loaded_plan,
                loaded,
                sink,
                encoding,
                delimiter,
                format,
                dry_run,
                preview,
                reject_path,
                quiet=json,
            )
    except KildeError as exc:
        fail(exc)
    if json:
        print_json(summary.as_dict())
    else:
        _report(summary)
    if summary.rows_read == 0:
        errors.print("[bold red]error:[/] the file has no rows to import")
        raise typer.Exit(1)
    if summary.imported == 0:
        errors.print(
            "[bold red]error:[/] no row could be imported"
            + (" (dry run)" if dry_run else "")
            + "; see the reasons above"
        )
        raise typer.Exit(1)


@contextmanager
def _young_collections_only() -> Iterator[None]:
    """Python's collector only for young objects while this process imports a file.

    An order import remembers the order ids it has seen, a few tuples each, to catch one repeated
    with other values; every full collection walked all of them again, about a sixth of the
    import process's time in bench/import.py. Objects that live long in an import are not
    cyclic garbage, so only full collections stop; young objects are still collected.
    """
    before = gc.get_threshold()
    gc.freeze()  # what start-up built is never garbage either
    gc.set_threshold(10_000, 10, FULL_COLLECTIONS_NEVER)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _run(
    file: Path,
    kind: Kind,
    source: str,
    plan: Any,
    mapping: Any,
    sink: ApiSink,
    encoding: str | None,
    delimiter: str | None,
    file_format: str | None,
    dry_run: bool,
    preview: int,
    reject_path: Path,
    *,
    quiet: bool,
) -> Summary:
    from kilde.collect.importers.base import Reader
    from kilde.collect.importers.engine import run_import

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:>12,} rows  {task.fields[rate]:>9,.0f} rows/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=errors, transient=True, disable=quiet) as bar:
        task = bar.add_task(
            ("checking " if dry_run else "importing ") + file.name, total=None, rows=0, rate=0.0
        )
        started = time.perf_counter()

        def on_start(reader: Reader) -> None:
            bar.update(task, total=reader.total)

        def progress(position: int, total: int | None, rows: int) -> None:
            rate = rows / max(time.perf_counter() - started, 1e-6)
            bar.update(task, completed=position, total=total, rows=rows, rate=rate)

        with _young_collections_only():
            return run_import(
                file,
                kind=kind,
                source=source,
                plan=plan,
                mapping=mapping,
                sink=sink,
                file_format=file_format,
                encoding=encoding,
                delimiter=delimiter,
                dry_run=dry_run,
                preview_rows=preview if dry_run else 0,
                reject_path=reject_path,
                on_start=on_start,
                progress=progress,
            )


def _report(summary: Summary) -> None:
    def say(text: str, *, markup: bool = True) -> None:
        console.print(text, highlight=False, soft_wrap=True, markup=markup)

    verb = "checked (dry run, nothing written)" if summary.dry_run else "imported"
    say(
        f"[bold]{escape(summary.file)}[/] {verb}: {summary.kind} into source "
        f"[bold]{escape(summary.source)}[/] in {summary.seconds:.1f} s"
    )
    say("  " + "  ".join(f"{k}: {escape(v)}" for k, v in summary.details.items()))
    if summary.dry_run:
        say("  mapping (Kilde field <- file column):")
        for name, column in summary.mapping.items():
            say(f"    {name} <- {escape(column)}")
        if summary.ignored_columns:
            say(
                "  ignored columns (map them under traits: or properties: to keep them): "
                + escape(", ".join(summary.ignored_columns))
            )
        if summary.preview:
            say(f"  the first {len(summary.preview)} record(s) as they will be stored:")
        for row in summary.preview:
            console.print_json(data=row)
    rate = summary.rows_read / summary.seconds if summary.seconds else 0.0
    would = "would be stored" if summary.dry_run else "stored"
    flagged = f" (flagged {summary.flagged:,})" if summary.flagged else ""
    say(
        f"  rows read {summary.rows_read:,}  records {summary.records:,}  {would} "
        f"{summary.stored:,}{flagged}  already there {summary.duplicates:,}  rejected "
        f"{summary.rejected:,}  ({rate:,.0f} rows/s)"
    )
    if summary.suppressed or summary.withheld:
        say(
            f"  kept out by privacy rules: {summary.suppressed:,} of people on the suppression "
            f"list, {summary.withheld:,} without a lawful basis (consent); nothing of them is "
            "stored"
        )
    if summary.rejected:
        reasons = ", ".join(f"{k} {v}" for k, v in summary.reasons.most_common())
        say(f"  rejected by reason: {reasons}", markup=False)
        for error in summary.first_errors[:10]:
            where = f"line {error['line']}"
            if error.get("end_line"):
                where += f"-{error['end_line']}"
            if error.get("column"):
                where += f", column {error['column']}"
            say(f"    {where}: {error['error']}: {error['reason']}", markup=False)
        if summary.reject_file:
            say(f"  all rejected rows: {summary.reject_file}", markup=False)
        if not summary.dry_run:
            say(
                f"  they are also in the dead letter: kilde bad-events list --source "
                f"{summary.source}",
                markup=False,
            )
