"""What every `kilde` sub-command shares: options, settings, error output.

Sub-command modules (cli_*.py) import from here, and cli.py registers them, so no module
imports cli.py itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console

from kilde.config import Settings
from kilde.errors import KildeError

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def settings_from(data: Path | None, plan: Path | None, **extra: Any) -> Settings:
    return Settings.from_env(data_dir=data, plan_path=plan, **extra)


def fail(exc: KildeError) -> NoReturn:
    errors.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    if exc.fix:
        errors.print(f"[bold]fix:[/] {exc.fix}", highlight=False)
    raise typer.Exit(1)


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
