"""The package's imports follow its directions: no cycle, and no arrow against them.

Read from the source with :mod:`ast`, every import counts, those inside functions too
(a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "xo_webhooks"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Imported by every direction; import none of them.
SHARED = {
    "_version", "_text", "_urls", "_sometimes", "_streams", "_trace", "errors", "config",
    "schema", "signing",
}  # fmt: skip
#: What each part may import, besides itself and the shared pieces.
ALLOWED = {
    "shared": set(),
    "request": {"sending"},
    "sending": set(),
    "receiving": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """``shared``, ``request``, ``sending``, ``receiving``, or ``None`` for the public
    entry points (the package, cli, demo, testing...), which may import anything."""
    inner = module.split(".")[1:]
    if not inner:
        return None
    if inner[0] in ALLOWED:
        return inner[0]
    return "shared" if inner[0] in SHARED else None


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> set[str]:
    """The package's modules that the module at *path* imports."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # `from .. import signing` imports a module; `from .x import name` its module.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    found.discard(module)
    return found


MODULES = {module_name(p) for p in ROOT.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def test_the_graph_was_read():
    """A check that finds nothing because it read nothing would pass: it must not."""
    assert f"{PACKAGE}.request.middleware" in GRAPH
    assert f"{PACKAGE}.sending.dispatcher" in GRAPH[f"{PACKAGE}.request.middleware"]
    assert f"{PACKAGE}.sending.celery_publisher" in GRAPH[f"{PACKAGE}.sending.dispatcher"]  # lazy
    assert f"{PACKAGE}.signing" in GRAPH[f"{PACKAGE}.sending.delivery"]  # `from .. import x`


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_arrows_follow_the_directions(module):
    part = part_of(module)
    if part is None:
        return
    allowed = {part, "shared", *ALLOWED[part]}
    wrong = sorted(t for t in GRAPH[module] if part_of(t) not in allowed)
    assert not wrong, f"{module} ({part}) imports {wrong}"


def test_no_import_cycle():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(GRAPH.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


@pytest.mark.parametrize(
    "path",
    [
        "xo_webhooks",
        "xo_webhooks.schema",
        "xo_webhooks.signing",
        "xo_webhooks.errors",
        "xo_webhooks.receiver",
        "xo_webhooks.testing",
        "xo_webhooks.pytest_plugin",
        "xo_webhooks.celery",
        "xo_webhooks.cli",
        "xo_webhooks.demo",
        "xo_webhooks.__main__",
    ],
)
def test_every_documented_import_path_still_works(path):
    module = importlib.import_module(path)
    for name in getattr(module, "__all__", ()):
        assert hasattr(module, name), f"{path}.__all__ names {name!r}, which is missing"


@pytest.mark.parametrize("part", ["request", "sending", "receiving"])
def test_the_directions_are_internal(part):
    """Their ``__init__`` exports nothing: the public names live at the top."""
    assert importlib.import_module(f"{PACKAGE}.{part}").__all__ == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if "celery" not in m))
def test_each_logger_is_named_after_its_module(module):
    """The README's troubleshooting table names loggers by module: keep it true."""
    loaded = importlib.import_module(module)
    logger = getattr(loaded, "logger", None)
    if logger is not None:
        assert logger.name == module


def test_the_celery_modules_log_under_their_names_too():
    pytest.importorskip("celery", reason="the celery extra is not installed")
    loaded = importlib.import_module(f"{PACKAGE}.sending.celery")
    assert loaded.logger.name == f"{PACKAGE}.sending.celery"
