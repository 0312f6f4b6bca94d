"""Every Python block in docs/ runs (against each test server); README blocks compile."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from xmpp_sm_tracker.testing import LocalXMPPServer
from xmpp_sm_tracker.testing.client import PASSWORD

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def test_every_docs_page_has_code_to_run() -> None:
    assert {p.name for p in DOCS} >= {
        "events.md",
        "persistence.md",
        "reliability.md",
        "migration.md",
        "testing.md",
    }
    for page in DOCS:
        assert blocks(page), f"{page.name} has no python block"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
async def test_docs_page_blocks_run(
    page: Path, server: LocalXMPPServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    namespace: dict[str, object] = {
        "DSN": request.getfixturevalue("postgres_dsn"),  # the session's PostgreSQL
        "SERVER": server.address,
        "KIND": server.kind,
        "PASSWORD": PASSWORD,
        "TMP": tmp_path,
    }
    for source in blocks(page):
        code = compile(source, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            await result


def test_testing_page_shows_the_example_that_runs() -> None:
    example = (ROOT / "tests" / "test_testkit_example.py").read_text(encoding="utf-8")
    shown = blocks(ROOT / "docs" / "testing.md")[1]
    assert shown.strip() in example


def test_readme_blocks_compile() -> None:
    for source in blocks(ROOT / "README.md"):
        compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
