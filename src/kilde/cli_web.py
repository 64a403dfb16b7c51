"""`kilde snippet`: the copy-paste HTML that puts k.js on a website."""

from __future__ import annotations

from typing import Annotated

import typer

from kilde.cli_common import DataOpt, PlanOpt, errors, fail, settings_from
from kilde.client import running_server
from kilde.collect.tracker import snippet as render_snippet
from kilde.errors import KildeError
from kilde.plan import load_plan


def snippet(
    source: Annotated[str, typer.Option("--source", help="The plan's source the site sends as")],
    collector: Annotated[
        str | None,
        typer.Option(
            "--collector",
            help="Public address of Kilde as browsers reach it, e.g. https://collect.shop.example "
            "[default: the running server, else http://HOST:PORT]",
        ),
    ] = None,
    no_auto_page: Annotated[
        bool, typer.Option("--no-auto-page", help="Do not record page views by itself")
    ] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
) -> None:
    """Print the HTML snippet to paste into every page of a website, before </head>."""
    settings = settings_from(data, plan)
    try:
        loaded = load_plan(settings.plan_path)
    except KildeError as exc:
        fail(exc)
    found = loaded.source(source)
    if found is None:
        names = ", ".join(s.name for s in loaded.sources)
        fail(KildeError(f"the plan has no source {source!r}", fix=f"use one of: {names}"))
    if not found.write_keys:
        fail(
            KildeError(
                f"source {source!r} has no write key",
                fix="add write_keys to the source in the plan",
            )
        )
    if found.kind != "web":
        errors.print(
            f"[yellow]note:[/] source {source!r} is of kind {found.kind!r}, not 'web'",
            highlight=False,
        )
    url = (
        collector or running_server(settings.data_dir) or f"http://{settings.host}:{settings.port}"
    )
    typer.echo(render_snippet(url, found.write_keys[0], auto_page=not no_auto_page))
