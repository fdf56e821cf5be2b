"""The bench/ scripts keep working: their options parse, and a tiny run of each passes.

The scripts are run as subprocesses with this interpreter, exactly as ``make bench`` runs
them, each starting its own registry-trio subprocess; the figures are read from ``--json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from registry_trio.events import Action, Actor, Event, RequestInfo, Source, Target
from registry_trio.events.formats import encoder_for
from registry_trio.oci import OCI_MANIFEST

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
    """bench/common.py and the scripts, imported as the scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCH))
    modules = {}
    for name in ("push", "bigblob", "crash_soak", "compare", "backlog"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Dataclasses look their module up in sys.modules while the class is built.
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        modules[name] = module
    modules["common"] = sys.modules["common"]
    modules["receiver"] = sys.modules["receiver"]
    yield modules
    for imported in ("common", "push", "receiver", "events"):
        sys.modules.pop(imported, None)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("push.py", ["--url", "--count", "--concurrency", "--json", "--repos", "images/s"]),
        ("bigblob.py", ["--url", "--size", "--upload", "--goal", "--json", "VmHWM", "PASS"]),
        (
            "crash_soak.py",
            ["--kills", "--concurrency", "--min-delay", "--max-delay", "--json", "lost", "kill -9"],
        ),
        (
            "compare.py",
            [
                "--count",
                "--concurrency",
                "--distribution-binary",
                "--pin",
                "--workers",
                "--json",
                "images/s",
                "apt-get install docker-registry",
            ],
        ),
        (
            "backlog.py",
            ["--count", "1000000", "--batch", "cloudevents-batch", "--json", "VmHWM", "250 MB"],
        ),
        (
            "nats_sink.py",
            ["--count", "--js-count", "--hop", "--push-count", "--json", "JetStream queue"],
        ),
    ],
)
def test_help_describes_the_script(script: str, expected: list[str]) -> None:
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "What it measures" in result.stdout
    assert "How to run" in result.stdout
    for word in expected:
        assert word in result.stdout, f"{word!r} missing from {script} --help"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("events.py", "event pipeline"),
        ("auth.py", "htpasswd"),
        ("backlog.py", "outbox"),
        ("crash_soak.py", "kills its own server"),
        ("compare.py", "starts every server itself"),
    ],
)
def test_scripts_that_start_their_own_servers_refuse_url(script: str, reason: str) -> None:
    """--url would be silently ignored there: it is a usage error, and --help says why."""
    result = run_script(script, "--url", "http://127.0.0.1:5000", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--url is not supported" in result.stderr and reason in result.stderr
    help_text = " ".join(run_script(script, "--help").stdout.split())
    assert "--url URL not supported by this script" in help_text
    assert reason in help_text


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


def test_backlog_options(bench_modules: dict[str, ModuleType]) -> None:
    parse = bench_modules["backlog"].parse_args
    defaults = parse([])
    assert (defaults.count, defaults.batch, defaults.goal, defaults.json) == (
        1_000_000,
        1000,
        250,
        False,
    )
    args = parse(["-n", "2000", "--batch", "100", "--fill-chunk", "500", "--json"])
    assert (args.count, args.batch, args.fill_chunk, args.json) == (2000, 100, 500, True)
    for bad in (["-n", "0"], ["--batch", "0"], ["--sample-interval", "0"], ["--count", "lots"]):
        with pytest.raises(SystemExit) as exc:
            parse(bad)
        assert exc.value.code == 2


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


def test_workers_tiny_run() -> None:
    doc = run_json(
        "workers.py", "-n", "4", "-c", "2", "--rounds", "1", "--lag-count", "4", "--workers", "2"
    )
    assert doc["settings"]["workers"] == [1, 2]
    for workers, figures in doc["results"].items():
        assert figures["images_per_s"] > 0 and figures["cpu_ms_per_image"] > 0, workers
        assert figures["commit_ms"] > 0 and figures["errors"] == 0
        assert 0 < figures["lag_ms"]["p50"] <= figures["lag_ms"]["p99"]
    # The 2-worker server's access lines, by worker: shares of one whole, most loaded first
    # (a handful of connections may all land on one worker).
    spread = doc["results"]["2"]["spread"]
    assert 1 <= len(spread) <= 2 and abs(sum(spread) - 1) < 1e-9 and spread == sorted(spread)[::-1]


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


DISTRIBUTION = "/usr/bin/docker-registry"  # the Debian package; .ci/run installs it


@pytest.fixture(params=["registry-trio", "distribution"])
def other_registry(
    request: pytest.FixtureRequest, bench_modules: dict[str, ModuleType]
) -> Iterator[str]:
    """The URL of a registry the script did not start: registry-trio, or Docker distribution
    2.8 (which answers a single POST ?digest= with a session, and changes each session's
    Location with every chunk)."""
    if request.param == "distribution":
        server = bench_modules["compare"].DistributionProcess(DISTRIBUTION)
    else:
        server = bench_modules["common"].ServerProcess()
    with server:
        yield server.url


@pytest.mark.parametrize(
    "upload", [["--upload", "post"], ["--upload", "patch", "--chunk-size", "768KiB"]]
)
def test_bigblob_url_run_against_another_registry(other_registry: str, upload: list[str]) -> None:
    doc = run_json("bigblob.py", "--url", other_registry, "--size", "2MiB", *upload)
    assert doc["digest"].startswith("sha256:")
    for phase in ("push", "pull"):
        assert doc[phase]["mb_per_s"] > 0


def test_push_url_run_against_another_registry(other_registry: str) -> None:
    doc = run_json("push.py", "--url", other_registry, "-n", "4", "-c", "2")
    for phase in ("push", "pull"):
        assert doc[phase]["images_per_s"] > 0


def test_nats_tiny_run() -> None:
    doc = run_json(
        "nats_sink.py", "-n", "500", "--js-count", "200", "--hop", "16", "--no-fsync-run",
        "--push-count", "4", "--goal", "1",
    )  # fmt: skip
    assert doc["benchmark"] == "nats" and doc["goal"]["passed"]
    runs = {r["run"]: r for r in doc["results"]}
    assert runs["core"]["events"] == 500 and runs["core"]["events_per_s"] > 0
    assert runs["jetstream"]["events"] == 200 and runs["jetstream"]["events_per_s"] > 0
    for queue in ("push, SQLite queue", "push, JetStream queue"):
        assert runs[queue]["images"] == 4 and runs[queue]["images_per_s"] > 0


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
        "--history-events",
        "300",
        "--history-rounds",
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
    history = results["history"]
    assert history["events"] == 300 and history["bytes_per_record"] > 0
    assert history["writer_us_per_event_on"] > 0 and history["push_ratio_on_off"] > 0


def test_backlog_tiny_run() -> None:
    doc = run_json("backlog.py", "-n", "2000", "--batch", "250", "--fill-chunk", "300")
    assert doc["benchmark"] == "backlog"
    assert doc["settings"]["count"] == 2000 and doc["settings"]["format"] == "cloudevents-batch"
    assert doc["fill"]["events"] == 2000 and doc["fill"]["events_per_s"] > 0
    drain = doc["drain"]
    # The receiver (another process) counted every event, in batches, and the server then
    # reported nothing still owed to the sink.
    assert drain["receiver_counted"] == 2000
    assert drain["receiver_requests"] >= 2000 // 250
    assert drain["server_pending_after"] == 0
    assert doc["all_drained"] is True
    assert drain["peak_rss_bytes"] > 0 and drain["vmhwm_bytes"] > 0
    assert drain["peak_rss_bytes"] >= drain["rss_at_end_bytes"]
    assert doc["verdict"] == "PASS"


def test_auth_tiny_run() -> None:
    doc = run_json("auth.py", "-n", "4", "-c", "2", "--rounds", "1", "--bcrypt-rounds", "4")
    results = doc["results"]
    assert results["anonymous_images_per_s"] > 0 and results["authenticated_images_per_s"] > 0
    assert results["first_login_ms"] > 0


# -- crash_soak.py and compare.py ------------------------------------------------------------


def test_crash_soak_options(bench_modules: dict[str, ModuleType]) -> None:
    parse = bench_modules["crash_soak"].parse_args
    defaults = parse([])
    assert (defaults.kills, defaults.concurrency, defaults.json) == (20, 8, False)
    assert 0 <= defaults.min_delay <= defaults.max_delay
    assert isinstance(defaults.seed, int)  # drawn, and reported, when not given
    args = parse(["--kills", "3", "-c", "2", "--min-delay", "0", "--max-delay", "0.5", "--json"])
    assert (args.kills, args.concurrency, args.min_delay, args.max_delay, args.json) == (
        3,
        2,
        0.0,
        0.5,
        True,
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--kills", "0"],
        ["--min-delay", "-1"],
        ["--min-delay", "2", "--max-delay", "1"],
        ["--url", "http://127.0.0.1:5000"],
    ],
)
def test_crash_soak_rejects_bad_options(
    bench_modules: dict[str, ModuleType], bad: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_modules["crash_soak"].parse_args(bad)
    assert exc.value.code == 2


def test_crash_soak_analysis_finds_loss_and_bad_duplicates(
    bench_modules: dict[str, ModuleType],
) -> None:
    """The verdict's arithmetic on a hand-made receiver record: it can fail."""
    crash_soak = bench_modules["crash_soak"]

    def push(tag: str) -> dict[str, str]:
        return {"repository": "soak/app-0", "reference": tag, "digest": f"sha256:{tag}"}

    def event(event_id: str, request_id: str, tag: str) -> dict[str, str]:
        return {"id": event_id, "request_id": request_id, **push(tag)}

    soak = SimpleNamespace(acknowledged={"r1": push("a"), "r2": push("b"), "r3": push("c")})
    received = {
        "ids": {"e1": 2, "e2": 1, "e2bis": 1, "e4": 1, "blob": 3},
        "conflicting_ids": ["blob"],
        "manifests": [
            event("e1", "r1", "a"),
            event("e2", "r2", "b"),
            event("e2bis", "r2", "b"),  # the same push under a second id
            event("e4", "r4", "d"),  # committed, but the 2xx was lost to a kill
        ],
    }
    result = crash_soak.analyse(soak, received)
    assert result["acknowledged"] == 3
    assert result["lost"] == 1 and result["lost_examples"][0]["request_id"] == "r3"
    assert result["delivered_unique_ids"] == 5 and result["delivered_copies"] == 8
    assert (result["duplicates"], result["duplicated_ids"]) == (3, 2)
    assert (result["conflicting_duplicates"], result["split_ids"]) == (1, 1)
    assert result["committed_unacknowledged"] == 1
    reasons = crash_soak.failed(result)
    assert len(reasons) == 3 and "1 acknowledged push(es) lost" in reasons

    good = {"ids": {"e1": 2}, "conflicting_ids": [], "manifests": [event("e1", "r1", "a")]}
    result = crash_soak.analyse(SimpleNamespace(acknowledged={"r1": push("a")}), good)
    assert (result["lost"], result["duplicates"]) == (0, 1)
    assert crash_soak.failed(result) == []


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-binary", "cloudevents-batch"])
def test_receiver_records_ids_and_manifest_pushes(
    bench_modules: dict[str, ModuleType], fmt: str
) -> None:
    receiver = bench_modules["receiver"]
    events = [
        Event(
            Action.MANIFEST_PUSHED,
            Target("soak/app", digest="sha256:" + "a" * 64, media_type=OCI_MANIFEST, tag="v1"),
            Source("127.0.0.1:5000", "bench"),
            Actor("alice", "basic"),
            RequestInfo("req-1", "127.0.0.1:1", "127.0.0.1:5000", "PUT", "bench"),
        ),
        Event(
            Action.BLOB_PUSHED,
            Target("soak/app", digest="sha256:" + "b" * 64),
            Source("127.0.0.1:5000", "bench"),
        ),
    ]
    encode = encoder_for(fmt)
    requests = [encode(events, "zotregistry")] if fmt == "cloudevents-batch" else []
    requests += [encode([e], "zotregistry") for e in events if fmt != "cloudevents-batch"]
    record = receiver.Record()
    for headers, body in [*requests, requests[0]]:  # the first request arrives twice
        record.add({k.lower(): v for k, v in headers.items()}, body)
    doc = record.to_json()
    assert set(doc["ids"]) == {events[0].id, events[1].id}
    assert doc["ids"][events[0].id] == 2 and doc["conflicting_ids"] == []
    assert all(isinstance(m.pop("received_at"), float) for m in doc["manifests"])
    assert doc["manifests"] == [
        {
            "id": events[0].id,
            "repository": "soak/app",
            "reference": "v1",
            "digest": "sha256:" + "a" * 64,
            "request_id": "req-1",
        }
    ]


def test_compare_options(bench_modules: dict[str, ModuleType]) -> None:
    parse = bench_modules["compare"].parse_args
    defaults = parse([])
    assert (defaults.count, defaults.concurrency, defaults.layer_size) == (300, 8, 4096)
    assert defaults.distribution_binary == "/usr/bin/docker-registry"
    assert defaults.upload == "post-put"
    args = parse(["-n", "5", "-c", "2", "--distribution-binary", "/opt/registry", "--json"])
    assert (args.count, args.concurrency, args.distribution_binary, args.json) == (
        5,
        2,
        "/opt/registry",
        True,
    )
    for bad in (
        ["-n", "0"],
        ["--upload", "patch"],
        ["--url", "http://127.0.0.1:5000"],
        ["--workers", "0"],
        ["--workers", "two"],
    ):
        with pytest.raises(SystemExit) as exc:
            parse(bad)
        assert exc.value.code == 2


def test_compare_workers_sets_only_http_workers(bench_modules: dict[str, ModuleType]) -> None:
    """--workers N is http.workers N in registry-trio's config; without it, no key at all."""
    compare = bench_modules["compare"]
    defaults = compare.parse_args([])
    assert (defaults.pin, defaults.workers, defaults.server_cpus) == (False, None, None)
    assert compare.trio_http_settings(defaults) == {}
    assert compare.trio_http_settings(compare.parse_args(["--workers", "3"])) == {"workers": 3}


def test_compare_workers_run_and_are_counted() -> None:
    """--workers 2 serves from a supervisor and two workers, whose CPU is counted; without it
    the bench's one process."""
    doc = run_json(
        "compare.py", "-n", "4", "-c", "2", "--workers", "2",
        "--distribution-binary", "/nonexistent",
    )  # fmt: skip
    assert doc["settings"]["trio_http"] == {"workers": 2}
    _check_trio_rows(doc, 4)
    for row in doc["targets"].values():
        assert [r["server_processes"] for r in row["rounds"]] == [3]
    single = run_json("compare.py", "-n", "2", "-c", "2", "--distribution-binary", "/nonexistent")
    for row in single["targets"].values():
        assert [r["server_processes"] for r in row["rounds"]] == [1]


def test_compare_pin_needs_two_cpus() -> None:
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, str(BENCH / "compare.py"), "--pin", "--json"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "--pin needs at least 2 usable CPUs" in result.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs 2 CPUs")
def test_compare_pinned_tiny_run() -> None:
    """Each server ran on the first CPU, the load generator and the receiver on the rest:
    as the kernel reported their affinity while the server ran."""
    first, *rest = sorted(os.sched_getaffinity(0))
    doc = run_json(
        "compare.py", "-n", "4", "-c", "2", "--pin", "--distribution-binary", "/nonexistent"
    )
    assert doc["settings"]["pin"] == {"server": [first], "client": rest}
    _check_trio_rows(doc, 4)
    for name, row in doc["targets"].items():
        (round_,) = row["rounds"]
        assert round_["cpus"]["server"] == [first], name
        assert round_["cpus"]["client"] == rest, name
    events_round = doc["targets"]["registry-trio+events"]["rounds"][0]
    assert events_round["cpus"]["receiver"] == rest


def test_compare_keeps_every_server_s_data_until_the_end_of_the_run(
    bench_modules: dict[str, ModuleType], tmp_path: Path
) -> None:
    """A server stopped with keep_root leaves its directory (compare.py removes them all at
    the end, so one server's removal does not cost the next one CPU); the run leaves none."""
    with bench_modules["common"].ServerProcess(data_dir=str(tmp_path), keep_root=True) as server:
        root = server.root
    assert root is not None and (root / "registry_data").is_dir()
    root_dir = tmp_path / "compare-run"
    root_dir.mkdir()
    doc = run_json(
        "compare.py", "-n", "2", "-c", "2", "--distribution-binary", "/nonexistent",
        "--data-dir", str(root_dir),
    )  # fmt: skip
    assert doc["targets"]["registry-trio"]["images"] == 2
    assert list(root_dir.iterdir()) == []


def test_server_cpu_counts_the_processes_it_started(
    bench_modules: dict[str, ModuleType],
) -> None:
    """A supervisor's CPU per image must include its workers': the CPU of a child that is
    running, and of one that has ended and was waited for."""
    common = bench_modules["common"]
    child = (
        "import sys, time\n"
        "while time.process_time() < 0.3: pass\n"
        "print('burnt', flush=True); sys.stdin.read()\n"
    )
    parent = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}], stdin=subprocess.PIPE,"
        " stdout=subprocess.PIPE, text=True)\n"
        "child.stdout.readline(); print('burnt', flush=True)\n"
        "sys.stdin.readline(); child.stdin.close(); child.wait()\n"
        "print('reaped', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def own_seconds() -> float:
        """The parent's own CPU: utime + stime of /proc/<pid>/stat, without its children."""
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "burnt\n"
        # 0.3 s burnt by the child, counted in clock ticks.
        assert sum(common.cpu_times(proc.pid)) >= own_seconds() + 0.25
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "reaped\n"
        assert sum(common.cpu_times(proc.pid)) >= own_seconds() + 0.25
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_crash_soak_tiny_run() -> None:
    doc = run_json(
        "crash_soak.py",
        *("--kills", "2", "-c", "2", "--min-delay", "0.1", "--max-delay", "0.4"),
        *("--layer-size", "256", "--deadline", "60"),
    )
    assert doc["benchmark"] == "crash_soak" and doc["passed"] is True
    assert doc["kills"] == 2
    assert doc["acknowledged"] > 0
    assert doc["lost"] == 0
    assert doc["conflicting_duplicates"] == 0 and doc["split_ids"] == 0
    # Every acknowledged push's manifest event arrived, plus its blob events.
    assert doc["delivered_manifest_events"] >= doc["acknowledged"]
    assert doc["delivered_unique_ids"] > doc["delivered_manifest_events"]
    assert doc["sink_status"]["pending"] == 0 and doc["sink_status"]["dead"] == 0


def _check_trio_rows(doc: dict[str, Any], images: int) -> None:
    targets = doc["targets"]
    for name in ("registry-trio", "registry-trio+events"):
        row = targets[name]
        assert row["images"] == images and row["images_per_s"] > 0
        assert 0 < row["manifest_put_p50_ms"] <= row["manifest_put_p99_ms"]
        assert row["server_cpu_ms_per_image"] > 0
    # Two blob pushes and a manifest push per image (warm-up included) reached the receiver.
    assert targets["registry-trio+events"]["events_complete"] is True
    assert targets["registry-trio+events"]["events_received"] >= 3 * images


def test_compare_skips_a_missing_distribution() -> None:
    doc = run_json("compare.py", "-n", "4", "-c", "2", "--distribution-binary", "/nonexistent")
    assert doc["distribution"]["skipped"] is True
    assert doc["distribution"]["install"] == "apt-get install docker-registry"
    assert set(doc["targets"]) == {"registry-trio", "registry-trio+events"}
    assert "ratios" not in doc
    _check_trio_rows(doc, 4)
    human = run_script("compare.py", "-n", "2", "-c", "2", "--distribution-binary", "/nonexistent")
    assert human.returncode == 0, human.stderr
    assert "SKIPPED" in human.stdout and "apt-get install docker-registry" in human.stdout
    assert "registry-trio + events" in human.stdout


@pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").exists(), reason="docker-registry is not installed"
)
def test_compare_against_distribution() -> None:
    doc = run_json("compare.py", "-n", "4", "-c", "2")
    assert "2.8" in doc["distribution"]["version"]
    assert set(doc["targets"]) == {
        "distribution",
        "distribution+notify",
        "registry-trio",
        "registry-trio+events",
    }
    _check_trio_rows(doc, 4)
    for name in ("distribution", "distribution+notify"):
        row = doc["targets"][name]
        assert row["images_per_s"] > 0 and row["manifest_put_p99_ms"] > 0
    assert doc["targets"]["distribution+notify"]["events_received"] >= 3 * 4
    for mode in ("events_off", "events_on"):
        assert doc["ratios"][mode]["images_per_s"] > 0
