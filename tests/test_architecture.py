"""The shape rules of the package and its dev tools, checked on the source (DESIGN.md,
"Architecture").

- ``core/`` is sans-I/O: it imports the standard library and itself, nothing else,
  and reads no clock (time is passed in).
- No module imports another module's private names, or reaches into another
  object's private attributes; slixmpp internals the plugin has to touch are
  listed below, each with the reason.
- The library and its test kit never import the dev tools (``devtools/``: benchmark,
  chaos runs, demo, the examples' server), which stay out of the wheel.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xmpp_sm_tracker"
CORE = PACKAGE / "core"
DEVTOOLS = ROOT / "devtools"

#: Private names of slixmpp that the plugin must use, with why. Nothing of ours.
SLIXMPP_PRIVATE = {
    # xep_0198's handlers are taken over on plugin_init and given back on plugin_end.
    "_handle_sm_feature",
}
#: The standard library's own private-looking public names.
STDLIB_PRIVATE = {"_exit"}


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


#: Every module held to the rules below: the library, its test kit and the dev tools.
ALL_MODULES = _modules(PACKAGE) + _modules(DEVTOOLS)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: p.name)
def test_core_imports_only_the_standard_library_and_itself(path: Path) -> None:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level > 0:  # relative: must stay inside core/
                assert node.level == 1, f"{path.name}: imports from outside core/"
                continue
            roots = [node.module or ""]
        elif isinstance(node, ast.Import):
            roots = [alias.name for alias in node.names]
        else:
            continue
        for name in roots:
            top = name.split(".", 1)[0]
            assert top in sys.stdlib_module_names, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: p.name)
def test_core_reads_no_clock(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    for clock in ("time.time", "time.monotonic", "datetime.now", "loop.time"):
        assert clock not in source, f"{path.name} reads the clock ({clock}): pass time in"


@pytest.mark.parametrize("path", ALL_MODULES, ids=_rel)
def test_no_module_imports_private_names(path: Path) -> None:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            private = [a.name for a in node.names if _is_private(a.name)]
            assert not private, f"{path.name} imports private {private} from {node.module}"


def _defined_here(tree: ast.Module) -> set[str]:
    """Private names a module defines itself (its classes may share them)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    names |= {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("_")
    }  # __slots__ entries
    return names


@pytest.mark.parametrize("path", ALL_MODULES, ids=_rel)
def test_no_module_reaches_into_private_attributes(path: Path) -> None:
    offenders = []
    tree = _tree(path)
    own = _defined_here(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue  # its own
        if node.attr in own or node.attr in SLIXMPP_PRIVATE | STDLIB_PRIVATE:
            continue
        offenders.append(f"line {node.lineno}: .{node.attr}")
    assert not offenders, f"{path.name} touches private names: {offenders}"


#: Modules over the size limit, with why: dev tools outside the wheel (issue 17), each
#: one long script of measurements or fault schedules that scripts/ runs.
OVERSIZED = {"devtools/bench.py", "devtools/chaos.py"}


@pytest.mark.parametrize("path", ALL_MODULES, ids=_rel)
def test_modules_and_classes_stay_small(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").count("\n")
    if _rel(path) not in OVERSIZED:
        assert lines <= 600, f"{path.name} has {lines} lines (at most 600)"
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
            size = node.end_lineno - node.lineno + 1
            if _rel(path) not in OVERSIZED:
                assert size <= 400, f"{path.name}: class {node.name} has {size} lines"


def _imported_roots(tree: ast.Module) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".", 1)[0])
        elif isinstance(node, ast.Import):
            roots |= {alias.name.split(".", 1)[0] for alias in node.names}
    return roots


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=_rel)
def test_the_package_never_imports_the_dev_tools(path: Path) -> None:
    assert "devtools" not in _imported_roots(_tree(path)), f"{_rel(path)} imports devtools"


#: The only modules of the package that may import pytest (the ``testing`` extra).
NEEDS_PYTEST = {"xmpp_sm_tracker/testing/pytest_plugin.py"}


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=_rel)
def test_only_the_pytest_plugin_imports_pytest(path: Path) -> None:
    roots = _imported_roots(_tree(path)) & {"pytest", "pytest_asyncio", "hypothesis"}
    if _rel(path) not in NEEDS_PYTEST:
        assert not roots, f"{_rel(path)} imports {roots}: only the pytest plugin may"
