"""HTTPS (``http.tls``) and client certificates (``http.tls.cacert``), with skopeo and httpx.

Every server here is real: the registry serves TLS through Hypercorn, skopeo (Go's TLS
stack) pushes and pulls through it, and the certificates come from throwaway CAs
(:mod:`tests.tls_certs`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.registry_client import RegistryClient, make_image
from registry_trio.config import Config, parse_config
from registry_trio.server import KEEP_ALIVE_TIMEOUT
from registry_trio.tls import certificate_name
from tests.conftest import make_config, start_registry
from tests.oci_layout import read_layout, write_layout
from tests.procs import server_process, write_config
from tests.test_auth import PASSWORDS, write_htpasswd
from tests.test_operator import free_port
from tests.test_real_clients import SKOPEO_TIMEOUT, access_records, skopeo
from tests.tls_certs import TLSFiles, make_tls_files
from tests.waiting import eventually

CLIENT_NAME = "registry-trio test client"  # the CN of tls_certs' client certificate


def tls_config(
    tmp_path: Path, files: TLSFiles, sink_url: str, *, mtls: bool = False, **http: object
) -> Config:
    """HTTPS with ``files``' certificate; with ``mtls``, clients need one ``files.ca`` signed.
    ``http``: more keys of the ``http`` section."""
    tls = {"cert": str(files.cert), "key": str(files.key)}
    if mtls:
        tls["cacert"] = str(files.ca)
    return make_config(
        tmp_path,
        http={"tls": tls, **http},
        extensions={
            "events": {
                "enable": True,
                "queue": {"directory": str(tmp_path / "queue_data")},
                "sinks": [{"type": "http", "address": sink_url}],
            }
        },
    )


def cert_dir(directory: Path, ca: Path, client: TLSFiles | None = None) -> Path:
    """A Docker-style certificate directory for skopeo: ``*.crt`` CAs, ``*.cert``/``*.key``
    a client certificate."""
    directory.mkdir(parents=True)
    shutil.copy(ca, directory / "ca.crt")
    if client is not None:
        assert client.client_cert is not None and client.client_key is not None
        shutil.copy(client.client_cert, directory / "client.cert")
        shutil.copy(client.client_key, directory / "client.key")
    return directory


async def skopeo_fails(*args: str) -> str:
    """Run skopeo expecting failure; its stderr."""
    binary = shutil.which("skopeo")
    assert binary is not None, "skopeo is not installed (CI must install it)"
    with trio.fail_after(SKOPEO_TIMEOUT):
        result = await trio.run_process(
            [binary, "--insecure-policy", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode != 0, f"skopeo {' '.join(args)} succeeded"
    return result.stderr.decode()


def client_context(ca: Path, client: TLSFiles | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        assert client.client_cert is not None and client.client_key is not None
        context.load_cert_chain(client.client_cert, client.client_key)
    return context


async def get_v2(url: str, verify: ssl.SSLContext | bool = True) -> httpx.Response:
    async with httpx.AsyncClient(verify=verify, timeout=10) as http:
        return await http.get(f"{url}/v2/")


def small_image(tmp_path: Path, name: str):
    # Fresh bytes each run: skopeo's blob-info cache outlives test runs.
    return write_layout(tmp_path / name, [{"data.bin": os.urandom(4096)}], tag="v1")


async def test_skopeo_pushes_and_pulls_over_https_and_urls_say_https(
    nursery, tmp_path: Path, sink
) -> None:
    files = make_tls_files(tmp_path / "tls")
    registry = await start_registry(nursery, tls_config(tmp_path, files, sink.url))
    assert registry.url.startswith("https://127.0.0.1:")
    host = registry.url.removeprefix("https://")
    certs = cert_dir(tmp_path / "certs", files.ca)
    source = small_image(tmp_path, "source")
    remote = f"docker://{host}/secure/app:v1"

    await skopeo("copy", "--dest-cert-dir", str(certs), f"oci:{source.path}:v1", remote)
    await skopeo("copy", "--src-cert-dir", str(certs), remote, f"oci:{tmp_path / 'copy'}:v1")
    copy = read_layout(tmp_path / "copy", "v1")
    assert (copy.manifest_digest, copy.layer_digests) == (
        source.manifest_digest,
        source.layer_digests,
    )
    # skopeo does check the certificate: without the CA it refuses the registry.
    refused = await skopeo_fails("inspect", "--raw", remote)
    assert "certificate" in refused, refused

    # Absolute URLs (Location, events' url) carry the scheme the client used.
    async with httpx.AsyncClient(base_url=registry.url, verify=client_context(files.ca)) as http:
        started = await http.post("/v2/secure/app/blobs/uploads/")
        assert started.status_code == 202
        assert started.headers["Location"].startswith(f"https://{host}/v2/secure/app/blobs/")
    events = await sink.wait_for(
        lambda evs: any(e["type"] == "zotregistry.image.updated" for e in evs)
    )
    pushed = next(e for e in events if e["type"] == "zotregistry.image.updated")
    manifest_path = f"/v2/secure/app/manifests/{source.manifest_digest}"
    assert pushed["data"]["url"] == f"https://{host}{manifest_path}"
    assert pushed["source"] == f"//{host}"
    assert "actor" not in pushed["data"]  # no credentials, no client certificate: anonymous

    # Plain HTTP to the TLS port gets no answer, and the server serves on.
    await _fails_to_connect(f"http://{host}")
    assert (await get_v2(registry.url, client_context(files.ca))).status_code == 200


async def _fails_to_connect(url: str, verify: ssl.SSLContext | bool = True) -> str:
    """GET /v2/ that must fail at the transport (no HTTP answer at all); the error."""
    try:
        response = await get_v2(url, verify)
    except httpx.TransportError as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"{url} answered {response.status_code}")


async def test_client_certificates_name_the_actor_and_no_other_ca_gets_in(
    nursery, tmp_path: Path, sink, monkeypatch
) -> None:
    files = make_tls_files(tmp_path / "tls", client=True)
    stranger = make_tls_files(tmp_path / "other", client=True)
    # The stranger's CA is in "the system's store" (OpenSSL reads SSL_CERT_FILE for it): a
    # server that trusted the system's CAs besides http.tls.cacert would let it in.
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger.ca))
    registry = await start_registry(nursery, tls_config(tmp_path, files, sink.url, mtls=True))
    host = registry.url.removeprefix("https://")
    source = small_image(tmp_path, "source")
    remote = f"docker://{host}/mtls/app:v1"

    with_cert = cert_dir(tmp_path / "certs", files.ca, client=files)
    await skopeo("copy", "--dest-cert-dir", str(with_cert), f"oci:{source.path}:v1", remote)
    raw = await skopeo("inspect", "--raw", "--cert-dir", str(with_cert), remote)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == source.manifest_digest
    events = await sink.wait_for(
        lambda evs: any(e["type"] == "zotregistry.image.updated" for e in evs)
    )
    for event in events:  # the blobs' and the manifest's
        assert event["data"]["actor"] == {"name": CLIENT_NAME, "authType": "mtls"}, event

    # No certificate, or one from another CA: refused at the handshake, by skopeo and httpx.
    without_cert = cert_dir(tmp_path / "ca-only", files.ca)
    await skopeo_fails("inspect", "--raw", "--cert-dir", str(without_cert), remote)
    foreign = cert_dir(tmp_path / "foreign", files.ca, client=stranger)
    await skopeo_fails("inspect", "--raw", "--cert-dir", str(foreign), remote)
    await _fails_to_connect(registry.url, client_context(files.ca))
    await _fails_to_connect(registry.url, client_context(files.ca, client=stranger))
    response = await get_v2(registry.url, client_context(files.ca, client=files))
    assert response.status_code == 200
    # Nothing the refused clients tried reached the registry as an event.
    assert {e["data"]["actor"]["name"] for e in sink.events()} == {CLIENT_NAME}


async def test_credentials_come_before_the_certificate_and_policies_apply_to_its_name(
    nursery, tmp_path: Path, sink
) -> None:
    files = make_tls_files(tmp_path / "tls", client=True)
    access = {
        "repositories": {
            "cert/**": {"policies": [{"users": [CLIENT_NAME], "actions": ["read", "create"]}]},
            "**": {"policies": [{"users": ["alice"], "actions": ["read", "create"]}]},
        }
    }
    htpasswd = {"htpasswd": {"path": str(write_htpasswd(tmp_path / "htpasswd"))}}
    config = tls_config(tmp_path, files, sink.url, mtls=True, auth=htpasswd, accessControl=access)
    registry = await start_registry(nursery, config)
    context = client_context(files.ca, client=files)

    async def push(repository: str, auth: tuple[str, str] | None = None) -> int:
        async with httpx.AsyncClient(base_url=registry.url, verify=context, auth=auth) as http:
            try:
                await RegistryClient(registry.url, client=http).push_image(
                    repository, "v1", make_image((256,))
                )
            except httpx.HTTPStatusError as exc:
                return exc.response.status_code
        return 201

    async def actor_of(repository: str) -> dict[str, str]:
        events = await sink.wait_for(
            lambda evs: any(e["subject"] == f"{repository}:v1" for e in evs)
        )
        return next(e for e in events if e["subject"] == f"{repository}:v1")["data"]["actor"]

    # No credentials: the certificate's name is the user, and the policies name it.
    assert await push("cert/app") == 201
    assert await actor_of("cert/app") == {"name": CLIENT_NAME, "authType": "mtls"}
    assert await push("other/app") == 403
    # Credentials, when given, decide: right ones name their user, wrong ones are refused
    # (the certificate is no fallback for a failed login).
    assert await push("other/app", ("alice", PASSWORDS["alice"])) == 201
    assert await actor_of("other/app") == {"name": "alice", "authType": "basic"}
    assert await push("cert/app", ("alice", "wrong")) == 401


def _self_signed(*attributes: x509.NameAttribute) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(list(attributes))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_a_certificate_names_its_common_name_else_its_subject_and_nothing_unprintable():
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")
    assert (
        certificate_name(_self_signed(x509.NameAttribute(NameOID.COMMON_NAME, "ci"), org)) == "ci"
    )
    assert certificate_name(_self_signed(org)) == "O=Acme"
    two = _self_signed(
        x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.COMMON_NAME, "b")
    )
    assert certificate_name(two) == "CN=b,CN=a"
    assert certificate_name(_self_signed()) is None
    # A CA that signs what it is asked could put a line break in a name: it cannot reach a
    # log line or a policy unescaped.
    forged = _self_signed(x509.NameAttribute(NameOID.COMMON_NAME, "bob\nINFO forged"))
    assert certificate_name(forged) == "bob\\nINFO forged"


async def test_each_connection_is_named_by_its_own_certificate(
    nursery, tmp_path: Path, sink
) -> None:
    names = ("alice-laptop", "bob-ci", "carol-build")
    files = make_tls_files(tmp_path / "tls", clients=names)
    registry = await start_registry(nursery, tls_config(tmp_path, files, sink.url, mtls=True))
    rounds = 5

    async def push_blobs(name: str) -> None:
        context = ssl.create_default_context(cafile=str(files.ca))
        context.load_cert_chain(*files.clients[name])
        # One keep-alive connection per client, its requests interleaved with the others'.
        async with httpx.AsyncClient(base_url=registry.url, verify=context) as http:
            for _ in range(rounds):
                data = os.urandom(256)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                pushed = await http.post(
                    f"/v2/{name}/blobs/uploads/", params={"digest": digest}, content=data
                )
                assert pushed.status_code == 201
                await trio.lowlevel.checkpoint()

    with access_records() as log:
        async with trio.open_nursery() as clients:
            for name in names:
                clients.start_soon(push_blobs, name)

        async def logged() -> int:  # a request's line follows its response
            return len(log.records)

        await eventually(logged, lambda n: n == rounds * len(names))
    events = await sink.wait_for(lambda evs: len(evs) == rounds * len(names))
    for event in events:
        assert event["data"]["actor"]["name"] == event["data"]["name"], event
    for record in log.records:
        assert str(record.path).startswith(f"/v2/{record.actor}/"), record.getMessage()


async def test_a_client_that_never_completes_the_handshake_is_dropped(
    nursery, tmp_path: Path, sink
) -> None:
    files = make_tls_files(tmp_path / "tls")
    registry = await start_registry(nursery, tls_config(tmp_path, files, sink.url))
    port = int(registry.url.rsplit(":", 1)[1])
    # Hypercorn's own limit is 60 s: this fails unless the server applies its idle timeout.
    with trio.fail_after(KEEP_ALIVE_TIMEOUT + 5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"\x16")  # the first byte of a ClientHello, then nothing
            # Closed (b"") or reset (BrokenResourceError): dropped either way.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(1024) == b""
    assert (await get_v2(registry.url, client_context(files.ca))).status_code == 200


async def test_http2_clients_are_served_http_1_1(nursery, tmp_path: Path, sink) -> None:
    files = make_tls_files(tmp_path / "tls")
    registry = await start_registry(nursery, tls_config(tmp_path, files, sink.url))
    context = client_context(files.ca)
    async with httpx.AsyncClient(base_url=registry.url, verify=context, http2=True) as http:
        assert (await http.get("/v2/")).http_version == "HTTP/1.1"
        # Over HTTP/2 this refusal (an unknown upload, a body past what is drained) took the
        # server down. Over HTTP/1.1 the answer is a 404 and a closed connection, which the
        # client may see reset before it reads the answer: either way, the server serves on.
        with contextlib.suppress(httpx.TransportError):
            refused = await http.patch("/v2/h2/app/blobs/uploads/nosuch", content=bytes(10 << 20))
            assert refused.status_code == 404
    assert (await get_v2(registry.url, context)).status_code == 200


async def test_events_commands_talk_https_and_say_why_a_client_certificate_stops_them(
    nursery, tmp_path: Path, sink
) -> None:
    files = make_tls_files(tmp_path / "tls", client=True)

    async def serve_and_ask(name: str, tls: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        directory = tmp_path / name
        directory.mkdir()
        events = {
            "enable": True,
            "queue": {"directory": str(directory / "queue_data")},
            "sinks": [{"type": "http", "address": sink.url, "name": "audit"}],
        }
        config = write_config(
            directory, http={"port": free_port(), "tls": tls}, extensions={"events": events}
        )
        await start_registry(nursery, parse_config(json.loads(config.read_text())))
        return await trio.run_process(
            [sys.executable, "-m", "registry_trio", "events", "status", "-c", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    # HTTPS: the admin API answers (the server's own certificate is the trust anchor).
    with access_records() as log:
        answered = await serve_and_ask("https", {"cert": str(files.cert), "key": str(files.key)})
    assert answered.returncode == 0, answered.stderr.decode()
    assert answered.stdout.decode().splitlines()[1].startswith("audit")
    assert [r.status for r in log.records if r.path == "/_registry/events/sinks"] == [200]

    # Mutual TLS: the commands have no client certificate; they say so, in one line.
    mtls = {"cert": str(files.cert), "key": str(files.key), "cacert": str(files.ca)}
    refused = await serve_and_ask("mtls", mtls)
    assert refused.returncode == 1
    (line,) = refused.stderr.decode().splitlines()
    assert line.startswith("registry-trio: cannot talk to the server at https://127.0.0.1:")
    assert "client certificate" in line and "http.tls.cacert" in line


def _encrypted_key(files: TLSFiles, path: Path) -> Path:
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def _broken(tmp_path: Path, case: str) -> dict[str, str]:
    """An ``http.tls`` block with one thing wrong."""
    files = make_tls_files(tmp_path / "tls")
    good = {"cert": str(files.cert), "key": str(files.key), "cacert": str(files.ca)}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    if case == "cert unreadable":
        return {**good, "cert": str(tmp_path / "missing.pem")}
    if case == "cert not PEM":
        return {**good, "cert": str(garbage)}
    if case == "key not PEM":
        return {**good, "key": str(files.cert)}
    if case == "key encrypted":
        return {**good, "key": str(_encrypted_key(files, tmp_path / "encrypted.pem"))}
    if case == "key of another certificate":
        return {**good, "key": str(make_tls_files(tmp_path / "other").key)}
    if case == "cert expired":
        old = make_tls_files(tmp_path / "old", server_validity=(now - 3 * day, now - day))
        return {**good, "cert": str(old.cert), "key": str(old.key)}
    if case == "cert not yet valid":
        new = make_tls_files(tmp_path / "new", server_validity=(now + day, now + 3 * day))
        return {**good, "cert": str(new.cert), "key": str(new.key)}
    if case == "cacert unreadable":
        return {**good, "cacert": str(tmp_path)}  # a directory
    assert case == "cacert not PEM"
    return {**good, "cacert": str(garbage)}


@pytest.mark.parametrize(
    ("case", "key", "reason"),
    [
        ("cert unreadable", "http.tls.cert", "cannot read"),
        ("cert not PEM", "http.tls.cert", "holds no PEM certificate"),
        ("key not PEM", "http.tls.key", "holds no PEM private key"),
        ("key encrypted", "http.tls.key", "is encrypted"),
        ("key of another certificate", "http.tls.key", "is not the key of the certificate"),
        ("cert expired", "http.tls.cert", "expired at"),
        ("cert not yet valid", "http.tls.cert", "is not valid before"),
        ("cacert unreadable", "http.tls.cacert", "cannot read"),
        ("cacert not PEM", "http.tls.cacert", "holds no PEM certificate"),
    ],
)
def test_bad_tls_files_stop_serve_and_verify_with_one_line_naming_the_key(
    tmp_path: Path, case: str, key: str, reason: str
) -> None:
    config = write_config(tmp_path, http={"tls": _broken(tmp_path, case)})
    for command in ("serve", "verify"):
        result = subprocess.run(
            [sys.executable, "-m", "registry_trio", command, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"registry-trio: configuration error: {key}: "), line
        assert reason in line, line
        assert result.stdout == "" and "listening" not in result.stderr


async def test_the_command_line_serves_https_from_every_worker(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls", client=True)
    tls = {"cert": str(files.cert), "key": str(files.key), "cacert": str(files.ca)}
    config = write_config(tmp_path, http={"tls": tls, "workers": 2})
    checked = await trio.run_process(
        [sys.executable, "-m", "registry_trio", "verify", "-c", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    async with server_process(config) as server:
        assert server.url.startswith("https://127.0.0.1:")
        await server.wait_for_output(b"(2 workers;")
        # Each request on a new connection: whichever worker accepts it does TLS and knows
        # the client by its certificate.
        for _ in range(6):
            response = await get_v2(server.url, client_context(files.ca, client=files))
            assert response.status_code == 200
        await server.wait_for_output(f"{CLIENT_NAME} GET /v2/".encode())  # the access line
        await _fails_to_connect(server.url, client_context(files.ca))
