"""Unmodified real clients against the registry: skopeo (Go, containers/image) and oras-py.

A missing client is a failure, not a skip: CI installs both, and a registry that was never
exercised by a real client has not been tested.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import oras.client
import oras.oci
import trio

from tests.oci_layout import layout_blob, read_layout, write_layout

SKOPEO_TIMEOUT = 60
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SBOM_TYPE = "application/vnd.example.sbom.v1+json"
SIGNATURE_TYPE = "application/vnd.example.signature.v1+json"


def _host(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


async def skopeo(*args: str) -> bytes:
    """Run skopeo, failing the test (with its stderr) unless it exits 0; its stdout."""
    binary = shutil.which("skopeo")
    assert binary is not None, "skopeo is not installed (CI must install it)"
    with trio.fail_after(SKOPEO_TIMEOUT):
        result = await trio.run_process(
            [binary, "--insecure-policy", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, (
        f"skopeo {' '.join(args)} exited {result.returncode}:\n{result.stderr.decode()}"
    )
    return result.stdout


async def test_skopeo_copy_roundtrip_keeps_every_digest(registry, http, tmp_path: Path) -> None:
    source = write_layout(
        tmp_path / "source",
        [
            {"etc/hostname": b"registry-trio\n"},
            {"bin/hello": b"#!/bin/sh\necho hello\n" * 100},
            # Fresh bytes each run: skopeo's blob-info cache outlives test runs.
            {"data/blob.bin": os.urandom(64 * 1024)},
        ],
        tag="v1",
    )
    assert len(source.layer_digests) == 3
    remote = f"docker://{_host(registry.url)}/skopeo/roundtrip:v1"

    await skopeo("copy", "--dest-tls-verify=false", f"oci:{source.path}:v1", remote)

    # The registry holds the very manifest and blobs of the layout, byte for byte.
    raw = await skopeo("inspect", "--raw", "--tls-verify=false", remote)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == source.manifest_digest
    assert raw == layout_blob(source.path, source.manifest_digest)
    head = await http.head("/v2/skopeo/roundtrip/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert head.status_code == 200
    assert head.headers["Docker-Content-Digest"] == source.manifest_digest
    for digest in (source.config_digest, *source.layer_digests):
        blob = await http.get(f"/v2/skopeo/roundtrip/blobs/{digest}")
        assert blob.status_code == 200, digest
        assert blob.content == layout_blob(source.path, digest)

    # And back out into a fresh layout: same manifest, same config, same layers.
    await skopeo("copy", "--src-tls-verify=false", remote, f"oci:{tmp_path / 'copy'}:v1")
    copy = read_layout(tmp_path / "copy", "v1")
    assert copy.manifest_digest == source.manifest_digest
    assert copy.config_digest == source.config_digest
    assert copy.layer_digests == source.layer_digests
    for digest in (copy.config_digest, *copy.layer_digests):
        assert layout_blob(copy.path, digest) == layout_blob(source.path, digest)


class _Records(logging.Handler):
    """Collects the access log records (they carry method, path, status and byte counts)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def access_records() -> Iterator[_Records]:
    logger = logging.getLogger("registry_trio.access")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_skopeo_copy_between_repositories_mounts_blobs_and_deletes(
    registry, http, tmp_path: Path
) -> None:
    source = write_layout(
        tmp_path / "source", [{"a.txt": os.urandom(5000)}, {"b.txt": os.urandom(7000)}], tag="v1"
    )
    host = _host(registry.url)
    await skopeo(
        "copy", "--dest-tls-verify=false", f"oci:{source.path}:v1", f"docker://{host}/team/a:v1"
    )
    with access_records() as log:
        await skopeo(
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{host}/team/a:v1",
            f"docker://{host}/team/b:v2",
        )
    # skopeo asks for a cross-repository mount (POST ?mount=&from=) of each layer, which is
    # answered 201 with no body received; only the config (which skopeo reads and writes
    # itself) is uploaded again.
    uploads = [
        r
        for r in log.records
        if str(getattr(r, "path", "")).startswith("/v2/team/b/blobs/uploads/")
    ]
    mounts = [r for r in uploads if r.method == "POST" and r.status == 201]
    assert len(mounts) == len(source.layer_digests), [r.getMessage() for r in uploads]
    assert all(r.bytes_in == 0 for r in mounts)
    config_size = len(layout_blob(source.path, source.config_digest))
    assert sum(r.bytes_in for r in uploads) == config_size
    raw = await skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{host}/team/b:v2")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == source.manifest_digest

    tags = await skopeo("list-tags", "--tls-verify=false", f"docker://{host}/team/b")
    assert json.loads(tags)["Tags"] == ["v2"]
    await skopeo("delete", "--tls-verify=false", f"docker://{host}/team/b:v2")
    gone = await http.get(f"/v2/team/b/manifests/{source.manifest_digest}")
    assert gone.status_code == 404
    # The source repository is untouched by the delete in the other one.
    kept = await http.get(f"/v2/team/a/manifests/{source.manifest_digest}")
    assert kept.status_code == 200


def _oras_push(
    host: str, target: str, path: Path, config: str, subject: oras.oci.Subject | None = None
):
    client = oras.client.OrasClient(hostname=host, insecure=True)
    return client.push(
        target=f"{host}/{target}",
        files=[str(path)],
        manifest_config=config,
        disable_path_validation=True,
        subject=subject,
        quiet=True,
    )


def _oras_pull(host: str, target: str, outdir: Path) -> dict[str, bytes]:
    """Pull with oras-py; file name -> content of what it wrote."""
    client = oras.client.OrasClient(hostname=host, insecure=True)
    paths = client.pull(target=f"{host}/{target}", outdir=str(outdir))
    return {Path(p).name: Path(p).read_bytes() for p in paths}


async def test_oras_artifact_with_subject_is_listed_as_referrer(
    registry, http, tmp_path: Path
) -> None:
    host = _host(registry.url)
    sbom = tmp_path / "sbom.json"
    sbom.write_text(json.dumps({"packages": ["trio", "hypercorn"]}))
    sbom_config = tmp_path / "sbom-config.json"
    sbom_config.write_text("{}")
    signature = tmp_path / "signature.sig"
    signature.write_bytes(b"signed by the test suite")
    signature_config = tmp_path / "signature-config.json"
    signature_config.write_text('{"signer": "tests"}')

    first = await trio.to_thread.run_sync(
        _oras_push, host, "oras/artifact:sbom", sbom, f"{sbom_config}:{SBOM_TYPE}"
    )
    assert first.status_code == 201, first.text
    subject_digest = first.headers["Docker-Content-Digest"]
    fetched = await http.get("/v2/oras/artifact/manifests/sbom", headers={"Accept": OCI_MANIFEST})
    assert fetched.status_code == 200
    assert "sha256:" + hashlib.sha256(fetched.content).hexdigest() == subject_digest
    subject = oras.oci.Subject(OCI_MANIFEST, subject_digest, len(fetched.content))

    second = await trio.to_thread.run_sync(
        _oras_push,
        host,
        "oras/artifact:signature",
        signature,
        f"{signature_config}:{SIGNATURE_TYPE}",
        subject,
    )
    assert second.status_code == 201, second.text
    # The registry tells the client it processed the subject (OCI 1.1, no fallback tag needed).
    assert second.headers["OCI-Subject"] == subject_digest
    referrer_digest = second.headers["Docker-Content-Digest"]
    referrer = await http.get(f"/v2/oras/artifact/manifests/{referrer_digest}")
    assert json.loads(referrer.content)["subject"]["digest"] == subject_digest

    listing = await http.get(f"/v2/oras/artifact/referrers/{subject_digest}")
    assert listing.status_code == 200
    assert listing.headers["Content-Type"].startswith("application/vnd.oci.image.index.v1+json")
    assert "OCI-Filters-Applied" not in listing.headers
    manifests = listing.json()["manifests"]
    assert manifests == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": referrer_digest,
            "size": len(referrer.content),
            "artifactType": SIGNATURE_TYPE,
        }
    ]

    matching = await http.get(
        f"/v2/oras/artifact/referrers/{subject_digest}", params={"artifactType": SIGNATURE_TYPE}
    )
    assert matching.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in matching.json()["manifests"]] == [referrer_digest]

    other = await http.get(
        f"/v2/oras/artifact/referrers/{subject_digest}", params={"artifactType": SBOM_TYPE}
    )
    assert other.status_code == 200
    assert other.headers["OCI-Filters-Applied"] == "artifactType"
    assert other.json()["manifests"] == []

    # oras pulls the artifact back by the digest the referrers listing gave.
    pulled = await trio.to_thread.run_sync(
        _oras_pull, host, f"oras/artifact@{referrer_digest}", tmp_path / "pulled"
    )
    assert pulled == {signature.name: b"signed by the test suite"}

    # The subject itself has no subject: nothing refers to the signature.
    empty = await http.get(f"/v2/oras/artifact/referrers/{referrer_digest}")
    assert empty.status_code == 200 and empty.json()["manifests"] == []


async def test_manifest_put_with_subject_answers_oci_subject(
    registry, http: httpx.AsyncClient
) -> None:
    """The same contract over plain HTTP, with an explicit artifactType and a missing subject."""
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    pushed = await http.post(
        "/v2/plain/artifact/blobs/uploads/", params={"digest": config_digest}, content=config
    )
    assert pushed.status_code == 201
    # OCI 1.1: the subject need not exist in the registry when the referrer is pushed.
    absent_subject = "sha256:" + hashlib.sha256(b"not pushed").hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SIGNATURE_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": absent_subject, "size": 10},
        }
    ).encode()
    response = await http.put(
        "/v2/plain/artifact/manifests/sig", content=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status_code == 201, response.text
    assert response.headers["OCI-Subject"] == absent_subject
    listing = await http.get(f"/v2/plain/artifact/referrers/{absent_subject}")
    assert [(m["digest"], m["artifactType"]) for m in listing.json()["manifests"]] == [
        ("sha256:" + hashlib.sha256(manifest).hexdigest(), SIGNATURE_TYPE)
    ]

    # Without a subject there is no OCI-Subject header.
    plain = json.loads(manifest)
    del plain["subject"]
    response = await http.put(
        "/v2/plain/artifact/manifests/plain",
        content=json.dumps(plain).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert response.status_code == 201
    assert "OCI-Subject" not in response.headers
