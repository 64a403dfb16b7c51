"""`kilde users`: the people who may log in to the dashboard, and their roles.

Through the admin API (`/api/users`), so it works while `kilde serve` runs and without it.
Passwords are asked for without echo (twice), or read from standard input with
`--password-stdin` for scripts; they are never taken as a command-line argument, which other
users of the machine could see.
"""

from __future__ import annotations

import secrets
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from kilde.cli_common import DataOpt, JsonOpt, PlanOpt, TokenOpt, console, fail, print_json
from kilde.cli_common import settings_from as _settings
from kilde.client import Client
from kilde.errors import KildeError

users_app = typer.Typer(
    help="Dashboard users: add, list, remove, set a password or a role.", no_args_is_help=True
)

RoleOpt = Annotated[
    str,
    typer.Option(
        "--role",
        help="admin (everything), analyst (no personal-data export or erasure), "
        "viewer (aggregates only)",
    ),
]
StdinOpt = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input")
]


def _call(data: Any, plan: Any, token: Any, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with Client(_settings(data, plan), token) as client:
            return client.request(method, path, **kwargs)
    except KildeError as exc:
        fail(exc)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    value: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="The name to log in with")],
    role: RoleOpt = "viewer",
    password_stdin: StdinOpt = False,
    generate: Annotated[
        bool, typer.Option("--generate", help="Make up a strong password and print it once")
    ] = False,
    if_none: Annotated[
        bool, typer.Option("--if-none", help="Do nothing when any dashboard user exists")
    ] = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add a dashboard user (the password is hashed with argon2id)."""
    if if_none and _call(data, plan, token, "GET", "/api/users")["users"]:
        console.print("dashboard users exist already; none added")
        return
    password = secrets.token_urlsafe(15) if generate else _password(password_stdin)
    body = {"username": username, "password": password, "role": role}
    _call(data, plan, token, "POST", "/api/users", json=body)
    console.print(f"added [bold]{username}[/] ({role}); they can log in at the server's address")
    if generate:
        console.print(f"  password (shown once): [bold yellow]{password}[/]", highlight=False)


@users_app.command("list")
def users_list(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Every dashboard user with their role and last login."""
    result = _call(data, plan, token, "GET", "/api/users")
    if json:
        print_json(result["users"])
        return
    table = Table(title=f"{len(result['users'])} dashboard users")
    for column in ("user", "role", "created", "last login", "sessions"):
        table.add_column(column)
    for user in result["users"]:
        table.add_row(
            user["username"],
            user["role"],
            str(user["created_at"])[:16],
            str(user["last_login_at"] or "never")[:16],
            str(user["sessions"]),
        )
    console.print(table)


@users_app.command("remove")
def users_remove(
    username: Annotated[str, typer.Argument(help="The user to remove")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Remove a dashboard user; their sessions end at once."""
    _call(data, plan, token, "DELETE", f"/api/users/{username}")
    console.print(f"removed [bold]{username}[/]")


@users_app.command("password")
def users_password(
    username: Annotated[str, typer.Argument(help="The user")],
    password_stdin: StdinOpt = False,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Set a new password; the user's sessions end."""
    password = _password(password_stdin)
    _call(data, plan, token, "POST", f"/api/users/{username}", json={"password": password})
    console.print(f"new password set for [bold]{username}[/]; their sessions have ended")


@users_app.command("role")
def users_role(
    username: Annotated[str, typer.Argument(help="The user")],
    role: Annotated[str, typer.Argument(help="admin, analyst or viewer")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """Give a user another role."""
    _call(data, plan, token, "POST", f"/api/users/{username}", json={"role": role})
    console.print(f"[bold]{username}[/] is now {role}")
