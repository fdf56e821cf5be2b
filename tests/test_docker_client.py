"""The Docker engine (Debian ``docker.io``) pushing and pulling through the registry.

One private ``dockerd`` serves the whole session (vfs storage, no iptables, no bridge, its own
data root, exec root, pid file and unix socket); each test has its own registry (events on,
a real HTTP sink) and its own client config (``DOCKER_CONFIG``: logins stay in the test).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.client_tools import (
    events_of,
    host_of,
    registry_with_sink,
    require,
    run_tool,
    sha256,
    started_daemon,
)
from tests.test_auth import PASSWORDS, write_htpasswd

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_PUSHED = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: (\d+)")


@dataclass(frozen=True)
class Dockerd:
    client: str
    socket: Path


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    binary = require("dockerd", "docker.io")
    # The client of the same package (/usr/bin), not a newer one a machine may have in
    # /usr/local/bin: the versions docs/clients.md reports are the package's.
    client = require("docker", "docker.io", path=f"/usr/bin{os.pathsep}{os.environ['PATH']}")
    root = tmp_path_factory.mktemp("dockerd")
    socket = root / "docker.sock"
    command = [
        binary,
        "--storage-driver=vfs",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        f"--host=unix://{socket}",
        # Each test's registry listens on a port of its own: the whole loopback network is
        # the insecure (plain HTTP) registry.
        "--insecure-registry=127.0.0.0/8",
    ]
    with started_daemon(command, root / "dockerd.log", r"API listen on", "dockerd"):
        yield Dockerd(client, socket)


@dataclass(frozen=True)
class Docker:
    """The docker CLI against the session's daemon, with this test's client config."""

    daemon: Dockerd
    config: Path

    async def __call__(
        self, *args: str, stdin: bytes = b"", check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        env = {"DOCKER_HOST": f"unix://{self.daemon.socket}", "DOCKER_CONFIG": str(self.config)}
        return await run_tool([self.daemon.client, *args], env=env, stdin=stdin, check=check)

    async def build(self, context: Path, tag: str, files: dict[str, bytes]) -> str:
        """Build ``FROM scratch`` with ``files`` copied in; the image id (config digest)."""
        write_context(context, files)
        await self("build", "--quiet", "--tag", tag, str(context))
        return await self.image_id(tag)

    async def image_id(self, reference: str) -> str:
        result = await self("image", "inspect", "--format", "{{.Id}}", reference)
        return result.stdout.decode().strip()

    async def push(self, reference: str) -> str:
        """Push; the manifest digest docker reports."""
        result = await self("push", reference)
        match = _PUSHED.search(result.stdout.decode())
        assert match, result.stdout.decode()
        return match[1]


@pytest.fixture
def docker(dockerd: Dockerd, tmp_path: Path) -> Docker:
    return Docker(dockerd, tmp_path / "docker-config")


def write_context(context: Path, files: dict[str, bytes]) -> None:
    """A build context whose Dockerfile copies ``files`` into an empty image: one layer."""
    (context / "files").mkdir(parents=True)
    for name, data in files.items():
        (context / "files" / name).write_bytes(data)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY files/ /\n")


def _tar_files(layer: bytes) -> dict[str, bytes]:
    """The regular files of a gzip'd layer tar."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


async def test_docker_push_rmi_pull_keeps_digests_and_sends_events(
    docker: Docker, nursery: trio.Nursery, tmp_path: Path
) -> None:
    registry, sink = await registry_with_sink(nursery, tmp_path)
    reference = f"{host_of(registry.url)}/docker/hello:v1"
    content = os.urandom(2048)  # fresh bytes: no layer left from an earlier run
    image_id = await docker.build(tmp_path / "context", reference, {"hello.bin": content})

    digest = await docker.push(reference)

    async with httpx.AsyncClient(base_url=registry.url) as http:
        served = await http.get(
            "/v2/docker/hello/manifests/v1", headers={"Accept": DOCKER_MANIFEST}
        )
        assert served.status_code == 200
        assert served.headers["Docker-Content-Digest"] == digest == sha256(served.content)
        manifest = json.loads(served.content)
        assert manifest["mediaType"] == DOCKER_MANIFEST
        assert manifest["config"]["digest"] == image_id
        [layer_descriptor] = manifest["layers"]
        layer = (await http.get(f"/v2/docker/hello/blobs/{layer_descriptor['digest']}")).content
    assert sha256(layer) == layer_descriptor["digest"]
    assert _tar_files(layer) == {"hello.bin": content}

    pushed = await sink.wait_for(lambda _: events_of(sink, "image.updated", "docker/hello"))
    [update] = events_of(sink, "image.updated", "docker/hello")
    assert (update["reference"], update["digest"], update["mediaType"]) == (
        "v1",
        digest,
        DOCKER_MANIFEST,
    )
    assert update["request"]["useragent"].startswith("docker/")
    assert "actor" not in update  # anonymous
    blobs = {e["digest"] for e in events_of(sink, "blob.pushed", "docker/hello")}
    assert blobs == {image_id, layer_descriptor["digest"]}
    assert [e["type"] for e in pushed].count("zotregistry.repository.created") == 1

    # Gone from the daemon, then back from the registry: the same image, the same digest.
    await docker("rmi", reference)
    assert (await docker("image", "inspect", reference, check=False)).returncode != 0
    await docker("pull", reference)
    assert await docker.image_id(reference) == image_id
    repo_digests = await docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference)
    assert json.loads(repo_digests.stdout) == [f"{host_of(registry.url)}/docker/hello@{digest}"]

    await sink.wait_for(
        lambda _: (
            {e["digest"] for e in events_of(sink, "blob.pulled", "docker/hello")}
            == {image_id, layer_descriptor["digest"]}
            and any(e["digest"] == digest for e in events_of(sink, "image.pulled", "docker/hello"))
        )
    )


async def test_docker_manifest_push_of_an_index(
    docker: Docker, nursery: trio.Nursery, tmp_path: Path
) -> None:
    registry, sink = await registry_with_sink(nursery, tmp_path)
    host = host_of(registry.url)
    amd64, arm64, listed = (f"{host}/docker/multi:{tag}" for tag in ("amd64", "arm64", "v1"))
    amd64_id = await docker.build(tmp_path / "a", amd64, {"a.bin": os.urandom(1024)})
    await docker.build(tmp_path / "b", arm64, {"b.bin": os.urandom(1024)})
    children = {await docker.push(amd64): "amd64", await docker.push(arm64): "arm64"}

    await docker("manifest", "create", "--insecure", listed, amd64, arm64)
    await docker("manifest", "annotate", "--arch", "arm64", listed, arm64)
    result = await docker("manifest", "push", "--insecure", "--purge", listed)
    index_digest = result.stdout.decode().split()[-1]

    async with httpx.AsyncClient(base_url=registry.url) as http:
        served = await http.get("/v2/docker/multi/manifests/v1", headers={"Accept": DOCKER_LIST})
    assert served.status_code == 200
    assert served.headers["Content-Type"] == DOCKER_LIST
    assert sha256(served.content) == index_digest
    index = json.loads(served.content)
    assert {m["digest"]: m["platform"]["architecture"] for m in index["manifests"]} == children

    await sink.wait_for(
        lambda _: any(
            (e["digest"], e["mediaType"]) == (index_digest, DOCKER_LIST)
            for e in events_of(sink, "image.updated", "docker/multi")
        )
    )
    # The daemon pulls the index by digest and takes the entry for its own platform.
    await docker("rmi", amd64)
    await docker("pull", f"{host}/docker/multi@{index_digest}")
    assert await docker.image_id(f"{host}/docker/multi@{index_digest}") == amd64_id


async def test_docker_login_against_htpasswd(
    docker: Docker, nursery: trio.Nursery, tmp_path: Path
) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    registry, sink = await registry_with_sink(
        nursery, tmp_path, http={"auth": {"htpasswd": {"path": str(htpasswd)}}}
    )
    host = host_of(registry.url)
    reference = f"{host}/private/app:v1"
    await docker.build(tmp_path / "context", reference, {"app.bin": os.urandom(1024)})

    # Anonymous: nothing is allowed.
    refused = await docker("push", reference, check=False)
    assert refused.returncode != 0
    assert b"no basic auth credentials" in refused.stderr, refused.stderr

    wrong = await docker(
        "login", "--username", "alice", "--password-stdin", host, stdin=b"wrong", check=False
    )
    assert wrong.returncode != 0
    assert b"401 Unauthorized" in wrong.stderr, wrong.stderr

    password = PASSWORDS["alice"].encode()
    login = await docker("login", "--username", "alice", "--password-stdin", host, stdin=password)
    assert b"Login Succeeded" in login.stdout
    assert host in json.loads((docker.config / "config.json").read_text())["auths"]

    digest = await docker.push(reference)
    await sink.wait_for(lambda _: events_of(sink, "image.updated", "private/app"))
    [update] = events_of(sink, "image.updated", "private/app")
    assert update["digest"] == digest
    assert update["actor"] == {"name": "alice", "authType": "basic"}

    await docker("logout", host)
    await docker("rmi", reference)
    anonymous = await docker("pull", reference, check=False)
    assert anonymous.returncode != 0
    await docker("login", "--username", "alice", "--password-stdin", host, stdin=password)
    await docker("pull", reference)
