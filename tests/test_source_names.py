"""Names in the source that collide, and paths it cites that are not in the repository.

Static checks: the modules are read, never imported. Each guards a trap that was once in the
code: a bench script named like the package it imports, two classes of one name, a function
named like a standard-library module, a comment pointing at notes kept outside the repository.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "registry_trio"

# A relative path with a directory and a file suffix, not part of a URL or a longer path.
CITED_PATH = re.compile(
    r"(?<![\w/:.~-])(?:\.\./)*[\w.-]+(?:/[\w.-]+)+\.(?:md|py|toml|json|txt|cfg|ini|ya?ml|sh)\b"
)


def top_level_definitions(
    path: Path,
) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]


def test_no_bench_script_hides_a_module_it_could_import() -> None:
    # ``python bench/<script>.py`` puts bench/ first on sys.path: a script named like a
    # standard-library module or an installed package would be imported in its place.
    installed = importlib.metadata.packages_distributions()
    scripts = sorted((REPO / "bench").glob("*.py"))
    assert scripts
    clashes = [
        script.name
        for script in scripts
        if script.stem in sys.stdlib_module_names or script.stem in installed
    ]
    assert clashes == [], f"bench scripts named like an importable module: {clashes}"


def test_every_class_name_is_used_once() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in top_level_definitions(path):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(REPO)))
    assert len(where) > 10
    repeated = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert repeated == {}, f"classes of the same name: {repeated}"


def test_no_function_or_class_is_named_like_a_standard_library_module() -> None:
    # ``from .x import secrets`` reads as the standard library's module to anyone who meets it.
    clashes = [
        f"{path.relative_to(REPO)}: {node.name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in top_level_definitions(path)
        if node.name in sys.stdlib_module_names
    ]
    assert clashes == [], f"definitions named like a standard-library module: {clashes}"


def _in_repository(source: Path, path: str) -> bool:
    """From the repository root, or from the citing file's folder (a Markdown link), inside."""
    beside = (REPO / source).parent / path
    return (REPO / path).exists() or (beside.resolve().is_relative_to(REPO) and beside.exists())


def test_every_path_the_code_and_docs_cite_is_in_the_repository() -> None:
    sources = [REPO / "README.md", REPO / "SECURITY.md", REPO / "Makefile"]
    sources.append(REPO / "examples" / "README.md")
    docs = sorted((REPO / "docs").glob("*.md"))
    assert docs, "docs/*.md: none found"
    sources += docs
    for directory in ("registry_trio", "bench", "tests"):
        sources += sorted((REPO / directory).rglob("*.py"))
    cited = {
        (source.relative_to(REPO), match)
        for source in sources
        for match in CITED_PATH.findall(source.read_text())
    }
    assert len(cited) > 10
    missing = sorted(
        f"{source}: {path}" for source, path in cited if not _in_repository(source, path)
    )
    assert missing == [], f"paths that are not in the repository: {missing}"
