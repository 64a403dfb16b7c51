"""Beyond one machine: `kilde compute`, `kilde lake ...` and `kilde serve --collector-only`.

- `kilde serve --collector-only --lake DIR`: a stateless collector appending to the lake; run
  as many as needed behind a load balancer.
- `kilde lake status|compact|export|erase|retain`: look after the lake.
- `kilde compute --store duckdb:PATH|spark:MASTER`: identity, profiles, insights and segments
  as one batch run, on the embedded store or on Spark over the lake.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kilde.cli_common import DataOpt, JsonOpt, PlanOpt, console, errors, fail, print_json
from kilde.config import Settings
from kilde.errors import KildeError

lake_app = typer.Typer(
    help="The lake: event files written by collectors, read by Spark.", no_args_is_help=True
)

LakeOpt = Annotated[
    Path | None,
    typer.Option("--lake", help="Lake directory [env KILDE_LAKE, default DATA/lake]"),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="duckdb:PATH (a data directory; the default) or spark:MASTER, e.g. 'spark:local[*]'",
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(lake_app, name="lake")
    app.command("compute")(compute)


def lake_path(lake: Path | None, data: Path | None = None) -> Path:
    if lake is not None:
        return lake
    env = os.environ.get("KILDE_LAKE")
    if env:
        return Path(env)
    return Settings.from_env(data_dir=data).data_dir / "lake"


def _plan(plan: Path | None) -> Any:
    from kilde.plan import load_plan

    return load_plan(Settings.from_env(plan_path=plan).plan_path)


def _say(text: str) -> None:
    errors.print(f"[dim]{text}[/]", highlight=False)


# -- serve --collector-only ----------------------------------------------------------------------


def serve_collector(
    host: str | None, port: int | None, data: Path | None, plan: Path | None, lake: Path | None
) -> None:
    """Run a collector that appends to the lake (no admin API, no dashboard)."""

    import uvicorn

    from kilde.web.app import create_collector_app
    from kilde.web.errors import configure_server_logging

    settings = Settings.from_env(data_dir=data, plan_path=plan, host=host, port=port)
    folder = lake_path(lake, data)
    configure_server_logging()
    try:
        application = create_collector_app(settings, folder)
    except KildeError as exc:
        fail(exc)
    url = f"http://{settings.host}:{settings.port}"
    pipeline = application.state.pipeline
    console.print(
        f"[bold green]Kilde collector[/] for {pipeline.plan.company.name} at [bold]{url}[/]"
    )
    console.print(f"  lake: {folder}   plan: {settings.plan_path}   pid: {os.getpid()}")
    uvicorn.run(
        application, host=settings.host, port=settings.port, access_log=False, log_config=None
    )


# -- kilde compute -----------------------------------------------------------------------------


def compute(
    store: StoreOpt = None,
    lake: LakeOpt = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    now: Annotated[
        str | None,
        typer.Option(help="Compute as of this time (ISO 8601, UTC); default: now"),
    ] = None,
    steps: Annotated[
        str, typer.Option(help="Comma-separated steps: identity, insights, segments")
    ] = "identity,insights,segments",
    json_out: JsonOpt = False,
) -> None:
    """Run identity resolution, profiles, insights and segments as one batch.

    On `duckdb:PATH` it works on that data directory's store (stop `kilde serve` first); on
    `spark:MASTER` it reads the lake's events and keeps its results in the lake's state tables.
    """
    from kilde.store.backends import parse_store
    from kilde.store.compute import STEPS

    try:
        spec = parse_store(store, data)
        chosen = tuple(s.strip() for s in steps.split(",") if s.strip())
        unknown = [s for s in chosen if s not in STEPS]
        if unknown:
            raise KildeError(f"unknown step {unknown[0]!r}", fix=f"choose from {', '.join(STEPS)}")
        moment = _moment(now)
        the_plan = _plan(plan)
        if spec.is_spark:
            report = _compute_spark(spec.target, lake_path(lake, data), the_plan, moment, chosen)
        else:
            from kilde.store.compute import compute_duckdb

            report = compute_duckdb(
                Path(spec.target), the_plan, now=moment, steps=chosen, say=_say
            ).as_dict()
    except KildeError as exc:
        fail(exc)
    if json_out:
        print_json(report)
        return
    table = Table(title=f"kilde compute on {report['store']}")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for name, step in report["steps"].items():
        table.add_row(name, f"{step['seconds']:.1f}", _brief(name, step["result"]))
    console.print(table)
    console.print(f"total {report['seconds']:.1f} s")


def _moment(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise KildeError(
            "--now is not a time", fix="give an ISO 8601 time, e.g. 2026-11-29T12:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _brief(name: str, result: Any) -> str:
    if name == "identity" and isinstance(result, dict):
        return f"{result.get('profiles')} profiles, {result.get('identifiers')} identifiers"
    if name == "insights" and isinstance(result, dict):
        return f"{result.get('profiles_with_orders')} customers scored"
    if name == "segments" and isinstance(result, list):
        return ", ".join(f"{r['segment_id']}: {r.get('members', 'error')}" for r in result)
    return ""


def _compute_spark(
    master: str, lake: Path, plan: Any, now: datetime, steps: tuple[str, ...]
) -> dict[str, Any]:
    from kilde.store.backends import spark_session
    from kilde.store.compute import LakeCompute
    from kilde.store.lake import Lake

    if not lake.is_dir():
        raise KildeError(
            f"there is no lake at {lake}",
            fix="point --lake at the collectors' lake, or make one from a store with "
            "`kilde lake export --data DIR --lake DIR`",
        )
    _say(f"starting Spark ({master})")
    spark = spark_session(master)
    job = LakeCompute(spark, Lake(lake), plan, now=now, say=_say)
    try:
        return job.compute(steps).as_dict()
    finally:
        job.close()


# -- kilde lake ... ------------------------------------------------------------------------------


@lake_app.command("status")
def lake_status(lake: LakeOpt = None, data: DataOpt = None, json_out: JsonOpt = False) -> None:
    """Files, rows and days of each dataset of the lake."""
    from kilde.store.lake import DATASETS, Lake, summary

    folder = lake_path(lake, data)
    the_lake = Lake(folder)
    found = {name: summary(the_lake, name).as_dict() for name in DATASETS}
    state = sorted(p.name for p in the_lake.state_dir.glob("[a-z]*") if p.is_dir())
    if json_out:
        print_json({"lake": str(folder), "datasets": found, "state": state})
        return
    table = Table(title=f"lake {folder}")
    for column in ("dataset", "files", "rows", "days", "bytes"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for name, info in found.items():
        table.add_row(name, *(f"{info[k]:,}" for k in ("files", "rows", "days", "bytes")))
    console.print(table)
    console.print(f"state tables: {', '.join(state) or '(none yet)'}")


@lake_app.command("compact")
def lake_compact(
    lake: LakeOpt = None,
    data: DataOpt = None,
    target_rows: Annotated[int, typer.Option(help="Rows per merged file", min=1000)] = 1_000_000,
    json_out: JsonOpt = False,
) -> None:
    """Merge each day's small files (collectors write one per flush); drop duplicates."""
    from kilde.store.compaction import compact
    from kilde.store.lake import DATASETS, Lake

    the_lake = Lake(lake_path(lake, data))
    reports = {
        name: compact(the_lake, name, target_rows=target_rows).as_dict() for name in DATASETS
    }
    if json_out:
        print_json(reports)
        return
    for name, report in reports.items():
        console.print(
            f"{name}: {report['files_before']} files -> {report['files_after']}, "
            f"{report['rows']:,} rows, {report['duplicates_dropped']} duplicates dropped "
            f"({report['seconds']:.1f} s)"
        )


@lake_app.command("export")
def lake_export(data: DataOpt = None, lake: LakeOpt = None, json_out: JsonOpt = False) -> None:
    """Copy a data directory's store into a lake, to move from DuckDB to Spark.

    The events become day partitions; the profile id salt, unmerges, segments and consent
    ledger become state tables. Stop `kilde serve` first.
    """
    from kilde.store.compute import export_store
    from kilde.store.lake import Lake

    settings = Settings.from_env(data_dir=data)
    folder = lake_path(lake, data)
    try:
        counts = export_store(settings.data_dir, Lake(folder), say=_say)
    except Exception as exc:  # a locked or missing store: say which
        if "lock" in str(exc).lower():
            fail(KildeError("the store is in use", fix="stop `kilde serve` and run it again"))
        raise
    if json_out:
        print_json({"lake": str(folder), "copied": counts})
        return
    console.print(
        f"[green]exported[/] to {folder}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
    )


@lake_app.command("erase")
def lake_erase(
    identifiers: Annotated[
        list[str], typer.Argument(help="The person's identifiers as TYPE:VALUE (or an email)")
    ],
    lake: LakeOpt = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove a person from every file of the lake (events, dead letters, state)."""
    from kilde.identity.identifiers import Normaliser, parse_identifier
    from kilde.store.compaction import erase_from_lake, subject_in_lake
    from kilde.store.lake import Lake

    normaliser = Normaliser(_plan(plan).identity)
    given = [found for text in identifiers for found in parse_identifier(text, normaliser)]
    if not given:
        fail(KildeError("no identifier could be read", fix="give TYPE:VALUE, e.g. email:..."))
    the_lake = Lake(lake_path(lake, data))
    subject = subject_in_lake(the_lake, given)
    report = erase_from_lake(the_lake, subject, list(subject.identifiers)).as_dict()
    if json_out:
        print_json(report)
        return
    console.print(
        f"[green]erased[/]: {sum(report['rows_removed'].values())} rows in "
        f"{len(report['files_rewritten'])} files, {report['statements_removed']} kept statements"
    )


@lake_app.command("retain")
def lake_retain(
    lake: LakeOpt = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Apply the plan's retention to the lake's events (delete or anonymise what expired)."""
    from kilde.store.compaction import retain_lake
    from kilde.store.lake import Lake

    report = retain_lake(Lake(lake_path(lake, data)), _plan(plan), dry_run=dry_run)
    if json_out:
        print_json(report)
        return
    verb = "would change" if dry_run else "changed"
    console.print(
        f"{verb}: {report['expired_events']} expired events, {report['expired_traits']} "
        f"expired traits; {len(report['files_rewritten'])} files rewritten"
    )
