"""containerd's ``ctr`` (Debian ``containerd``) pulling an index through the registry and
pushing it back to another repository.

One private ``containerd`` serves the whole session: its own root, state and socket, and no
CRI plugin (nothing here runs Kubernetes); images unpack with the ``native`` snapshotter
(plain directories). Each test has its own registry, events on, with a real HTTP sink.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.api_helpers import index_manifest, push_manifest
from tests.client_tools import (
    events_of,
    host_of,
    registry_with_sink,
    require,
    run_tool,
    sha256,
    started_daemon,
)
from tests.oci_layout import OCI_INDEX, OCI_MANIFEST, OCILayout, layout_blob, write_layout

NAMESPACE = "registry-trio-tests"


@dataclass(frozen=True)
class Ctr:
    """The ctr CLI against the session's containerd."""

    binary: str
    socket: Path

    async def __call__(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return await run_tool(
            [self.binary, f"--address={self.socket}", f"--namespace={NAMESPACE}", *args]
        )


@pytest.fixture(scope="session")
def ctr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctr]:
    binary = require("containerd", "containerd")
    client = require("ctr", "containerd")
    root = tmp_path_factory.mktemp("containerd")
    socket = root / "containerd.sock"
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\n'
        f'state = "{root / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
    )
    with started_daemon(
        [binary, f"--config={config}"],
        root / "containerd.log",
        r"containerd successfully booted",
        "containerd",
    ):
        yield Ctr(client, socket)


def _layouts(tmp_path: Path) -> dict[str, OCILayout]:
    return {
        arch: write_layout(
            tmp_path / arch, [{f"{arch}.bin": os.urandom(2048)}], tag="v1", architecture=arch
        )
        for arch in ("amd64", "arm64")
    }


async def _push_index(
    http: httpx.AsyncClient, repository: str, layouts: dict[str, OCILayout]
) -> bytes:
    """Push every blob and manifest of ``layouts`` and an index over them (tag ``v1``)."""
    children = []
    for layout in layouts.values():
        for digest in (layout.config_digest, *layout.layer_digests):
            response = await http.post(
                f"/v2/{repository}/blobs/uploads/",
                params={"digest": digest},
                content=layout_blob(layout.path, digest),
            )
            assert response.status_code == 201, response.text
        body = layout_blob(layout.path, layout.manifest_digest)
        await push_manifest(http, repository, layout.manifest_digest, body, OCI_MANIFEST)
        children.append((OCI_MANIFEST, body))
    index = index_manifest(children)  # platforms amd64, arm64 in that order
    await push_manifest(http, repository, "v1", index, OCI_INDEX)
    return index


async def test_ctr_pulls_an_index_and_pushes_it_to_another_repository(
    ctr: Ctr, nursery: trio.Nursery, tmp_path: Path
) -> None:
    registry, sink = await registry_with_sink(nursery, tmp_path)
    host = host_of(registry.url)
    layouts = _layouts(tmp_path)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        index = await _push_index(http, "ctr/app", layouts)
    index_digest = sha256(index)
    source, copy = f"{host}/ctr/app:v1", f"{host}/ctr/copy:v1"

    await ctr("images", "pull", "--plain-http", "--all-platforms", "--snapshotter=native", source)
    # containerd holds the very index, manifests and blobs the registry served.
    assert (await ctr("content", "get", index_digest)).stdout == index
    for layout in layouts.values():
        for digest in (layout.manifest_digest, layout.config_digest, *layout.layer_digests):
            held = await ctr("content", "get", digest)
            assert held.stdout == layout_blob(layout.path, digest), digest
    listed = await ctr("images", "list", f"name=={source}")
    assert index_digest in listed.stdout.decode()

    every_blob = {d for lay in layouts.values() for d in (lay.config_digest, *lay.layer_digests)}
    manifests = {index_digest} | {lay.manifest_digest for lay in layouts.values()}

    def pulled(_: object) -> bool:
        return {e["digest"] for e in events_of(sink, "blob.pulled", "ctr/app")} == every_blob and {
            e["digest"] for e in events_of(sink, "image.pulled", "ctr/app")
        } == manifests

    await sink.wait_for(pulled)
    [first] = events_of(sink, "image.pulled", "ctr/app")[:1]
    assert first["request"]["useragent"].startswith("containerd/")

    # Pushed to another repository of the same registry: every blob is mounted, not sent.
    await ctr("images", "push", "--plain-http", copy, source)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        served = await http.get("/v2/ctr/copy/manifests/v1", headers={"Accept": OCI_INDEX})
    assert served.content == index
    assert served.headers["Docker-Content-Digest"] == index_digest

    def pushed(_: object) -> bool:
        mounted = events_of(sink, "blob.mounted", "ctr/copy")
        return {e["digest"] for e in mounted} == every_blob and {
            e["digest"] for e in events_of(sink, "image.updated", "ctr/copy")
        } == manifests

    await sink.wait_for(pushed)
    assert {e["fromRepository"] for e in events_of(sink, "blob.mounted", "ctr/copy")} == {"ctr/app"}
    assert events_of(sink, "blob.pushed", "ctr/copy") == []
    tagged = [e for e in events_of(sink, "image.updated", "ctr/copy") if e["reference"] == "v1"]
    assert [e["digest"] for e in tagged] == [index_digest]
