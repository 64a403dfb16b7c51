"""Loading `kilde.yaml`: YAML with positions, `${VAR}` secrets, and every problem at once.

The YAML is composed into nodes first so that each value keeps its line and column; pydantic's
error locations are then mapped back onto those positions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kilde.errors import KildeError
from kilde.plan.checks import cross_check
from kilde.plan.models import Plan

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class PlanProblem:
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"line {self.line}, column {self.column}{where}: {self.message}"


class PlanError(KildeError):
    """The plan file cannot be used; `problems` lists every reason with its position."""

    def __init__(self, file: str, problems: list[PlanProblem]) -> None:
        lines = "\n".join(f"  {file}: {p}" for p in problems)
        super().__init__(
            f"the collection plan {file} has {len(problems)} problem(s):\n{lines}",
            fix="correct the plan and run `kilde plan check` again",
        )
        self.file = file
        self.problems = problems


def load_plan(path: str | Path, env: Mapping[str, str] | None = None) -> Plan:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KildeError(
            f"no plan file at {file}",
            fix="pass --plan FILE, set KILDE_PLAN, or copy the example with `kilde plan init`",
        ) from None
    except UnicodeDecodeError:
        raise KildeError(f"the plan {file} is not UTF-8 text", fix="save it as UTF-8") from None
    return load_plan_text(text, str(file), env)


def load_plan_text(
    text: str, file: str = "kilde.yaml", env: Mapping[str, str] | None = None
) -> Plan:
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PlanError(
            file, [PlanProblem(line, col, "", f"not valid YAML: {exc.problem}")]
        ) from None
    if root is None:
        raise PlanError(file, [PlanProblem(1, 1, "", "the plan is empty")])

    marks: dict[Loc, tuple[int, int]] = {}
    problems: list[PlanProblem] = []
    data = _to_python(root, (), marks, problems, env)
    if problems:
        raise PlanError(file, problems)
    if not isinstance(data, dict):
        raise PlanError(file, [PlanProblem(1, 1, "", "the plan must be a mapping of sections")])

    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc: Loc = tuple(error["loc"])
            problems.append(_problem(marks, loc, _message(error)))
        raise PlanError(file, problems) from None
    for loc, message in cross_check(plan):
        problems.append(_problem(marks, loc, message))
    if problems:
        raise PlanError(file, problems)
    return plan


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "this key is required"
    if kind == "literal_error":
        return f"{error['msg']}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _problem(marks: dict[Loc, tuple[int, int]], loc: Loc, message: str) -> PlanProblem:
    # Pydantic adds model or tag names into some locations; keep only the parts that exist.
    probe = loc
    while probe and probe not in marks:
        probe = probe[:-1]
    line, column = marks.get(probe, (1, 1))
    return PlanProblem(line, column, ".".join(str(p) for p in loc), message)


def _to_python(
    node: yaml.Node,
    loc: Loc,
    marks: dict[Loc, tuple[int, int]],
    problems: list[PlanProblem],
    env: Mapping[str, str],
) -> Any:
    marks[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            result[key] = _to_python(value_node, (*loc, key), marks, problems, env)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(child, (*loc, index), marks, problems, env)
            for index, child in enumerate(node.value)
        ]
    value = yaml.SafeLoader(b"").construct_object(node)  # plain scalars: int, bool, str, null
    if isinstance(value, str) and "${" in value:
        return _substitute(value, loc, marks, problems, env)
    return value


def _substitute(
    value: str,
    loc: Loc,
    marks: dict[Loc, tuple[int, int]],
    problems: list[PlanProblem],
    env: Mapping[str, str],
) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        line, column = marks[loc]
        problems.append(
            PlanProblem(
                line,
                column,
                ".".join(str(p) for p in loc),
                f"environment variable {name} is not set; set it or write ${{{name}:-default}}",
            )
        )
        return ""

    return _VAR.sub(replace, value)
