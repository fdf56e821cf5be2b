"""HTTP sink options end to end: a real registry delivering to a real receiver (tests/sink.py).

Signing (``hmac``), credentials and custom ``headers``, secrets kept out of logs and the admin
API, TLS (a private CA, no CA, ``insecureSkipVerify``, client certificates) and keep-alive.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from pathlib import Path

import httpx
import pytest

from bench.registry_client import RegistryClient, make_image
from tests.conftest import RunningRegistry, events_config, start_registry
from tests.sink import HTTPSinkServer, Received
from tests.tls_certs import TLSFiles, make_tls_files
from tests.waiting import eventually

WITHIN = 5  # seconds: every wait below is on a local delivery, well under this

PASSWORD = "pw-5f1c9e:not-in-logs"
TOKEN = "tok-8b7d2a-not-in-logs"
HMAC_SECRET = "hmac-3e6f0d-not-in-logs"
ADDRESS_PASSWORD = "addr-pw-91c4-not-in-logs"


def http_sink(receiver: HTTPSinkServer, **extra: object) -> dict[str, object]:
    return {
        "type": "http",
        "address": receiver.url,
        "timeout": "2s",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
        **extra,
    }


async def push(registry: RunningRegistry, repository: str, tag: str, size: int = 1024) -> None:
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image(
            repository, tag, make_image((size,))
        )


async def admin_get(
    registry: RunningRegistry, path: str, params: dict[str, str] | None = None
) -> httpx.Response:
    # No authentication configured: the admin API answers loopback clients.
    async with httpx.AsyncClient(base_url=registry.url) as http:
        response = await http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response


async def sink_statuses(registry: RunningRegistry) -> dict[str, dict]:
    doc = (await admin_get(registry, "/_registry/events/sinks")).json()
    return {status["name"]: status for status in doc["sinks"]}


def signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# -- hmac ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hmac_config", "header", "fmt"),
    [
        # The documented default header, one event per request.
        ({"secret": HMAC_SECRET}, "X-Registry-Signature", "cloudevents"),
        # A header of the operator's choosing, several events per request.
        (
            {"secret": HMAC_SECRET, "header": "X-Hub-Signature-256"},
            "X-Hub-Signature-256",
            "cloudevents-batch",
        ),
    ],
    ids=["default-header", "custom-header-batch"],
)
async def test_hmac_signs_the_exact_body(nursery, tmp_path, sink, hmac_config, header, fmt):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, format=fmt, hmac=hmac_config))
    )
    await push(registry, "signed/app", "v1")
    await sink.wait_for(lambda evs: len(evs) == 4, within=WITHIN)
    assert sink.requests
    for request in sink.requests:
        received = request.headers[header.lower()]
        # Hex HMAC-SHA256 of the bytes as they arrived, recomputed here with the stdlib.
        assert hmac.compare_digest(received, signature(HMAC_SECRET, request.body))
        assert not hmac.compare_digest(received, signature(HMAC_SECRET + "x", request.body))
    # Each request is signed on its own: distinct bodies, distinct signatures.
    signatures = [r.headers[header.lower()] for r in sink.requests]
    assert len(set(signatures)) == len(signatures)


# -- credentials and headers ---------------------------------------------------------------


BASIC = "Basic " + base64.b64encode(f"hook-user:{PASSWORD}".encode()).decode()
CUSTOM_HEADERS = {"X-Tenant": "blue", "X-Trace-Note": "two words, one comma"}


@pytest.mark.parametrize(
    ("credentials", "authorization"),
    [
        ({"username": "hook-user", "password": PASSWORD}, BASIC),
        ({"token": TOKEN}, f"Bearer {TOKEN}"),
    ],
    ids=["basic", "bearer"],
)
async def test_credentials_and_custom_headers_arrive(
    nursery, tmp_path, sink, credentials, authorization
):
    registry = await start_registry(
        nursery,
        events_config(tmp_path, http_sink(sink, credentials=credentials, headers=CUSTOM_HEADERS)),
    )
    await push(registry, "auth/app", "v1")
    await sink.wait_for(lambda evs: len(evs) == 4, within=WITHIN)
    assert len(sink.requests) == 4
    for request in sink.requests:
        assert request.headers["authorization"] == authorization
        for name, value in CUSTOM_HEADERS.items():
            assert request.headers[name.lower()] == value
        # The format's own headers are still there next to the configured ones.
        assert request.headers["content-type"].startswith("application/cloudevents+json")


# -- secrets stay secret -------------------------------------------------------------------


def _texts_of(record: logging.LogRecord) -> list[str]:
    texts = [record.getMessage(), repr(record.msg), repr(record.args)]
    texts += [repr(value) for value in vars(record).values()]
    if record.exc_info:
        texts.append(logging.Formatter().formatException(record.exc_info))
    return texts


async def test_secrets_never_reach_logs_or_admin_status(nursery, tmp_path, sink, caplog):
    caplog.set_level(logging.DEBUG)
    sink.status = 401  # every attempt fails first: the failure path is logged and recorded
    signed = {"secret": HMAC_SECRET}
    with_userinfo = sink.url.replace("http://", f"http://hook-addr:{ADDRESS_PASSWORD}@")
    address_basic = "Basic " + base64.b64encode(f"hook-addr:{ADDRESS_PASSWORD}".encode()).decode()
    names = ("basic", "bearer", sink.url)
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path,
            http_sink(
                sink,
                name="basic",
                credentials={"username": "hook-user", "password": PASSWORD},
                hmac=signed,
            ),
            http_sink(sink, name="bearer", credentials={"token": TOKEN}, hmac=signed),
            # Credentials in the address itself, and no name: the name defaults to the
            # address, with the password left out.
            http_sink(sink, address=with_userinfo),
        ),
    )
    await push(registry, "secret/app", "v1")
    statuses = await eventually(
        lambda: sink_statuses(registry),
        lambda s: all(s[n]["dead"] == 4 and s[n]["pending"] == 0 for n in names),
        within=WITHIN,
    )
    for status in statuses.values():
        assert status["lastError"] == "rejected: HTTP 401 from the sink"
        assert status["address"] == sink.url  # the address may show; it holds no secret
    # The secrets did go out on the wire: what is checked below is only what stays behind.
    assert {r.headers["authorization"] for r in sink.requests} == {
        BASIC,
        f"Bearer {TOKEN}",
        address_basic,
    }

    sink.status = 200  # and the success path, on the same connection
    await push(registry, "secret/app", "v2", size=2048)
    await sink.wait_for(lambda evs: len(evs) == 9, within=WITHIN)  # 2 blobs + manifest, x3

    secrets = [
        PASSWORD,
        BASIC.split()[1],  # the password base64-encoded, as an Authorization header holds it
        TOKEN,
        HMAC_SECRET,
        ADDRESS_PASSWORD,
        address_basic.split()[1],
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert any("401" in m for m in messages), "the rejections were not logged"
    assert any(r.levelno == logging.DEBUG for r in caplog.records), "DEBUG was not captured"
    for record in caplog.records:
        for text in _texts_of(record):
            for secret in secrets:
                assert secret not in text, f"{record.name}: {record.getMessage()}"
    for secret in secrets:
        assert secret not in caplog.text

    admin = [(await admin_get(registry, "/_registry/events/sinks")).text]
    for name in names:
        dead = await admin_get(registry, "/_registry/events/dead", params={"sink": name})
        assert len(dead.json()["deadLetters"]) == 4
        admin.append(dead.text)
    for text in admin:
        for secret in secrets:
            assert secret not in text
    assert sink.url in admin[0]


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls", client=True)


@pytest.fixture
async def https_sink(nursery, tls_files: TLSFiles) -> HTTPSinkServer:
    receiver = HTTPSinkServer(certfile=str(tls_files.cert), keyfile=str(tls_files.key))
    await receiver.start(nursery)
    assert receiver.url.startswith("https://127.0.0.1:")
    return receiver


@pytest.fixture
async def mtls_sink(nursery, tls_files: TLSFiles) -> HTTPSinkServer:
    receiver = HTTPSinkServer(
        certfile=str(tls_files.cert),
        keyfile=str(tls_files.key),
        ca_certs=str(tls_files.ca),
        require_client_cert=True,
    )
    await receiver.start(nursery)
    return receiver


@pytest.mark.parametrize("how", ["caFile", "insecureSkipVerify"])
async def test_tls_delivers_with_the_ca_or_without_verification(
    nursery, tmp_path, https_sink, tls_files, how
):
    tls = {"caFile": str(tls_files.ca)} if how == "caFile" else {"insecureSkipVerify": True}
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(https_sink, tls=tls))
    )
    await push(registry, "tls/app", "v1")
    events = await https_sink.wait_for(lambda evs: len(evs) == 4, within=WITHIN)
    assert events[-1]["type"] == "zotregistry.image.updated"


async def test_tls_unknown_ca_fails_and_events_stay_pending(nursery, tmp_path, https_sink):
    # No caFile: the system trust store does not know the test CA.
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(https_sink)))
    await push(registry, "tls/app", "v1")
    statuses = await eventually(
        lambda: sink_statuses(registry),
        lambda s: s[https_sink.url]["failedAttempts"] >= 2,
        within=WITHIN,
    )
    status = statuses[https_sink.url]
    # The reason an operator needs, from deep in the exception chain.
    assert status["lastError"].startswith("ConnectError: "), status["lastError"]
    assert "CERTIFICATE_VERIFY_FAILED" in status["lastError"], status["lastError"]
    # Retried, never buried: a trust problem is the operator's to fix, not the event's fault.
    assert status["pending"] == 4
    assert status["dead"] == 0 and status["delivered"] == 0
    assert https_sink.requests == []


def _from(request: Received) -> str:
    return request.headers["x-sink"]


@pytest.mark.parametrize("trust", ["caFile", "insecureSkipVerify"])
async def test_tls_client_certificate(nursery, tmp_path, mtls_sink, tls_files, trust):
    # Not checking the server is no reason to withhold our certificate from it.
    server = {"caFile": str(tls_files.ca)} if trust == "caFile" else {"insecureSkipVerify": True}
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path,
            http_sink(
                mtls_sink,
                name="with-cert",
                headers={"X-Sink": "with-cert"},
                tls={
                    **server,
                    "certFile": str(tls_files.client_cert),
                    "keyFile": str(tls_files.client_key),
                },
            ),
            http_sink(
                mtls_sink,
                name="without-cert",
                headers={"X-Sink": "without-cert"},
                tls=server,
            ),
        ),
    )
    await push(registry, "mtls/app", "v1")
    await mtls_sink.wait_for(lambda evs: len(evs) == 4, within=WITHIN)
    statuses = await eventually(
        lambda: sink_statuses(registry),
        lambda s: s["with-cert"]["delivered"] == 4 and s["without-cert"]["failedAttempts"] >= 2,
        within=WITHIN,
    )
    without = statuses["without-cert"]
    assert without["lastError"], without
    assert without["pending"] == 4 and without["delivered"] == 0 and without["dead"] == 0
    assert {_from(r) for r in mtls_sink.requests} == {"with-cert"}


# -- keep-alive ----------------------------------------------------------------------------


async def test_one_connection_carries_every_request(nursery, tmp_path, sink):
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink)))
    for i, tag in enumerate(("v1", "v2", "v3")):
        await push(registry, "keepalive/app", tag, size=1024 * (i + 1))
    # 3 x (2 blobs + manifest) + 1 repository.created, one event per POST.
    await sink.wait_for(lambda evs: len(evs) == 10, within=WITHIN)
    assert len(sink.requests) == 10
    for request in sink.requests:
        assert request.headers["content-type"].startswith("application/cloudevents+json")
        assert isinstance(json.loads(request.body), dict)  # a single event, not a batch
    ports = {request.client for request in sink.requests}
    assert None not in ports
    assert len(ports) == 1, ports


# -- proxy from the environment ------------------------------------------------------------


async def test_environment_proxy_carries_deliveries(nursery, tmp_path, sink, monkeypatch):
    """HTTP_PROXY (with credentials) is used for a sink's address, as httpx's clients did;
    the receiver here plays the proxy, so each request must reach it naming the real host."""
    for name in ("no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://proxy-user:{PASSWORD}@127.0.0.1:{sink.port}")
    # The test's own requests to the registry go direct: NO_PROXY is honoured too.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    target = "hooks.invalid:8080"  # resolves nowhere: only the proxy can carry it
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, address=f"http://{target}/events"))
    )
    await push(registry, "proxied/app", "v1")
    await sink.wait_for(lambda evs: len(evs) == 4, within=WITHIN)
    credentials = base64.b64encode(f"proxy-user:{PASSWORD}".encode()).decode()
    for request in sink.requests:
        assert request.headers["host"] == target
        assert request.headers["proxy-authorization"] == f"Basic {credentials}"
        assert request.headers["user-agent"].startswith("registry-trio/")


async def test_a_retry_after_in_other_digits_is_a_retry_not_a_crash(nursery, tmp_path, sink):
    # "²" is a digit to str.isdigit(), not to float(): the sink's task crashed on it.
    sink.status, sink.retry_after = 503, "²"
    sink_config = {
        "type": "http",
        "address": sink.url,
        "name": "audit",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
    }
    registry = await start_registry(nursery, events_config(tmp_path, sink_config))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image("a/b", "v1", make_image())
        await eventually(
            lambda: http.get("/_registry/events/sinks"),
            lambda r: "HTTP 503" in (r.json()["sinks"][0]["lastError"] or ""),
        )
    sink.status = 200
    await sink.wait_for(lambda events: len(events) >= 4)
