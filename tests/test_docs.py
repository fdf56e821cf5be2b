"""The documentation holds: its links resolve, and every command it shows runs.

Pages: README.md and docs/*.md (the commands and code blocks), plus SECURITY.md and
examples/README.md for links. Read as a user reads them:

* every relative Markdown link resolves to a file of the repository, and its ``#anchor`` to a
  heading of that file (GitHub's anchors);
* every fenced block says its language, so that no command hides in an unlabelled one;
* every shell command (the lines of ``sh`` blocks) is run by a test, which :data:`RUN_BY`
  names by the command's prefix, or is a benchmark (``python bench/…``, ``make bench``);
* the README's quick start runs as a user runs it, and so do the operator commands of
  docs/operations.md (delivery status, dead letters, replay, garbage collection, backup and
  restore), each against a real server started from the command line.

A command runs through bash, from a scratch directory laid out like the repository root, with
only what cannot run here changed: ``.venv/bin/`` is the environment running the tests (its
bin directory first on ``PATH``), the ports are free ones (``127.0.0.1:5000``,
``localhost:5000`` and the receiver's 8080), and Docker Hub's alpine is an OCI layout written
here (``tests/oci_layout.py``): the tests run without the network.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.registry_client import RegistryClient, make_image
from tests.conftest import make_config, start_registry
from tests.oci_layout import read_layout, write_layout
from tests.procs import WatchedProcess
from tests.sink import HTTPSinkServer
from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
OPERATIONS = REPO / "docs" / "operations.md"
SECURITY = REPO / "docs" / "security.md"
# Where commands and configs are shown, and where links are followed as well.
COMMAND_PAGES = [README, *DOCS]
LINKED_PAGES = [*COMMAND_PAGES, REPO / "SECURITY.md", REPO / "examples" / "README.md"]
LANGUAGES = {"sh", "json", "python", "text"}
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT = 120.0
START_TIMEOUT = 30.0

QUICK_START = "tests/test_docs.py::test_the_readme_quick_start_runs_as_a_user_runs_it"
OPERATOR = "tests/test_docs.py::test_the_operator_commands_run_against_a_live_server"
BACKUP = "tests/test_docs.py::test_a_live_backup_restores_the_content_and_the_pending_events"
# The make targets that install and test are read with ``make -n`` (what they would run): the
# suite cannot run itself.
MAKEFILE = (
    "tests/test_makefile.py::"
    "test_make_test_after_make_run_adds_the_extras_and_make_run_after_it_installs_nothing"
)
DOCKER = "tests/test_docker_client.py::test_docker_push_rmi_pull_keeps_digests_and_sends_events"

# The prefix of a documented command (``.venv/bin/`` left out) -> the test that runs it.
RUN_BY = {
    "make run": QUICK_START,
    "make test": MAKEFILE,
    "make install": MAKEFILE,
    "make lint": MAKEFILE,
    "python bench/receiver.py": QUICK_START,
    "skopeo copy --dest-tls-verify=false docker://docker.io/": QUICK_START,
    "skopeo copy --src-tls-verify=false": QUICK_START,
    "python -c 'import oras.client": QUICK_START,
    "docker push": DOCKER,
    "docker login": "tests/test_docker_client.py::test_docker_login_against_htpasswd",
    "skopeo copy --dest-tls-verify=false --dest-creds": (
        "tests/test_auth.py::test_skopeo_push_with_and_without_credentials"
    ),
    "docker pull": DOCKER,
    "skopeo copy --dest-cert-dir": (
        "tests/test_tls.py::test_skopeo_pushes_and_pulls_over_https_and_urls_say_https"
    ),
    "registry-trio serve -c": (
        "tests/test_examples.py::test_example_serves_a_push_and_its_event_reaches_every_sink"
    ),
    "registry-trio verify -c": (
        "tests/test_examples.py::test_example_passes_verify_from_the_repository_root"
    ),
    "registry-trio --version": "tests/test_cli.py::test_version_is_the_installed_distributions",
    "python -c 'import bcrypt": (
        "tests/test_docs.py::test_the_htpasswd_line_makes_a_user_the_registry_lets_in"
    ),
    "registry-trio events": OPERATOR,
    "registry-trio gc": OPERATOR,
    "curl": OPERATOR,
    "mkdir -p backup": BACKUP,
    "cp -a": BACKUP,
    "python -c 'import sqlite3": BACKUP,
}
BENCHMARKS = ("python bench/", "make bench")

_FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#* *$", re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_COMMENT = re.compile(r"\s+#\s.*$")


# -- reading the pages -------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block."""
    return _FENCE.findall(text)


def prose(text: str) -> str:
    """The text without its code: fenced blocks and inline code spans."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def section(text: str, heading: str) -> str:
    """The part of a page under ``## heading``, up to the next heading of that level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def commands(text: str) -> list[str]:
    """The shell commands of the ``sh`` blocks of ``text``, in order."""
    return [
        command
        for language, body in fenced_blocks(text)
        if language == "sh"
        for command in block_commands(body)
    ]


def block_commands(body: str) -> list[str]:
    """The commands of one shell block, one a line, their trailing comments left off."""
    lines = (_COMMENT.sub("", line).strip() for line in body.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def as_documented(command: str) -> str:
    """A command as RUN_BY knows it: without the ``.venv/bin/`` of the checkout."""
    return command.removeprefix(".venv/bin/")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lower-cased, punctuation dropped, spaces dashed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated one gets ``-1``, ``-2``… as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def names_a_test(reference: str) -> bool:
    """Whether ``tests/<file>.py::<name>`` names a test function of that file."""
    path, _, name = reference.partition("::")
    file = REPO / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in tree.body
    )


# -- static checks -----------------------------------------------------------------------------


def test_there_are_docs_and_the_readme_fits_on_two_screens() -> None:
    names = {page.name for page in DOCS}
    assert {
        "configuration.md",
        "events.md",
        "security.md",
        "operations.md",
        "scaling.md",
        "benchmarks.md",
        "development.md",
    } <= names
    lines = README.read_text().count("\n")
    assert lines <= 120, f"README.md has {lines} lines: move the detail to docs/"


def test_every_relative_link_resolves_to_a_file_and_its_anchor_to_a_heading() -> None:
    broken = []
    checked = 0
    for page in LINKED_PAGES:
        for target in _LINK.findall(prose(page.read_text())):
            if _SCHEME.match(target):
                continue  # a URL, not ours to check offline
            checked += 1
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not linked.is_relative_to(REPO) or not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{where} (no such heading)")
    assert checked > 30
    assert broken == [], "\n".join(broken)


def test_the_anchor_rule_is_githubs() -> None:
    assert slug("Several instances: JetStream as the queue") == (
        "several-instances-jetstream-as-the-queue"
    )
    assert slug("`htpasswd-access.json`") == "htpasswd-accessjson"
    assert slug("Event delivery: status, dead letters, replay") == (
        "event-delivery-status-dead-letters-replay"
    )
    assert slug("Users (htpasswd)") == "users-htpasswd"


def test_every_fenced_block_says_its_language() -> None:
    unlabelled = [
        f"{page.relative_to(REPO)}: a block in {language or 'no language'}"
        for page in COMMAND_PAGES
        for language, _ in fenced_blocks(page.read_text())
        if language not in LANGUAGES
    ]
    assert unlabelled == [], f"label each block with one of {sorted(LANGUAGES)}: {unlabelled}"


def run_by(command: str) -> str | None:
    """The test RUN_BY names for a documented command: the longest prefix decides."""
    matching = [prefix for prefix in RUN_BY if as_documented(command).startswith(prefix)]
    return RUN_BY[max(matching, key=len)] if matching else None


def test_every_command_shown_is_run_by_a_test_or_is_a_benchmark() -> None:
    shown = [(page, command) for page in COMMAND_PAGES for command in commands(page.read_text())]
    assert len(shown) > 20
    unrun = [
        f"{page.relative_to(REPO)}: {command}"
        for page, command in shown
        if run_by(command) is None and not as_documented(command).startswith(BENCHMARKS)
    ]
    assert unrun == [], "commands no test runs (add the test to RUN_BY):\n" + "\n".join(unrun)
    missing = sorted({test for test in RUN_BY.values() if not names_a_test(test)})
    assert missing == [], f"RUN_BY names tests that do not exist: {missing}"
    used = {p for _, command in shown for p in RUN_BY if as_documented(command).startswith(p)}
    assert used == RUN_BY.keys(), f"RUN_BY entries no page shows: {RUN_BY.keys() - used}"


# -- running the commands ----------------------------------------------------------------------


class Background(WatchedProcess):
    """A command that keeps running (a server, a receiver), started from a directory."""

    async def start(self, command: str, ready: re.Pattern[bytes], cwd: Path) -> str:
        """Start it and wait for ``ready``; the pattern's first group (a URL)."""
        match = await self._launch(
            ["bash", "-c", f"exec {command}"],
            ready,
            START_TIMEOUT,
            cwd=cwd,
            env=environment(),
            # Its own process group, so that kill() reaches the workers too.
            start_new_session=True,
        )
        return match[1].decode()

    async def kill(self) -> None:
        """``kill -9`` of the command and of every process it started (a supervisor's
        workers, which would otherwise outlive it holding the queue's serving lock)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        await super().kill()

    async def interrupt(self) -> int:
        """Ctrl-C, as the README says to stop the server: SIGINT to its whole process group,
        as a terminal sends it; its exit code once every process of it is gone."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)
        with trio.fail_after(self.stop_timeout):
            await self.process.wait()
        return self.process.returncode


@contextlib.asynccontextmanager
async def background(
    command: str, ready: re.Pattern[bytes], cwd: Path
) -> AsyncIterator[tuple[Background, str]]:
    """A started :class:`Background` and what ``ready`` matched; killed at exit if still up."""
    async with trio.open_nursery() as nursery:
        process = Background(nursery)
        try:
            yield process, await process.start(command, ready, cwd)
        finally:
            with trio.CancelScope(shield=True):
                await process.kill()
            nursery.cancel_scope.cancel()


def environment() -> dict[str, str]:
    """The user's environment, with the tests' virtualenv as ``.venv/bin`` first on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def here(command: str, port: int | None = None) -> str:
    """A documented command as it runs here: the tests' virtualenv, the server's port."""
    command = as_documented(command)
    if port is not None:
        command = command.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        command = command.replace("localhost:5000", f"localhost:{port}")
    return command


async def run(command: str, cwd: Path) -> str:
    """Run a command through bash from ``cwd``; fail the test unless it exits 0; its output."""
    with trio.fail_after(COMMAND_TIMEOUT):
        result = await trio.run_process(
            ["bash", "-c", command],
            cwd=cwd,
            env=environment(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (
        f"{command}\nexited {result.returncode}:\n{output}{result.stderr.decode(errors='replace')}"
    )
    return output


def checkout(tmp_path: Path) -> Path:
    """A directory laid out like the repository root, as the docs' commands expect."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(REPO / "examples", root / "examples")
    shutil.copy(README, root / "README.md")
    (root / "bench").symlink_to(REPO / "bench")
    return root


async def dry_run(command: str) -> str:
    """What a documented ``make …`` command runs, as ``make -n`` prints it: its last line
    (a missing or stale virtualenv would be installed first)."""
    assert shutil.which("make"), "make is not installed"
    make, *arguments = shlex.split(command)
    assert make == "make", command
    with trio.fail_after(COMMAND_TIMEOUT):
        result = await trio.run_process(
            ["make", "--no-print-directory", "-n", *arguments], cwd=REPO, capture_stdout=True
        )
    return result.stdout.decode().strip().splitlines()[-1]


LISTENING = re.compile(rb"listening on (https?://\S+?)[\s\"]")


def port_of(url: str) -> int:
    port = httpx.URL(url).port
    assert port is not None
    return port


def printed_events(output: str) -> list[dict[str, Any]]:
    """The structured CloudEvents bench/receiver.py --print printed, one JSON body a line."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def has_event(
    events: list[dict[str, Any]], type_suffix: str, subject: str, digest: str | None = None
) -> bool:
    return any(
        event["type"].endswith(type_suffix)
        and event["subject"] == subject
        and (digest is None or event["data"].get("digest") == digest)
        for event in events
    )


async def test_the_readme_quick_start_runs_as_a_user_runs_it(tmp_path: Path) -> None:
    """Push and pull with skopeo and oras-py, then the events in one minute: the receiver
    prints the events of the registry ``make run CONFIG=examples/minimal.json`` serves."""
    assert shutil.which("skopeo"), "skopeo is not installed (CI must install it)"
    text = README.read_text()
    push_pull = commands(section(text, "Push and pull"))
    minute = commands(section(text, "Events in one minute"))
    ours = [c for c in push_pull + minute if run_by(c) == QUICK_START]
    root = checkout(tmp_path)
    # Docker Hub's alpine as an OCI layout, of fresh bytes: skopeo's blob-info cache outlives
    # test runs, and would skip blobs it believes the registry has.
    hub = write_layout(tmp_path / "hub", [{"etc/alpine-release": os.urandom(64)}], tag="3.20")

    (listen,) = [c for c in minute if as_documented(c).startswith("python bench/receiver.py")]
    assert "--port 8080 --print" in listen
    (serve,) = [c for c in minute if c.startswith("make run")]
    served = as_documented(await dry_run(serve))
    assert served == "registry-trio serve -c examples/minimal.json", served
    pushes = [c for c in push_pull + minute if c.startswith("skopeo copy --dest-tls-verify")]
    assert len(pushes) == 2  # the first push, and the push of the events minute
    (pull,) = [c for c in push_pull if c.startswith("skopeo copy --src-tls-verify")]
    (oras,) = [c for c in push_pull if as_documented(c).startswith("python -c 'import oras")]
    assert sorted([listen, serve, *pushes, pull, oras]) == sorted(ours)

    async with contextlib.AsyncExitStack() as stack:
        receiver, receiver_url = await stack.enter_async_context(
            background(here(listen).replace("--port 8080", "--port 0"), LISTENING, root)
        )
        # The example sends to the receiver's documented port; here both are free ones.
        minimal = root / "examples" / "minimal.json"
        config = json.loads(minimal.read_text())
        (sink,) = config["extensions"]["events"]["sinks"]
        assert sink["address"].startswith("http://127.0.0.1:8080/")
        sink["address"] = sink["address"].replace("http://127.0.0.1:8080", receiver_url)
        config["http"]["port"] = 0
        minimal.write_text(json.dumps(config))
        server, url = await stack.enter_async_context(background(served, LISTENING, root))

        hub_alpine = "docker://docker.io/library/alpine:3.20"
        for command in (pushes[0], pull, oras, pushes[1]):
            await run(here(command, port_of(url)).replace(hub_alpine, f"oci:{hub.path}:3.20"), root)

        # The pull came out as it went in, and the receiver printed every push's events.
        assert read_layout(root / "alpine", "3.20").manifest_digest == hub.manifest_digest
        expected = [
            ("image.updated", "library/alpine:3.20", hub.manifest_digest),
            ("image.updated", "team/hello:v1", None),
            ("repository.created", "team/alpine", None),
            ("image.updated", "team/alpine:3.20", hub.manifest_digest),
        ]

        async def printed() -> list[dict[str, Any]]:
            return printed_events(receiver.current_output)

        await eventually(printed, lambda events: all(has_event(events, *e) for e in expected))
        # Ctrl-C stops the server cleanly.
        assert await server.interrupt() == 0, server.current_output


def shown_by(page: Path, test: str) -> list[str]:
    """The commands of a page that RUN_BY gives ``test``."""
    return [c for c in commands(page.read_text()) if run_by(c) == test]


def served_config(sink_name: str, sink_url: str) -> dict[str, Any]:
    """A config as a user writes one: relative directories, one HTTP sink."""
    return {
        "storage": {"rootDirectory": "registry_data"},
        "http": {"address": "127.0.0.1", "port": 0},
        "extensions": {
            "events": {
                "enable": True,
                "queue": {"directory": "queue_data"},
                "sinks": [{"type": "http", "name": sink_name, "address": sink_url}],
            }
        },
    }


SERVE = "registry-trio serve -c config.json"


async def test_the_htpasswd_line_makes_a_user_the_registry_lets_in(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (line,) = shown_by(SECURITY, RUN_BY["python -c 'import bcrypt"])
    *_, user, password, append, file = shlex.split(line)
    assert append == ">>"
    await run(here(line), tmp_path)

    auth = {"htpasswd": {"path": str(tmp_path / file)}}
    registry = await start_registry(nursery, make_config(tmp_path, http={"auth": auth}))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        assert (await http.get("/v2/", auth=(user, password))).status_code == 200
        assert (await http.get("/v2/", auth=(user, password + "x"))).status_code == 401


async def test_the_operator_commands_run_against_a_live_server(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Status, dead letters and replay (CLI and admin API) and garbage collection, as
    docs/operations.md shows them, with a sink that refuses every event (dead letters)."""
    shown = shown_by(OPERATIONS, OPERATOR)
    assert len(shown) >= 8
    refusing = HTTPSinkServer(status=400)
    await refusing.start(nursery)
    config = served_config("audit", refusing.url)
    (tmp_path / "config.json").write_text(json.dumps(config))

    async with background(SERVE, LISTENING, tmp_path) as (server, url):
        # The config the server runs with: the commands find it through its port.
        config["http"]["port"] = port_of(url)
        (tmp_path / "config.json").write_text(json.dumps(config))
        image = make_image(seed=b"operations")
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await RegistryClient(url, client=http).push_image("team/app", "v1", image)

            async def dead() -> int:
                answer = await http.get("/_registry/events/sinks")
                (audit,) = answer.json()["sinks"]
                return int(audit["dead"])

            await eventually(dead, lambda count: count >= 4)  # two blobs, repository, manifest

        outputs = {}
        for command in shown:
            output = await run(here(command, port_of(url)), tmp_path)
            assert output.strip(), command
            outputs[command] = output
            if command.startswith("curl"):
                assert "errors" not in json.loads(output), f"{command}: {output}"
        assert any(image.digest in output for output in outputs.values())
        assert server.running, server.current_output


async def push_until(url: str, lane: int, stop: trio.Event, pushed: list[str]) -> None:
    """Push small images to a repository of its own until ``stop``; their references."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        client = RegistryClient(url, client=http)
        for n in range(10**6):
            if stop.is_set():
                return
            reference = f"live/lane{lane}:v{n}"
            repository, tag = reference.split(":")
            await client.push_image(repository, tag, make_image(seed=reference.encode()))
            pushed.append(reference)


async def every_tag_pulls_whole(url: str) -> list[str]:
    """Pull every tag the registry lists, each blob checked; the references."""
    pulled = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        client = RegistryClient(url, client=http)
        for repository in (await http.get("/v2/_catalog")).json()["repositories"]:
            for tag in (await http.get(f"/v2/{repository}/tags/list")).json()["tags"]:
                await client.pull_image(repository, tag)
                pulled.append(f"{repository}:{tag}")
    return pulled


async def test_a_live_backup_restores_the_content_and_the_pending_events(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The backup of docs/operations.md, taken while pushes go on and the sink is down, then
    the server killed and its directories lost: the restore serves every tag it holds whole,
    and delivers the events that were pending."""
    backups = section(OPERATIONS.read_text(), "Backups")
    take, restore = [
        block_commands(body) for language, body in fenced_blocks(backups) if language == "sh"
    ]
    assert {run_by(command) for command in take + restore} == {BACKUP}
    down = HTTPSinkServer(status=503)
    await down.start(nursery)
    config = served_config("receiver", down.url)
    # Retries soon after the restore: the outbox copy keeps each event's next attempt.
    config["extensions"]["events"]["sinks"][0]["retry"] = {"maxBackoff": "1s"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    kept = make_image(seed=b"kept")

    async with background(SERVE, LISTENING, tmp_path) as (server, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await RegistryClient(url, client=http).push_image("team/kept", "v1", kept)
        stop, pushed = trio.Event(), []
        async with trio.open_nursery() as pushers:
            for lane in range(3):  # several at once: a push lands between the two copies
                pushers.start_soon(push_until, url, lane, stop, pushed)

            async def done() -> int:
                return len(pushed)

            await eventually(done, lambda count: count >= 3)  # the pushes are under way
            for command in take:
                await run(here(command), tmp_path)
            stop.set()
        # Events were owed and none acknowledged: the outbox copy holds them pending.
        assert down.requests and not down.received
        await server.kill()  # the disaster: everything but the backup is lost
    (tmp_path / "lost").mkdir()
    for directory in ("registry_data", "queue_data"):
        (tmp_path / directory).rename(tmp_path / "lost" / directory)

    for command in restore:
        await run(here(command), tmp_path)
    up = HTTPSinkServer()
    await up.start(nursery)
    config["extensions"]["events"]["sinks"][0]["address"] = up.url
    (tmp_path / "config.json").write_text(json.dumps(config))
    async with background(SERVE, LISTENING, tmp_path) as (server, url):
        restored = await every_tag_pulls_whole(url)
        assert "team/kept:v1" in restored
        # Tags pushed while the backup ran are in it or not, but never without their blobs.
        assert set(restored) - {"team/kept:v1"} <= set(pushed)
        await up.wait_for(
            lambda events: any(
                e["type"].endswith("image.updated")
                and e["subject"] == "team/kept:v1"
                and e["data"]["digest"] == kept.digest
                for e in events
            )
        )
        # The restored storage takes pushes: what the backup left out is made again.
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            after = make_image(seed=b"after the restore")
            await RegistryClient(url, client=http).push_image("team/kept", "v2", after)
        assert await server.interrupt() == 0, server.current_output
