"""The examples in docs/ run as written, against a real server.

Markers in the Markdown:
- `<!-- file: NAME -->` before a code block writes the block to NAME in the working directory;
- `<!-- run -->` before a `console` block runs each `$ command` and compares its output with the
  lines below it (`...` matches anything);
- `<!-- python -->` before a `python` block runs it; its own assertions are checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, BACKEND_KEY, ROOT, Server, start_server

DOCS = ROOT / "docs"
BLOCK = re.compile(r"<!-- (file: [^>]+|run|python) -->\s*\n```[a-z]*\n(.*?)\n```", re.S)


def doc_examples(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(page.read_text())]


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if doc_examples(p))


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("docs") / "data")
    yield server
    server.stop()


def _matches(expected: str, actual: str) -> bool:
    pattern = re.escape(expected.strip()).replace(re.escape("..."), ".*")
    return re.fullmatch(pattern, actual.strip(), re.S) is not None


def _run_console(block: str, cwd: Path, env: dict[str, str]) -> None:
    commands: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    for command, expected_lines in commands:
        result = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        actual = result.stdout + result.stderr
        expected = "\n".join(expected_lines)
        assert _matches(expected, actual), f"$ {command}\nexpected:\n{expected}\ngot:\n{actual}"


# Pages run in an order where later examples may rely on data that earlier ones sent.
ORDER = ["collection-plan", "collecting-events", "dead-letters", "admin-api"]


def _order(page: Path) -> tuple[int, str]:
    return (ORDER.index(page.stem) if page.stem in ORDER else len(ORDER), page.stem)


@pytest.mark.parametrize("page", sorted(pages(), key=_order), ids=lambda p: p.name)
def test_doc_examples_run_as_written(page: Path, docs_server: Server, tmp_path: Path) -> None:
    env = {
        **docs_server.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KILDE_URL": docs_server.url,
        "KILDE_WRITE_KEY": BACKEND_KEY,
        "KILDE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    for kind, block in doc_examples(page):
        if kind.startswith("file: "):
            (tmp_path / kind.removeprefix("file: ").strip()).write_text(block + "\n")
        elif kind == "run":
            _run_console(block, tmp_path, env)
        else:
            result = subprocess.run(
                [sys.executable, "-c", block],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, f"{page.name} example failed:\n{result.stderr}"
