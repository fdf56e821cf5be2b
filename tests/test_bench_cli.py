"""The bench/ scripts keep working: their options parse, and a tiny run of each passes.

The scripts are run as subprocesses with this interpreter, exactly as ``make bench`` runs
them, each starting its own registry-trio subprocess; the figures are read from ``--json``.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
RUN_TIMEOUT = 180


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=BENCH.parent,
    )


def run_json(name: str, *args: str) -> dict[str, Any]:
    result = run_script(name, *args, "--json")
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    """bench/common.py, push.py and bigblob.py imported as the scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCH))
    modules = {}
    for name in ("push", "bigblob"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Dataclasses look their module up in sys.modules while the class is built.
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        modules[name] = module
    modules["common"] = sys.modules["common"]
    yield modules
    sys.modules.pop("common", None)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("push.py", ["--url", "--count", "--concurrency", "--json", "--repos", "images/s"]),
        ("bigblob.py", ["--url", "--size", "--upload", "--goal", "--json", "VmHWM", "PASS"]),
    ],
)
def test_help_describes_the_script(script: str, expected: list[str]) -> None:
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "What it measures" in result.stdout
    assert "How to run" in result.stdout
    for word in expected:
        assert word in result.stdout, f"{word!r} missing from {script} --help"


def test_push_options(bench_modules: dict[str, ModuleType]) -> None:
    parser = bench_modules["push"].build_parser()
    defaults = parser.parse_args([])
    assert (defaults.count, defaults.concurrency, defaults.url, defaults.json) == (
        500,
        8,
        None,
        False,
    )
    args = parser.parse_args(["-n", "4", "-c", "2", "--url", "http://127.0.0.1:5000", "--json"])
    assert (args.count, args.concurrency, args.url, args.json) == (
        4,
        2,
        "http://127.0.0.1:5000",
        True,
    )


@pytest.mark.parametrize(
    "bad", [["-n", "0"], ["-c", "-1"], ["--count", "many"], ["--repos", "0"], ["--nope"]]
)
def test_push_rejects_bad_options(bench_modules: dict[str, ModuleType], bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_modules["push"].build_parser().parse_args(bad)
    assert exc.value.code == 2


def test_bigblob_options(bench_modules: dict[str, ModuleType]) -> None:
    parser = bench_modules["bigblob"].build_parser()
    defaults = parser.parse_args([])
    assert (defaults.size, defaults.upload, defaults.goal) == (1 << 30, "post", 150)
    args = parser.parse_args(["--size", "2MiB", "--upload", "patch", "--chunk-size", "512KiB"])
    assert (args.size, args.upload, args.chunk_size) == (2 << 20, "patch", 512 << 10)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--size", "two megs"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("2MiB", 2 << 20), ("1GiB", 1 << 30), ("1G", 1 << 30), ("100MB", 10**8)],
)
def test_parse_size(bench_modules: dict[str, ModuleType], text: str, size: int) -> None:
    assert bench_modules["common"].parse_size(text) == size


def test_percentiles(bench_modules: dict[str, ModuleType]) -> None:
    percentiles = bench_modules["common"].percentiles
    assert percentiles([]) == {}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    result = percentiles(range(1, 102))
    assert (result["p50"], result["p95"], result["p99"]) == pytest.approx((51, 96, 100))


def test_generated_blob_ranges_join_up(bench_modules: dict[str, ModuleType]) -> None:
    """PATCH chunks regenerate their slice of the blob; the slices must equal the whole."""
    chunks = bench_modules["bigblob"].chunks
    size = 3 * (1 << 20) + 12345
    whole = b"".join(chunks(size, 7))
    assert len(whole) == size
    cut = 1_500_000
    assert b"".join(chunks(cut, 7)) + b"".join(chunks(size, 7, start=cut)) == whole
    assert whole != b"".join(chunks(size, 8))


# -- tiny end-to-end runs --------------------------------------------------------------------


def test_push_tiny_run() -> None:
    doc = run_json("push.py", "-n", "4", "-c", "2")
    assert doc["benchmark"] == "push"
    assert doc["settings"]["count"] == 4 and doc["settings"]["concurrency"] == 2
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["sqlite"]
    for phase in ("push", "pull"):
        figures = doc[phase]
        assert figures["images_per_s"] > 0 and figures["mb_per_s"] > 0
        assert figures["server_cpu_ms_per_image"] >= 0
    expected = {
        "push": {"blob HEAD": 8, "blob upload": 8, "manifest PUT": 4},
        "pull": {"manifest GET": 4, "blob GET": 8},
    }
    for phase, counts in expected.items():
        latency = doc[phase]["latency_ms"]
        assert {kind: row["count"] for kind, row in latency.items()} == counts
        for row in latency.values():
            assert 0 < row["p50"] <= row["p95"] <= row["p99"] <= row["max"]


@pytest.mark.parametrize(
    "upload", [["--upload", "post"], ["--upload", "patch", "--chunk-size", "768KiB"]]
)
def test_bigblob_tiny_run(upload: list[str]) -> None:
    doc = run_json("bigblob.py", "--size", "2MiB", *upload)
    assert doc["benchmark"] == "bigblob"
    assert doc["settings"]["size"] == 2 << 20
    assert doc["digest"].startswith("sha256:")
    for phase in ("push", "pull"):
        assert doc[phase]["mb_per_s"] > 0
        assert doc[phase]["peak_rss_bytes"] > 0
    assert doc["verdict"] == "PASS"


def test_unreachable_registry_fails_cleanly() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        result = run_script("push.py", "--url", f"http://127.0.0.1:{port}", "-n", "1", "--json")
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert result.stdout == ""


def test_events_tiny_run() -> None:
    doc = run_json(
        "events.py",
        "--enqueue",
        "300",
        "--appenders",
        "16",
        "--baseline",
        "50",
        "--backlog",
        "400",
        "--unbatched-backlog",
        "50",
        "--slow-events",
        "40",
        "--push-count",
        "4",
        "--push-rounds",
        "1",
        "-c",
        "2",
    )
    results = doc["results"]
    assert results["enqueue"]["ours"]["events"] == 300
    assert results["enqueue"]["persist_queue"]["events_per_s"] > 0
    assert results["drain"]["batched"]["events"] == 400
    # The receiver counted every drained event: the rate is of real deliveries.
    assert results["drain"]["receiver_counted"] == 400 + 50
    assert results["push"]["events_on_images_per_s"] > 0
    assert results["slow"]["batched"]["events"] == 40


def test_auth_tiny_run() -> None:
    doc = run_json("auth.py", "-n", "4", "-c", "2", "--rounds", "1", "--bcrypt-rounds", "4")
    results = doc["results"]
    assert results["anonymous_images_per_s"] > 0 and results["authenticated_images_per_s"] > 0
    assert results["first_login_ms"] > 0
