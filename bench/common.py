"""Shared pieces of the ``bench/`` scripts: options, the machine header, the server process.

Not a benchmark itself. The scripts import it as ``common`` (they run as
``python bench/<script>.py``, which puts ``bench/`` first on ``sys.path``).

* :func:`base_parser` gives every script ``--url``, ``--concurrency``, ``--count``, ``--json``
  and the options of the server it may start; scripts that measure only servers they start
  themselves pass ``no_url`` (the reason) and ``--url`` is refused with it.
* :func:`machine_info` / :func:`print_header` say what the figures were measured on.
* :class:`ManagedProcess` is the subprocess plumbing every server under test shares (temp
  root, output drained by a thread, log tail, CPU time of its whole process tree, pinning to
  CPUs with ``taskset``, SIGTERM stop); :class:`ServerProcess` and compare.py's
  ``DistributionProcess`` subclass it.
* :class:`ServerProcess` starts ``python -m registry_trio serve`` on ``127.0.0.1`` with a
  fresh temporary storage directory, waits (with a deadline) for its ``listening on`` log
  line, drains its log so it can never block on a full pipe, reads its CPU time and memory
  from ``/proc``, and stops it with SIGTERM.
* :func:`percentiles`, :func:`parse_size`, :func:`progress` are small helpers.
"""

from __future__ import annotations

import abc
import argparse
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import trio
from registry_client import RegistryClient, make_image
from tqdm import tqdm

__all__ = [
    "MB",
    "ManagedProcess",
    "MiB",
    "ServerProcess",
    "base_parser",
    "cpu_times",
    "emit_json",
    "format_size",
    "machine_info",
    "parse_size",
    "percentiles",
    "positive_int",
    "print_header",
    "progress",
    "push_rate",
    "read_memory",
    "report_failure",
    "reset_peak",
]

MB = 1_000_000
MiB = 1 << 20

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "ki": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mi": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gi": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "ti": 1 << 40,
    "tb": 10**12,
}


def parse_size(text: str) -> int:
    """``"1GiB"`` -> 1073741824. Bare K/M/G are binary; ``KB``/``MB``/``GB`` are decimal."""
    match = _SIZE.match(text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (examples: 4096, 512KiB, 2MiB, 1GiB, 100MB)"
        )
    return int(float(match[1]) * _UNITS[unit])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _RefuseURL(argparse.Action):
    """``--url`` on a script that can only measure the servers it starts: a usage error."""

    def __init__(self, *args: Any, reason: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reason = reason

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"--url is not supported: {self.reason}")


def base_parser(
    description: str,
    *,
    count: int | None = None,
    concurrency: int | None = None,
    count_help: str = "how many operations to run",
    epilog: str | None = None,
    no_url: str | None = None,
) -> argparse.ArgumentParser:
    """The options every script shares; ``count``/``concurrency`` None leaves them out.

    ``no_url``: why this script cannot measure another registry; ``--url`` is then refused
    with that reason (exit status 2), and its ``--help`` says so.
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("target registry")
    if no_url is None:
        target.add_argument(
            "--url",
            metavar="URL",
            help="benchmark an already-running registry at URL (e.g. http://127.0.0.1:5000); "
            "by default the script starts registry-trio itself on 127.0.0.1 with a temporary "
            "storage directory and stops it at the end (server-side figures such as CPU time "
            "and memory are only available then)",
        )
    else:
        target.add_argument(
            "--url",
            metavar="URL",
            action=_RefuseURL,
            reason=no_url,
            help=f"not supported by this script, refused with an error: {no_url}",
        )
    target.add_argument(
        "--data-dir",
        metavar="DIR",
        help="create the started server's temporary storage under DIR instead of the system "
        "temp directory (pick the disk you want to measure)",
    )
    target.add_argument(
        "--events",
        action="store_true",
        help="start the server with the durable event outbox enabled (queue in the temp "
        "directory, no sinks): every push then also commits its events before the 2xx",
    )
    target.add_argument(
        "--server-log",
        metavar="FILE",
        help="copy the started server's log to FILE (default: kept in memory; the last "
        "lines are printed if the server fails)",
    )
    target.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the started server to listen (default: %(default)s)",
    )
    load = parser.add_argument_group("load")
    if count is not None:
        load.add_argument(
            "-n",
            "--count",
            type=positive_int,
            default=count,
            metavar="N",
            help=f"{count_help} (default: %(default)s)",
        )
    if concurrency is not None:
        load.add_argument(
            "-c",
            "--concurrency",
            type=positive_int,
            default=concurrency,
            metavar="C",
            help="requests in flight at once, and the size of the HTTP connection pool "
            "(default: %(default)s)",
        )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (machine, settings, results) on stdout instead of the "
        "human-readable report; disables the progress bars",
    )
    output.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they go to stderr)"
    )
    return parser


# -- the machine -----------------------------------------------------------------------------


def _meminfo_total() -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model", "Hardware"):
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_bytes": _meminfo_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
    }


def machine_line(machine: dict[str, Any]) -> str:
    memory = machine["memory_bytes"]
    cores = f"{machine['cores']} cores"
    if machine.get("usable_cores") not in (None, machine["cores"]):
        cores += f" ({machine['usable_cores']} usable)"
    return (
        f"{machine['cpu_model']}, {cores}, "
        f"{format_size(memory) if memory else '? memory'} RAM, {machine['kernel']}, "
        f"{machine['python']}, SQLite {machine['sqlite']}"
    )


def print_header(title: str, machine: dict[str, Any], settings: dict[str, Any]) -> None:
    print(f"== {title}")
    print(f"machine:  {machine_line(machine)}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print()


def emit_json(document: dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


# -- statistics and progress -----------------------------------------------------------------


def percentiles(
    values: Iterable[float], points: Sequence[float] = (50, 95, 99)
) -> dict[str, float]:
    """Linear-interpolated percentiles (numpy's default method); empty input gives ``{}``."""
    ordered = sorted(values)
    if not ordered:
        return {}
    out = {}
    for p in points:
        rank = (len(ordered) - 1) * p / 100
        low = int(rank)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{p:g}"] = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return out


def progress(args: argparse.Namespace, total: int, desc: str, unit: str = "it", **kw: Any) -> tqdm:
    """A tqdm bar on stderr; off with ``--json``/``--no-progress``, and when not a terminal."""
    disable = True if (args.json or args.no_progress) else None
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, **kw)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def report_failure(script: str, exc: BaseException, server: ServerProcess | None) -> None:
    """One line per underlying error (Trio wraps them in groups), then the server's log."""
    for leaf in _leaves(exc):
        print(f"{script}: FAILED: {type(leaf).__name__}: {leaf}", file=sys.stderr)
    if server is not None and server.proc is not None:
        print("server log (last lines):\n" + server.log_tail(), file=sys.stderr)


# -- the server under test -------------------------------------------------------------------


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


class ManagedProcess(abc.ABC):
    """A server under test in a subprocess: its temp root, output, CPU time and stop.

    It exists so that every server a script starts (:class:`ServerProcess` here, compare.py's
    Docker distribution) is run, drained, read and stopped by one piece of code instead of a
    copy per server. Use as a context manager: it makes a fresh temporary ``root``, calls the
    subclass's :meth:`_start` (write a config there, :meth:`_spawn_reader`, wait until the
    server answers), and at the exit (or when the start fails) stops the process with
    SIGTERM (``kill -9`` after 20 s) and removes ``root``. A reader thread keeps the last
    lines of the output for :meth:`log_tail`, so the process never blocks on a full pipe.
    ``cpus`` (a ``taskset -c`` list, e.g. ``"0"``) runs the process, and every thread and
    child it starts, on those CPUs only. ``keep_root`` leaves ``root`` for the caller to
    remove (compare.py removes every server's at the end of its run).
    """

    def __init__(
        self,
        *,
        root_prefix: str,
        data_dir: str | None = None,
        start_timeout: float = 30.0,
        cpus: str | None = None,
        keep_root: bool = False,
    ) -> None:
        self._root_prefix = root_prefix
        self._data_dir = data_dir
        self._start_timeout = start_timeout
        self._cpus = cpus
        self._keep_root = keep_root
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.root: Path | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Self:
        self.root = Path(tempfile.mkdtemp(prefix=self._root_prefix, dir=self._data_dir))
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    @abc.abstractmethod
    def _start(self) -> None:
        """Write the config in ``root``, start the process, wait until it is ready."""

    def _spawn_reader(self, argv: list[str], thread_name: str) -> None:
        """Start ``argv`` in ``root``, stdout and stderr into one pipe that a thread drains."""
        if self._cpus is not None:
            # taskset sets the affinity and execs argv (same pid): it holds from the first
            # instruction, for every thread and child, which setting it after the start
            # could not promise.
            argv = ["taskset", "-c", self._cpus, *argv]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        self._reader = threading.Thread(
            target=self._drain, args=(self.proc,), name=thread_name, daemon=True
        )
        self._reader.start()

    def _lines(self, proc: subprocess.Popen[bytes]) -> Iterator[str]:
        """``proc``'s output lines until it ends, each one kept for :meth:`log_tail`."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail.append(line)
            yield line

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """The reader thread: read ``proc``'s output to its end."""
        for _line in self._lines(proc):
            pass

    def _not_ready(self, what: str) -> RuntimeError:
        """The error for a start that failed: ``what`` (did not ...), exit code, log tail."""
        assert self.proc is not None
        exit_code = self.proc.poll()
        return RuntimeError(
            f"{what} within {self._start_timeout}s"
            + (f" (exit code {exit_code})" if exit_code is not None else "")
            + ":\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the output (of every process, across restarts)."""
        return "\n".join(list(self._tail)[-lines:])

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds the server has used so far: all threads, and the
        processes it started (a supervisor's workers), living or ended."""
        return cpu_times(self.pid)

    def process_count(self) -> int:
        """The server's processes now: itself and its children (a supervisor's workers)."""
        return 1 + len(_children(self.pid))

    def allowed_cpus(self) -> list[int]:
        """The CPUs the server may run on, as the kernel has it now."""
        return sorted(os.sched_getaffinity(self.pid))

    def _reap(self) -> None:
        """After the process is gone: let the reader finish, close the pipe."""
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()
        if self.root is not None and not self._keep_root:
            shutil.rmtree(self.root, ignore_errors=True)


class ServerProcess(ManagedProcess):
    """registry-trio in a subprocess, on 127.0.0.1 with an ephemeral port and a temp dir.

    Use as a context manager. ``url`` is the base URL it logged; ``pid`` its process id.
    ``queue_dir`` puts the event outbox in a directory of the caller's (which may already
    hold events) instead of the temporary one; the caller removes it. ``queue`` adds keys to
    ``extensions.events.queue`` (a JetStream queue's ``type`` and ``address``), ``history``
    sets ``extensions.events.history``.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        events: bool = False,
        sinks: Sequence[dict[str, Any]] = (),
        http: dict[str, Any] | None = None,
        queue_dir: str | Path | None = None,
        queue: dict[str, Any] | None = None,
        history: dict[str, Any] | None = None,
        log_file: str | None = None,
        start_timeout: float = 30.0,
        python: str = sys.executable,
        cpus: str | None = None,
        keep_root: bool = False,
    ) -> None:
        super().__init__(
            root_prefix="registry-trio-bench-",
            data_dir=data_dir,
            start_timeout=start_timeout,
            cpus=cpus,
            keep_root=keep_root,
        )
        self._events = events or bool(sinks)
        self._sinks = list(sinks)
        self._http = dict(http or {})
        # The caller's queue directory (e.g. one filled before the start); not removed at stop.
        self._queue_dir = Path(queue_dir) if queue_dir is not None else None
        # More extensions.events.queue keys (e.g. a JetStream queue's type and address).
        self._queue = dict(queue or {})
        self._history = history
        self._log_file = log_file
        self._python = python
        self._listening = threading.Event()
        self.restarts = 0

    def config(self) -> dict[str, Any]:
        assert self.root is not None
        doc: dict[str, Any] = {
            "storage": {"rootDirectory": str(self.root / "registry_data")},
            # One process unless the bench asks for workers: figures stay per process.
            "http": {"address": "127.0.0.1", "port": 0, "workers": 1, **self._http},
            "log": {"level": "info"},
        }
        if self._events:
            doc["extensions"] = {
                "events": {
                    "enable": True,
                    "queue": {
                        "directory": str(self._queue_dir or self.root / "queue_data"),
                        **self._queue,
                    },
                    "sinks": self._sinks,
                    **({} if self._history is None else {"history": self._history}),
                }
            }
        return doc

    def _start(self) -> None:
        assert self.root is not None
        (self.root / "config.json").write_text(json.dumps(self.config(), indent=2))
        self._spawn()

    def _spawn(self) -> None:
        """Start a process on ``root``'s config and wait for its ``listening on`` line."""
        assert self.root is not None
        self.url = ""
        self._listening = threading.Event()
        self._spawn_reader(
            [self._python, "-m", "registry_trio", "serve", "-c", str(self.root / "config.json")],
            "server-log",
        )
        # The reader sets the event on the line, or when the output ends (a crash).
        if not self._listening.wait(self._start_timeout) or not self.url:
            raise self._not_ready("registry-trio did not log 'listening on'")

    def kill(self) -> None:
        """``kill -9`` the server and wait until it is gone; its directories are kept."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reap()
        self._tail.append(f"--- killed (SIGKILL), pid {self.proc.pid} ---")

    def restart(self) -> str:
        """Start a new process on the same config and directories; its (new) URL."""
        assert self.proc is not None and self.proc.poll() is not None, "kill() it first"
        self.restarts += 1
        self._spawn()
        return self.url

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        listening = self._listening  # this process's, across restarts
        # The first process truncates the log file; restarted ones append to it.
        mode = "w" if self.restarts == 0 else "a"
        sink = open(self._log_file, mode) if self._log_file else None  # noqa: SIM115
        try:
            for line in self._lines(proc):
                if sink:
                    sink.write(line + "\n")
                if not self.url and (match := re.search(r"listening on (\S+)", line)):
                    self.url = match[1]
                    listening.set()
        finally:
            if sink:
                sink.close()
            listening.set()

    # -- /proc readings ------------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server has used so far."""
        return sum(self.cpu_times())

    def memory(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak since start or the last reset), in bytes."""
        return read_memory(self.pid)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
        return reset_peak(self.pid)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds ``pid`` has used so far, all threads, with its children's
    (a supervisor's workers: the live ones, and those it has reaped) (/proc/<pid>/stat)."""
    user = system = 0.0
    for process in [pid, *_children(pid)]:
        try:
            stat = Path(f"/proc/{process}/stat").read_text()
        except FileNotFoundError:
            continue  # a child that exited meanwhile: its time is in the parent's cutime
        # Field 2 (comm) may hold spaces; the fields after its closing parenthesis are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime, and the waited-for children's cutime, cstime.
        user += (int(fields[11]) + int(fields[13])) / _clock_ticks()
        system += (int(fields[12]) + int(fields[14])) / _clock_ticks()
    return user, system


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def read_memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def push_rate(
    url: str,
    count: int,
    concurrency: int,
    prefix: str,
    auth: tuple[str, str] | None = None,
) -> float:
    """Small images (one 4 KiB layer) pushed per second at ``concurrency``."""
    images = [make_image((4096,)) for _ in range(count)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, auth=auth) as http:
        client = RegistryClient(url, client=http)
        next_index = iter(range(count))

        async def worker() -> None:
            for i in next_index:
                await client.push_image(f"{prefix}-{i % 8}", f"v{i}", images[i])

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return count / (time.perf_counter() - started)
