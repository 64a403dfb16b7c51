"""The collection plan as its author meets it: `kilde plan check`, `kilde plan show`, secrets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from kilde.plan import load_plan
from tests.conftest import DEMO_PLAN, Server, free_port, run_kilde, start_server

# A small, sound plan; each case below breaks one line of it.
BASE = """\
version: 1
company:
  name: Tiny Shop
sources:
  - name: web
    kind: web
    owner: web team
    tool: k.js
    mode: strict
    write_keys: ["web-key-000001"]
  - name: backend
    kind: server
    owner: backend team
    tool: segment-analytics-python
    write_keys: ["backend-key-0001"]
purposes:
  - id: analytics
    description: Improve the shop.
    legal_basis: legitimate_interest
events:
  - name: Order Completed
    purposes: [analytics]
    retention: 13 months
    properties:
      type: object
      required: [order_id]
      properties:
        order_id: {type: string}
traits:
  - name: email
    type: string
    pii: direct
    purposes: [analytics]
    retention: 2 years
"""


def write_plan(tmp_path: Path, text: str, name: str = "kilde.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def problems(result: subprocess.CompletedProcess[str]) -> list[tuple[int, int, str]]:
    """(line, column, text) of each `FILE:LINE:COLUMN: ...` line that `plan check` printed."""
    found = []
    for line in output(result).splitlines():
        match = re.match(r"^.*?kilde\.yaml:(\d+):(\d+): (.*)$", line)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    return found


def test_shipped_demo_plan_passes_check() -> None:
    result = run_kilde("plan", "check", str(DEMO_PLAN))
    assert result.returncode == 0, output(result)
    plan = load_plan(DEMO_PLAN)
    assert result.stdout.startswith("ok: ")
    assert f"{len(plan.sources)} sources, {len(plan.purposes)} purposes" in result.stdout


def test_sound_plan_passes_check(tmp_path: Path) -> None:
    result = run_kilde("plan", "check", str(write_plan(tmp_path, BASE)))
    assert result.returncode == 0, output(result)
    assert "2 sources, 1 purposes, 1 events, 1 traits" in result.stdout


@pytest.mark.parametrize(
    ("old", "new", "line", "column", "says"),
    [
        pytest.param(
            "  name: Tiny Shop\n",
            "  name: Tiny Shop\n  colour: red\n",
            4,
            3,
            ["company.colour", "unknown key"],
            id="unknown-key",
        ),
        pytest.param(
            "    legal_basis: legitimate_interest",
            "    legal_basis: we_want_it",
            19,
            18,
            ["purposes.0.legal_basis", "consent", "legitimate_interest"],
            id="bad-legal-basis",
        ),
        pytest.param(
            "    purposes: [analytics]\n    retention: 13 months",
            "    purposes: [analytics, upselling]\n    retention: 13 months",
            22,
            27,
            ["events.0.purposes.1", "'upselling' is not declared", "analytics"],
            id="undeclared-purpose",
        ),
        pytest.param(
            'write_keys: ["backend-key-0001"]',
            'write_keys: ["web-key-000001"]',
            15,
            18,
            ["sources.1.write_keys.0", "share a write key"],
            id="duplicate-write-key",
        ),
        pytest.param(
            "        order_id: {type: string}",
            "        order_id: {type: text}",
            28,
            26,
            ["events.0.properties.properties.order_id.type", "not a valid JSON Schema"],
            id="invalid-json-schema",
        ),
        pytest.param(
            "        order_id: {type: string}",
            '        order_id: {type: string, pattern: "[A-Z"}',
            28,
            43,
            ["events.0.properties.properties.order_id.pattern", "regex"],
            id="schema-with-bad-regex",
        ),
        pytest.param(
            "        order_id: {type: string}",
            '        order_id: {$ref: "https://schemas.invalid/order-id.json"}',
            25,
            7,
            ["events.0.properties", "another document is not supported"],
            id="schema-with-remote-ref",
        ),
        pytest.param(
            "  name: Tiny Shop\n",
            '  name: Tiny Shop\n  primary_color: "red; } body { display: none"\n',
            4,
            18,
            ["company.primary_color", "hex colour such as #2f6f5e"],
            id="primary-color-not-a-colour",
        ),
        pytest.param(
            "    retention: 13 months",
            "    retention: forever",
            23,
            16,
            ["events.0.retention", "not understood", "90 days"],
            id="bad-event-retention",
        ),
        pytest.param(
            "    retention: 2 years",
            "    retention: 3 fortnights",
            34,
            16,
            ["traits.0.retention", "not understood"],
            id="bad-trait-retention",
        ),
        pytest.param(
            'write_keys: ["backend-key-0001"]',
            'write_keys: ["${TINY_SHOP_SECRET_KEY}"]',
            15,
            18,
            ["TINY_SHOP_SECRET_KEY is not set", "${TINY_SHOP_SECRET_KEY:-default}"],
            id="missing-variable",
        ),
        pytest.param(
            "    kind: server\n",
            "    kind: server\n    kind: app\n",
            13,
            5,
            ["sources.1.kind", "appears twice"],
            id="key-twice",
        ),
        pytest.param(
            "    pii: direct\n",
            "    pii: very\n",
            32,
            10,
            ["traits.0.pii", "direct"],
            id="bad-pii-class",
        ),
    ],
)
def test_check_prints_each_problem_with_line_and_column(
    tmp_path: Path, old: str, new: str, line: int, column: int, says: list[str]
) -> None:
    assert old in BASE
    path = write_plan(tmp_path, BASE.replace(old, new, 1))
    result = run_kilde("plan", "check", str(path))
    assert result.returncode != 0
    found = problems(result)
    assert len(found) == 1, output(result)
    assert found[0][:2] == (line, column), output(result)
    for text in says:
        assert text in found[0][2], output(result)
    assert "1 problem(s) found" in output(result)


def test_check_reports_every_problem_in_one_run(tmp_path: Path) -> None:
    broken = (
        BASE.replace("  name: Tiny Shop\n", "  name: Tiny Shop\n  colour: red\n")
        .replace("legal_basis: legitimate_interest", "legal_basis: we_want_it")
        .replace('write_keys: ["backend-key-0001"]', 'write_keys: ["web-key-000001"]')
        .replace("purposes: [analytics]\n    retention: 13", "purposes: [sales]\n    retention: 13")
        .replace("{type: string}", "{type: text}")
        .replace("retention: 2 years", "retention: ${TINY_SHOP_RETENTION}")
    )
    result = run_kilde("plan", "check", str(write_plan(tmp_path, broken)))
    assert result.returncode != 0
    found = problems(result)
    paths = [text.split(":")[0] for _, _, text in found]
    assert paths == [
        "company.colour",
        "sources.1.write_keys.0",
        "purposes.0.legal_basis",
        "events.0.purposes.0",
        "events.0.properties.properties.order_id.type",
        "traits.0.retention",
    ], output(result)
    assert "TINY_SHOP_RETENTION is not set" in found[-1][2]
    assert [line for line, _, _ in found] == sorted(line for line, _, _ in found)
    assert f"{len(found)} problem(s) found" in output(result)


def test_check_reports_yaml_syntax_error_with_position(tmp_path: Path) -> None:
    text = BASE.replace("    tool: k.js\n", "    tool: [k.js\n")
    result = run_kilde("plan", "check", str(write_plan(tmp_path, text)))
    assert result.returncode != 0
    found = problems(result)
    assert len(found) == 1, output(result)
    line, column, message = found[0]
    assert "not valid YAML" in message
    assert 8 <= line <= 10 and column >= 1


def test_check_of_a_missing_file_says_how_to_get_one(tmp_path: Path) -> None:
    result = run_kilde("plan", "check", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0
    assert "no plan file" in output(result)
    assert "kilde plan init" in output(result)


def test_variables_are_substituted_and_defaults_apply(tmp_path: Path) -> None:
    text = BASE.replace('["web-key-000001"]', '["${TINY_WEB_KEY}"]').replace(
        '["backend-key-0001"]', '["${TINY_BACKEND_KEY:-backend-fallback-key}"]'
    )
    path = write_plan(tmp_path, text)
    # The check sees the variable's value: with it set the plan is sound.
    assert run_kilde("plan", "check", str(path)).returncode != 0
    checked = run_kilde("plan", "check", str(path), env={"TINY_WEB_KEY": "from-the-environment"})
    assert checked.returncode == 0, checked.stderr

    server = start_server(tmp_path / "data", path, TINY_WEB_KEY="from-the-environment")
    try:
        event = {"userId": "u-1", "event": "Order Completed", "properties": {"order_id": "o-1"}}
        by_env = httpx.post(f"{server.url}/v1/track", json=event, auth=("from-the-environment", ""))
        assert by_env.status_code == 200, by_env.text
        by_default = httpx.post(
            f"{server.url}/v1/track",
            json={**event, "messageId": "m-default"},
            auth=("backend-fallback-key", ""),
        )
        assert by_default.status_code == 200, by_default.text
        literal = httpx.post(f"{server.url}/v1/track", json=event, auth=("${TINY_WEB_KEY}", ""))
        assert literal.status_code == 401
        listed = httpx.get(f"{server.url}/api/events", headers=server.admin).json()["events"]
        assert sorted(e["source"] for e in listed) == ["backend", "web"]
    finally:
        server.stop()


def test_environment_overrides_the_demo_plans_write_key(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", DEMO_PLAN, KILDE_WEB_WRITE_KEY="deployment-web-key-42")
    try:
        page = {"anonymousId": "a-1", "name": "Home"}
        assert (
            httpx.post(
                f"{server.url}/v1/page", json=page, auth=("deployment-web-key-42", "")
            ).status_code
            == 200
        )
        old = httpx.post(f"{server.url}/v1/page", json=page, auth=("demo-web-write-key", ""))
        assert old.status_code == 401
        assert old.json()["error"] == "unknown_write_key"
    finally:
        server.stop()


def test_plan_show_summarises_the_plan(kilde_server: Server) -> None:
    result = kilde_server.kilde("plan", "show")
    out = result.stdout
    assert "Fjord & Fell" in out
    for text in (
        "grow-repeat-purchases",
        "web",
        "backend",
        "app",
        "warn",
        "marketing_email",
        "consent",
        "legitimate_interest",
        "Order Completed",
        "order_id,",
        "5 years",
        "newsletter",
    ):
        assert text in out, text
    # Write keys are secrets: show says how many, never which.
    assert "demo-web-write-key" not in out


def test_plan_show_of_a_broken_plan_fails_with_the_problem(tmp_path: Path) -> None:
    path = write_plan(tmp_path, BASE.replace("kind: web", "kind: website"))
    result = run_kilde("plan", "show", "--plan", str(path))
    assert result.returncode != 0
    assert "sources.0.kind" in output(result)
    assert "line 6" in output(result)


def test_serve_refuses_a_broken_plan_and_says_where(tmp_path: Path) -> None:
    path = write_plan(tmp_path, BASE.replace("kind: web", "kind: website"))
    result = run_kilde(
        "serve",
        "--port",
        str(free_port()),
        env={"KILDE_DATA": str(tmp_path / "data"), "KILDE_PLAN": str(path)},
    )
    assert result.returncode != 0
    assert "line 6, column 11" in output(result)
    assert "kilde plan check" in output(result)
