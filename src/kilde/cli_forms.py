"""`kilde forms` and `kilde surveys`: hosted forms, personal survey links, results."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kilde.cli_common import DataOpt, JsonOpt, PlanOpt, TokenOpt, console, fail, print_json
from kilde.cli_common import settings_from as _settings
from kilde.client import Client
from kilde.errors import KildeError

forms_app = typer.Typer(help="Hosted forms and surveys declared in the plan.", no_args_is_help=True)
surveys_app = typer.Typer(help="Survey results.", no_args_is_help=True)


def _call(data: Any, plan: Any, token: Any, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with Client(_settings(data, plan), token) as client:
            return client.request(method, path, **kwargs)
    except KildeError as exc:
        fail(exc)


@forms_app.command("list")
def forms_list(
    data: DataOpt = None, plan: PlanOpt = None, token: TokenOpt = None, json: JsonOpt = False
) -> None:
    """Every form and survey with its address."""
    result = _call(data, plan, token, "GET", "/api/forms")
    if json:
        print_json(result)
        return
    table = Table(title="Forms and surveys")
    for column in ("id", "kind", "title", "url", "consent boxes"):
        table.add_column(column, overflow="fold")
    for form in result["forms"]:
        table.add_row(
            form["id"], form["kind"], form["title"], form["url"], ", ".join(form["consents"])
        )
    console.print(table)


@forms_app.command("url")
def forms_url(
    form: Annotated[str, typer.Argument(help="The form or survey id")],
    for_email: Annotated[
        str | None, typer.Option("--for", help="A personal link for this email address")
    ] = None,
    user_id: Annotated[str | None, typer.Option(help="A personal link for this user id")] = None,
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
) -> None:
    """The address of a form; with --for or --user-id a personal, single-use survey link.

    The link carries a signed invitation id only: the email stays in Kilde's store.
    """
    if for_email is None and user_id is None:
        forms = _call(data, plan, token, "GET", "/api/forms")["forms"]
        match = next((f for f in forms if f["id"] == form), None)
        if match is None:
            fail(KildeError(f"there is no form {form!r}", fix="see `kilde forms list`"))
        print(match["url"])
        return
    result = _call(
        data,
        plan,
        token,
        "POST",
        f"/api/forms/{form}/invites",
        json={"email": for_email, "user_id": user_id},
    )
    print(result["url"])


@surveys_app.command("results")
def surveys_results(
    survey: Annotated[str, typer.Argument(help="The survey (or form) id")],
    data: DataOpt = None,
    plan: PlanOpt = None,
    token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Results per question: NPS with promoters, passives and detractors; distributions."""
    result = _call(data, plan, token, "GET", f"/api/forms/{survey}/results")
    if json:
        print_json(result)
        return
    console.print(f"[bold]{result['title']}[/] — {result['submissions']} submissions")
    for q in result["questions"]:
        console.print(f"\n[bold]{q['label']}[/] ({q['type']}, {q['responses']} answers)")
        if q["type"] == "nps":
            console.print(
                f"  NPS {q['nps']}: {q['promoters']} promoters, {q['passives']} passives, "
                f"{q['detractors']} detractors"
            )
        elif q["type"] == "csat":
            console.print(f"  CSAT {q['csat']}% satisfied, average {q['average']}")
        if "distribution" in q:
            top = max(q["distribution"].values(), default=0) or 1
            for answer, count in q["distribution"].items():
                bar = "█" * round(30 * count / top)
                console.print(f"  {answer:>18} {count:>6} {bar}", highlight=False)
