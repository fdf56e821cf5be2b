"""The Makefile's install logic, read with ``make -n`` (what it would run) in a scratch copy.

``make run`` installs what serving needs and nothing else; ``make test`` adds the test and
bench extras, and either order in one checkout installs each thing once. The stamps' times
are set by hand, so the states are exact without installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVING_INSTALL = "pip install --quiet -e .\n"
FULL_INSTALL = "pip install --quiet -e '.[test,bench]'"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    os.utime(tmp_path / "pyproject.toml", (1000, 1000))
    return tmp_path


def would_run(checkout: Path, target: str) -> str:
    assert shutil.which("make"), "make is not installed"
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def installed(checkout: Path, *stamps: str) -> None:
    """A virtualenv with these stamps, newer than pyproject.toml."""
    python = checkout / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.touch()
    for stamp in stamps:
        (checkout / ".venv" / stamp).touch()
        os.utime(checkout / ".venv" / stamp, (2000, 2000))


def test_make_run_on_a_fresh_clone_installs_only_what_serving_needs(checkout):
    commands = would_run(checkout, "run")
    assert "-m venv .venv" in commands
    assert SERVING_INSTALL in commands
    assert "[test" not in commands and "bench]" not in commands
    assert "registry-trio serve" in commands


def test_make_test_after_make_run_adds_the_extras_and_make_run_after_it_installs_nothing(
    checkout,
):
    installed(checkout, ".installed-serve")  # what make run leaves
    assert "pip install" not in would_run(checkout, "run")
    for target in ("test", "lint", "bench", "install"):
        assert FULL_INSTALL in would_run(checkout, target), target

    installed(checkout, ".installed-serve", ".installed-dev")  # what make test leaves
    for target in ("run", "test"):
        assert "pip install" not in would_run(checkout, target), target


def test_a_changed_pyproject_installs_again(checkout):
    installed(checkout, ".installed-serve", ".installed-dev")
    os.utime(checkout / "pyproject.toml", (3000, 3000))
    assert SERVING_INSTALL in would_run(checkout, "run")
    assert FULL_INSTALL in would_run(checkout, "test")
