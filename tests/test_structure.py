"""The package's shape, read statically with ``ast``: no import circles, lower layers that do
not reach up, nobody's private names taken, every third-party import declared.

Imports inside functions and under ``TYPE_CHECKING`` count: they defer a circle, not remove it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from registry_trio.config import EVENT_ACTIONS
from registry_trio.events.model import Action

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "registry_trio"

# importer (a package or module) -> what it must not import. The dependencies go one way:
# config is read by everything and reads nothing of the registry; storage knows neither HTTP,
# nor events, nor who asks; events know nothing of HTTP; auth stores nothing.
FORBIDDEN = {
    "registry_trio.config": (
        "registry_trio.api",
        "registry_trio.auth",
        "registry_trio.events",
        "registry_trio.storage",
    ),
    "registry_trio.storage": ("registry_trio.api", "registry_trio.auth", "registry_trio.events"),
    "registry_trio.events": ("registry_trio.api",),
    "registry_trio.auth": ("registry_trio.storage",),
}


@dataclass(frozen=True)
class Import:
    importer: str
    # A module of the package, or the top-level name of anything else (``jwt``, ``os``).
    target: str
    # The name taken from ``target`` by ``from target import name``; None for a module.
    name: str | None
    where: str

    @property
    def internal(self) -> bool:
        return self.target == PACKAGE or self.target.startswith(f"{PACKAGE}.")

    def __str__(self) -> str:
        taken = f" ({self.name})" if self.name else ""
        return f"{self.where}: {self.importer} imports {self.target}{taken}"


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _package_of(module: str) -> str:
    """The package a module's relative imports start from."""
    return module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports_of(module: str) -> Iterator[Import]:
    path = modules()[module]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _module_import(module, alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module).split(".")
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules():  # ``from package import module``
                    yield Import(module, submodule, None, where)
                elif base == PACKAGE or base.startswith(f"{PACKAGE}."):
                    yield Import(module, base, alias.name, where)
                else:
                    yield _module_import(module, base, where)


def _module_import(module: str, target: str, where: str) -> Import:
    internal = target == PACKAGE or target.startswith(f"{PACKAGE}.")
    return Import(module, target if internal else target.partition(".")[0], None, where)


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(i for module in modules() for i in _imports_of(module))


def internal_imports() -> list[Import]:
    return [i for i in all_imports() if i.internal and i.target != i.importer]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return circles


def _describe(circle: list[str], imports: list[Import]) -> str:
    edges = {
        f"{i.where}: {i.importer} imports {i.target}"
        for i in imports
        if i.importer in circle and i.target in circle
    }
    return f"circle of {', '.join(circle)}:\n  " + "\n  ".join(sorted(edges))


def test_no_import_circles():
    found = {(i.importer, i.target, i.name) for i in internal_imports()}
    # The reader sees what circles hide in: imports in functions, relative ones, modules
    # imported from their package.
    assert ("registry_trio.cli", "registry_trio.server", "serve") in found
    assert ("registry_trio.storage.gc", "registry_trio.oci", "parse_digest") in found
    assert ("registry_trio.cli", "registry_trio.events_cli", None) in found

    imports = internal_imports()
    edges: dict[str, set[str]] = {}
    for i in imports:
        edges.setdefault(i.importer, set()).add(i.target)
    circles = _circles(edges)
    assert not circles, "\n".join(_describe(circle, imports) for circle in circles)


def test_lower_layers_do_not_import_higher_ones():
    wrong = [
        str(found)
        for found in internal_imports()
        for importer, forbidden in FORBIDDEN.items()
        if _within(found.importer, importer)
        and any(_within(found.target, layer) for layer in forbidden)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_private_module_or_name_is_taken_from_elsewhere():
    # A ``_module`` is its package's own; a ``_name`` is its module's own.
    wrong = []
    for found in internal_imports():
        private_parts = [part for part in found.target.split(".") if _is_private(part)]
        if private_parts:
            owner = found.target.partition(f".{private_parts[0]}")[0]
            if not _within(found.importer, owner):
                wrong.append(f"{found}: a private module of {owner}")
        if found.name is not None and _is_private(found.name):
            wrong.append(f"{found}: a private name")
    assert not wrong, "\n".join(wrong)


def test_gc_reads_no_private_field_of_the_store():
    # GC works through FilesystemStorage's public interface (storage.layout), not its insides.
    path = modules()["registry_trio.storage.gc"]
    wrong = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
        and _is_private(node.attr)
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert not wrong, "\n".join(wrong)


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


@cache
def declared_dependencies() -> frozenset[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = (re.match(r"[A-Za-z0-9._-]+", spec) for spec in project["dependencies"])
    return frozenset(_normalise(match.group()) for match in names if match)


def imported_distributions() -> dict[str, set[str]]:
    """Distribution -> the top-level names the package imports from it (stdlib left out)."""
    providers = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for i in all_imports():
        if i.internal or i.target in sys.stdlib_module_names or i.target == "__future__":
            continue
        for distribution in providers.get(i.target, [f"<no installed distribution: {i.target}>"]):
            found.setdefault(_normalise(distribution), set()).add(i.target)
    return found


def test_the_declared_dependencies_are_what_the_package_imports():
    imported = imported_distributions()
    # Third-party imports are reduced to the distribution that installs them.
    assert imported["pyjwt"] == {"jwt"} and imported["nats-py"] == {"nats"}
    undeclared = {
        name: sorted(imported[name]) for name in imported.keys() - declared_dependencies()
    }
    assert not undeclared, f"imported, not in [project].dependencies: {undeclared}"
    unused = sorted(declared_dependencies() - imported.keys())
    assert not unused, f"in [project].dependencies, imported nowhere: {unused}"


def test_config_knows_the_event_actions_by_name():
    # Config validates filter actions without importing events: the names must not drift.
    assert {str(action) for action in Action} == EVENT_ACTIONS


LONG_MODULE_LINES = 500
LONG_MODULE_REASON = "One module, though long:"


def test_a_long_module_says_why_it_is_one():
    unexplained = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > LONG_MODULE_LINES and LONG_MODULE_REASON not in docstring:
            unexplained.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not unexplained, (
        f"over {LONG_MODULE_LINES} lines: split, or say why at the top "
        f"({LONG_MODULE_REASON!r}): {unexplained}"
    )
