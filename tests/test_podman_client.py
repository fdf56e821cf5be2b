"""podman and buildah (Debian packages, containers/image and containers/storage) pushing and
pulling through the registry: gzip and zstd layers, indexes pushed with ``manifest push
--all``, and podman's partial pull of a zstd:chunked layer, which fetches only the chunks it
lacks with multi-range requests (206 ``multipart/byteranges``).

Each test has its own storage (``CONTAINERS_STORAGE_CONF``: graph root, run root, driver) and
temporary directory; both tools run without a daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
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
    unavailable,
)
from tests.test_docker_client import write_context
from tests.test_real_clients import access_records

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_CHUNKED_TOC = "io.containers.zstd-chunked.manifest-position"


@dataclass(frozen=True)
class Containers:
    """podman and buildah on one private storage."""

    root: Path
    env: dict[str, str]

    async def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        command = [
            require("podman", "podman"),
            # No systemd and no journal here; podman's own state stays in this test's root.
            "--cgroup-manager=cgroupfs",
            "--events-backend=none",
            f"--tmpdir={self.root / 'tmp'}",
            *args,
        ]
        return await run_tool(command, env=self.env, check=check)

    async def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return await run_tool([require("buildah", "buildah"), *args], env=self.env, check=check)

    async def inspect(self, reference: str) -> dict[str, object]:
        result = await self.podman("image", "inspect", reference)
        [image] = json.loads(result.stdout)
        return image  # type: ignore[no-any-return]


def _storage(root: Path, driver: str, partial_pulls: bool) -> Containers:
    root.mkdir(parents=True)
    conf = root / "storage.conf"
    enabled = "true" if partial_pulls else "false"
    conf.write_text(
        f'[storage]\ndriver = "{driver}"\n'
        f'graphroot = "{root / "graph"}"\nrunroot = "{root / "run"}"\n'
        "[storage.options]\n"
        f'pull_options = {{enable_partial_images = "{enabled}", use_hard_links = "false", '
        'ostree_repos = ""}\n'
    )
    return Containers(root, {"CONTAINERS_STORAGE_CONF": str(conf)})


@pytest.fixture
def containers(tmp_path: Path) -> Containers:
    """vfs storage: plain directories, nothing mounted."""
    return _storage(tmp_path / "vfs", "vfs", partial_pulls=False)


@pytest.fixture
def overlay_containers(tmp_path: Path) -> Iterator[Containers]:
    """overlay storage with partial pulls on (containers/storage applies a zstd:chunked layer
    chunk by chunk only with overlay). The driver bind-mounts its directory private; that
    mount is undone at the end."""
    containers = _storage(tmp_path / "overlay", "overlay", partial_pulls=True)
    try:
        yield containers
    finally:
        home = str(containers.root / "graph" / "overlay")
        with open("/proc/self/mounts") as mounts:
            mounted = any(line.split()[1] == home for line in mounts)
        if mounted:
            subprocess.run(["umount", home], check=True)


async def test_podman_pushes_and_pulls_a_zstd_layer_and_an_index(
    containers: Containers, nursery: trio.Nursery, tmp_path: Path
) -> None:
    registry, sink = await registry_with_sink(nursery, tmp_path)
    host = host_of(registry.url)
    reference = f"{host}/podman/app:zstd"
    write_context(tmp_path / "context", {"app.bin": os.urandom(4096)})
    await containers.podman("build", "--quiet", "--tag", reference, str(tmp_path / "context"))
    image_id = "sha256:" + str((await containers.inspect(reference))["Id"])

    # zstd first: containers/image reuses a layer already pushed in another compression.
    await containers.podman("push", "--tls-verify=false", "--compression-format=zstd", reference)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        served = await http.get("/v2/podman/app/manifests/zstd", headers={"Accept": OCI_MANIFEST})
        manifest = json.loads(served.content)
        [layer] = manifest["layers"]
        blob = await http.get(f"/v2/podman/app/blobs/{layer['digest']}")
    digest = served.headers["Docker-Content-Digest"]
    assert digest == sha256(served.content)
    assert manifest["config"]["digest"] == image_id
    assert layer["mediaType"] == LAYER_ZSTD
    assert blob.content[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame magic
    assert sha256(blob.content) == layer["digest"]

    await containers.podman("rmi", reference)
    await containers.podman("pull", "--tls-verify=false", reference)
    pulled = await containers.inspect(reference)
    assert ("sha256:" + str(pulled["Id"]), pulled["Digest"]) == (image_id, digest)

    # An index of two platforms, every image in it pushed with it.
    listed = f"{host}/podman/list:v1"
    await containers.podman(
        "build",
        "--quiet",
        "--no-cache",
        "--platform=linux/arm64",
        "--tag",
        "localhost/arm",
        str(tmp_path / "context"),
    )
    await containers.podman("manifest", "create", "localhost/list")
    await containers.podman("manifest", "add", "localhost/list", f"containers-storage:{reference}")
    await containers.podman("manifest", "add", "localhost/list", "containers-storage:localhost/arm")
    await containers.podman(
        "manifest", "push", "--all", "--tls-verify=false", "localhost/list", f"docker://{listed}"
    )
    index = await _served_index(registry.url, "podman/list", "v1")
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == ["amd64", "arm64"]

    def seen(events: list[dict[str, object]]) -> bool:
        return (
            any(e["digest"] == digest for e in events_of(sink, "image.updated", "podman/app"))
            and {e["digest"] for e in events_of(sink, "blob.pulled", "podman/app")}
            >= {layer["digest"], image_id}
            and len(events_of(sink, "image.updated", "podman/list")) == 3
        )

    await sink.wait_for(seen)
    [pushed] = events_of(sink, "image.updated", "podman/app")
    assert pushed["request"]["useragent"].startswith("containers/")


async def _served_index(url: str, repository: str, tag: str) -> dict[str, list[dict]]:
    """The index at ``repository:tag``, each of its manifests checked to be served too."""
    async with httpx.AsyncClient(base_url=url) as http:
        served = await http.get(f"/v2/{repository}/manifests/{tag}", headers={"Accept": OCI_INDEX})
        assert served.status_code == 200, served.text
        assert served.headers["Content-Type"] == OCI_INDEX
        index = json.loads(served.content)
        for entry in index["manifests"]:
            child = await http.get(
                f"/v2/{repository}/manifests/{entry['digest']}",
                headers={"Accept": entry["mediaType"]},
            )
            assert child.status_code == 200
            assert sha256(child.content) == entry["digest"]
    return index  # type: ignore[no-any-return]


async def test_buildah_pushes_pulls_and_pushes_an_index_with_all_its_images(
    containers: Containers, nursery: trio.Nursery, tmp_path: Path
) -> None:
    registry, sink = await registry_with_sink(nursery, tmp_path)
    host = host_of(registry.url)
    write_context(tmp_path / "context", {"tool.bin": os.urandom(4096)})
    ids = {}
    for arch in ("amd64", "arm64"):
        await containers.buildah(
            "bud",
            "--quiet",
            "--no-cache",
            f"--platform=linux/{arch}",
            "--tag",
            f"localhost/{arch}",
            str(tmp_path / "context"),
        )
        ids[arch] = "sha256:" + str((await containers.inspect(f"localhost/{arch}"))["Id"])

    single = f"{host}/buildah/tool:v1"
    await containers.buildah("push", "--tls-verify=false", "localhost/amd64", f"docker://{single}")
    async with httpx.AsyncClient(base_url=registry.url) as http:
        served = await http.get("/v2/buildah/tool/manifests/v1", headers={"Accept": OCI_MANIFEST})
    manifest = json.loads(served.content)
    assert manifest["config"]["digest"] == ids["amd64"]
    assert [layer["mediaType"] for layer in manifest["layers"]] == [LAYER_GZIP]

    await containers.buildah("manifest", "create", "localhost/list")
    for arch in ("amd64", "arm64"):
        await containers.buildah(
            "manifest", "add", "localhost/list", f"containers-storage:localhost/{arch}"
        )
    await containers.buildah(
        "manifest",
        "push",
        "--all",
        "--tls-verify=false",
        "localhost/list",
        f"docker://{host}/buildah/list:v1",
    )
    index = await _served_index(registry.url, "buildah/list", "v1")
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    assert sorted(by_arch) == ["amd64", "arm64"]

    # Pulled back (the image gone first) by the index's digest: the entry of this platform.
    await containers.buildah("rmi", "--all", "--force")
    index_digest = await _digest_of_tag(registry.url, "buildah/list", "v1")
    await containers.buildah("pull", "--tls-verify=false", f"{host}/buildah/list@{index_digest}")
    pulled = await containers.inspect(f"{host}/buildah/list@{index_digest}")
    assert "sha256:" + str(pulled["Id"]) == ids["amd64"]

    def seen(events: list[dict[str, object]]) -> bool:
        pushed = {e["digest"] for e in events_of(sink, "image.updated", "buildah/list")}
        pulled = {e["digest"] for e in events_of(sink, "image.pulled", "buildah/list")}
        return (
            pushed == {index_digest, *by_arch.values()}
            and {index_digest, by_arch["amd64"]} <= pulled
        )

    await sink.wait_for(seen)
    [tagged] = [
        e for e in events_of(sink, "image.updated", "buildah/list") if e["reference"] == "v1"
    ]
    assert tagged["mediaType"] == OCI_INDEX
    assert tagged["request"]["useragent"].startswith("Buildah/")


async def _digest_of_tag(url: str, repository: str, tag: str) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        head = await http.head(
            f"/v2/{repository}/manifests/{tag}", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
        )
    return head.headers["Docker-Content-Digest"]


def _chunked_contexts(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """Two build contexts of 40 random 32 KiB files; the second changes 4 of them (so it
    shares 90 % of its chunks with the first). The second's files."""
    first = {f"f{i:02}.bin": os.urandom(32 * 1024) for i in range(40)}
    second = {
        name: os.urandom(len(data)) if i < 4 else data
        for i, (name, data) in enumerate(sorted(first.items()))
    }
    write_context(tmp_path / "first", first)
    write_context(tmp_path / "second", second)
    return tmp_path / "first", tmp_path / "second", second


async def test_podman_partial_pull_of_zstd_chunked_fetches_only_missing_chunks(
    containers: Containers,
    overlay_containers: Containers,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    registry, sink = await registry_with_sink(nursery, tmp_path)
    host = host_of(registry.url)
    first, second, second_files = _chunked_contexts(tmp_path)
    for context, tag in ((first, "first"), (second, "second")):
        reference = f"{host}/podman/chunked:{tag}"
        await containers.podman("build", "--quiet", "--tag", reference, str(context))
        await containers.podman(
            "push", "--tls-verify=false", "--compression-format=zstd:chunked", reference
        )
    async with httpx.AsyncClient(base_url=registry.url) as http:
        served = await http.get(
            "/v2/podman/chunked/manifests/second", headers={"Accept": OCI_MANIFEST}
        )
    [layer] = json.loads(served.content)["layers"]
    assert layer["mediaType"] == LAYER_ZSTD and ZSTD_CHUNKED_TOC in layer["annotations"]

    # The overlay storage first gets the first image, then the second: only the chunks of
    # the 4 changed files (and the table of contents) cross the wire for it.
    await _require_overlay(overlay_containers)
    pull = ("pull", "--tls-verify=false")
    await overlay_containers.podman(*pull, f"{host}/podman/chunked:first")
    path = f"/v2/podman/chunked/blobs/{layer['digest']}"
    with access_records() as log:
        await overlay_containers.podman(*pull, f"{host}/podman/chunked:second")
    requests = [r for r in log.records if r.path == path]
    assert requests and all(r.method == "GET" and r.status == 206 for r in requests), [
        r.getMessage() for r in requests
    ]
    served_bytes = sum(r.bytes_out for r in requests)
    changed = 4 * 32 * 1024
    assert changed < served_bytes < layer["size"] / 4, (served_bytes, layer["size"])

    # What the partial pull put together is the second image's files, byte for byte.
    image = await overlay_containers.inspect(f"{host}/podman/chunked:second")
    assert _files_in(Path(image["GraphDriver"]["Data"]["UpperDir"])) == second_files  # type: ignore[index]
    await sink.wait_for(
        lambda _: any(
            e["digest"] == layer["digest"] for e in events_of(sink, "blob.pulled", "podman/chunked")
        )
    )


async def _require_overlay(containers: Containers) -> None:
    info = await containers.podman("info", "--format", "{{.Store.GraphDriverName}}", check=False)
    if info.returncode != 0 or info.stdout.decode().strip() != "overlay":
        unavailable(
            "podman cannot use the overlay driver here (partial pulls need it): "
            + info.stderr.decode(errors="replace")
        )


def _files_in(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
