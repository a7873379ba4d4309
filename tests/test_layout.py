"""The package's shape: small modules, imports that only go down, one door to internals."""

from __future__ import annotations

import ast
import pathlib

import pytest

import storage_scheduler

PACKAGE = pathlib.Path(storage_scheduler.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))

#: What each part may import from the package at module level (functions may import
#: upward lazily, e.g. to find a plugin on a server). Listed bottom-up.
ALLOWED: dict[str, set[str]] = {
    "_exceptions": set(),
    "_threads": set(),
    "tokens": set(),
    "progress": set(),
    "config": {"_exceptions"},
    "_protocol": {"tokens"},
    "_compat": {"_protocol"},
    "store": {"_exceptions", "_threads", "config", "progress", "store"},
    "comm": {"_compat", "_protocol", "store"},
    "metrics": {"_compat", "_protocol", "store"},
    "dashboard": {"_compat", "_exceptions", "_protocol"},
    "worker": {
        "_compat",
        "_exceptions",
        "_protocol",
        "comm",
        "config",
        "metrics",
        "store",
        "worker",
    },
    "scheduler": {
        *("_compat", "_exceptions", "_protocol", "_threads", "comm", "config", "dashboard"),
        *("metrics", "scheduler", "store", "tokens", "worker"),
    },
    "enable": {"_exceptions", "_protocol", "config", "scheduler"},
    "preload": {"_protocol", "config", "scheduler", "worker"},
    "cli": {"_exceptions", "_protocol", "config", "progress", "store"},
}


def part_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def module_level_imports(path: pathlib.Path) -> list[str]:
    """Modules imported at module level, outside ``if TYPE_CHECKING:``."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_class_size(path: pathlib.Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= 450, "split the module: one responsibility each"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno is not None
            assert node.end_lineno - node.lineno < 300, f"class {node.name} is over 300 lines"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if p.name != "__init__.py" or p.parent != PACKAGE],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_imports_only_go_down(path: pathlib.Path) -> None:
    part = part_of(path)
    used = {
        name.split(".")[1]
        for name in module_level_imports(path)
        if name.startswith("storage_scheduler.") and name.count(".") >= 1
    } - {"__init__"}
    # ``from storage_scheduler import _compat`` names the part in the imported names.
    assert used <= ALLOWED[part] | {part}, f"{part} imports {sorted(used - ALLOWED[part])}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_distributed_only_through_compat(path: pathlib.Path) -> None:
    """Private modules or names of distributed are imported in ``_compat`` alone."""
    if part_of(path) == "_compat":
        return
    private = [
        name
        for name in module_level_imports(path)
        if name.startswith("distributed.") and any(p.startswith("_") for p in name.split("."))
    ]
    assert not private
