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
    keys: dict[Loc, tuple[int, int]] = {}
    problems: list[PlanProblem] = []
    data = _to_python(root, (), marks, keys, problems, env)
    if not isinstance(data, dict):
        raise PlanError(file, [PlanProblem(1, 1, "", "the plan must be a mapping of sections")])

    # Collect every problem before giving up: missing variables, the models, the cross checks.
    plan: Plan | None = None
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            if error["type"] == "json_schema":
                continue  # cross_check reports it at the failing line of the schema
            loc: Loc = tuple(error["loc"])
            where = keys if error["type"] == "extra_forbidden" else marks
            problems.append(_problem(where, marks, loc, _message(error)))
    for loc, message in cross_check(data):
        problems.append(_problem(marks, marks, loc, message))
    if problems or plan is None:
        # A value with a missing variable is checked as written; its own complaints are noise.
        unset = {p.path for p in problems if p.message.startswith("environment variable")}
        problems = [
            p for p in problems if p.path not in unset or p.message.startswith("environment")
        ]
        problems.sort(key=lambda p: (p.line, p.column))
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


def _problem(
    where: dict[Loc, tuple[int, int]], marks: dict[Loc, tuple[int, int]], loc: Loc, message: str
) -> PlanProblem:
    # Pydantic adds model or tag names into some locations; keep only the parts that exist.
    if loc in where:
        line, column = where[loc]
    else:
        probe = loc
        while probe and probe not in marks:
            probe = probe[:-1]
        line, column = marks.get(probe, (1, 1))
    return PlanProblem(line, column, ".".join(str(p) for p in loc), message)


def _to_python(
    node: yaml.Node,
    loc: Loc,
    marks: dict[Loc, tuple[int, int]],
    keys: dict[Loc, tuple[int, int]],
    problems: list[PlanProblem],
    env: Mapping[str, str],
) -> Any:
    marks[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            key_loc = (*loc, key)
            if key in result:
                # YAML loaders keep the last of two equal keys silently; a plan must not.
                problems.append(
                    PlanProblem(
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                        ".".join(str(p) for p in key_loc),
                        f"key {key!r} appears twice in this mapping; keep one",
                    )
                )
                continue
            keys[key_loc] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = _to_python(value_node, key_loc, marks, keys, problems, env)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(child, (*loc, index), marks, keys, problems, env)
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
        return match.group(0)  # checked further as written, so later problems show too

    return _VAR.sub(replace, value)
