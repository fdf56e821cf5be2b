"""The command line itself: what ``registry-trio`` answers before it reads any config."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_version_is_the_installed_distributions():
    result = subprocess.run(
        [sys.executable, "-m", "registry_trio", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"registry-trio {importlib.metadata.version('registry-trio')}\n"
