"""Identity and access: real htpasswd files, real signed tokens, a real server and sink."""

from __future__ import annotations

import base64
import datetime
import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import bcrypt
import httpx
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from bench.registry_client import RegistryClient, make_image
from registry_trio.auth import AccessPolicy, Identity, check_files
from registry_trio.config import ConfigError, parse_config
from tests.conftest import make_config, start_registry
from tests.oci_layout import write_layout
from tests.test_real_clients import _host, skopeo
from tests.waiting import eventually

PASSWORDS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw", "carol": "carol-secret-pw"}

ACCESS_CONTROL = {
    "groups": {"devs": {"users": ["bob"]}},
    "repositories": {
        "**": {"defaultPolicy": ["read"], "anonymousPolicy": []},
        "team/**": {
            "policies": [
                {"users": ["alice"], "actions": ["read", "create", "update", "delete"]},
                {"groups": ["devs"], "actions": ["read", "create"]},
            ],
            "defaultPolicy": ["read"],
        },
        "public/*": {"anonymousPolicy": ["read"], "defaultPolicy": ["read", "create"]},
    },
    "adminPolicy": {"users": ["carol"], "actions": ["read", "create", "update", "delete"]},
}


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def write_htpasswd(path: Path) -> Path:
    lines = [f"{user}:{hashed(pw)}" for user, pw in PASSWORDS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def signing_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "token-service.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, public


def make_token(
    key,
    *,
    sub="robot",
    access=(),
    exp_in=300,
    aud="registry-trio",
    iss="tokens",
    algorithm="ES256",
):
    now = int(time.time())
    claims = {
        "sub": sub,
        "aud": aud,
        "iss": iss,
        "iat": now,
        "nbf": now - 5,
        "exp": now + exp_in,
        "access": list(access),
    }
    return jwt.encode(claims, key, algorithm=algorithm)


def auth_overrides(tmp_path, signing_key=None, **http):
    auth: dict[str, object] = {"htpasswd": {"path": str(write_htpasswd(tmp_path / "htpasswd"))}}
    if signing_key is not None:
        auth["bearer"] = {
            "realm": "https://auth.example/token",
            "service": "registry-trio",
            "cert": str(signing_key[1]),
            "issuer": "tokens",
        }
    return {"http": {"auth": auth, "accessControl": ACCESS_CONTROL, **http}}


def config_with_sink(tmp_path: Path, sink, **overrides: object):
    """A config with the events extension on and one HTTP sink at ``sink``."""
    events = {
        "enable": True,
        "sinks": [{"type": "http", "address": sink.url}],
        "queue": {"directory": str(tmp_path / "q")},
    }
    return make_config(tmp_path, extensions={"events": events}, **overrides)


async def pushed_from(registry, sink, headers: dict[str, str]) -> str:
    """Push with ``headers``; the ``request.addr`` the manifest event reports."""
    await push_as(registry, "proxied/app", headers=headers)
    events = await sink.wait_for(lambda evs: any(e["type"].endswith("image.updated") for e in evs))
    return events[-1]["data"]["request"]["addr"]


async def push_as(registry, repository, tag="v1", auth=None, headers=None):
    async with httpx.AsyncClient(base_url=registry.url, auth=auth, headers=headers) as http:
        return await RegistryClient(registry.url, client=http).push_image(
            repository, tag, make_image((512,))
        )


async def test_anonymous_push_gets_401_with_challenge(nursery, tmp_path):
    registry = await start_registry(nursery, make_config(tmp_path, **auth_overrides(tmp_path)))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        base = await http.get("/v2/")
        assert base.status_code == 401
        assert base.headers["WWW-Authenticate"] == 'Basic realm="registry-trio"'
        response = await http.post("/v2/team/app/blobs/uploads/")
        assert response.status_code == 401
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert response.headers["WWW-Authenticate"].startswith("Basic ")
        # anonymousPolicy read on public/*: no login needed there.
        assert (await http.get("/v2/public/app/tags/list")).status_code == 404


async def test_wrong_password_gets_401(nursery, tmp_path):
    registry = await start_registry(nursery, make_config(tmp_path, **auth_overrides(tmp_path)))
    async with httpx.AsyncClient(base_url=registry.url, auth=("alice", "wrong")) as http:
        response = await http.get("/v2/")
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"


def rewrite(path: Path, text: str) -> None:
    """Replace the file's content so that its modification time surely moves."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    if path.stat().st_mtime_ns == before:  # a coarse clock: make the change visible
        os.utime(path, ns=(before + 10**9, before + 10**9))


async def test_htpasswd_changes_take_effect_without_a_restart(nursery, tmp_path, caplog):
    registry = await start_registry(nursery, make_config(tmp_path, **auth_overrides(tmp_path)))
    path = tmp_path / "htpasswd"

    async def status(user: str, password: str) -> int:
        async with httpx.AsyncClient(base_url=registry.url, auth=(user, password)) as http:
            return (await http.get("/v2/")).status_code

    assert await status("alice", PASSWORDS["alice"]) == 200  # now cached, too
    rewrite(path, f"alice:{hashed('alice-new-pw')}\ndave:{hashed('dave-pw')}\n")
    # The file is looked at again at most once a second: the old password stops working,
    # cached or not.
    await eventually(lambda: status("alice", PASSWORDS["alice"]), lambda s: s == 401)
    assert await status("alice", "alice-new-pw") == 200
    assert await status("dave", "dave-pw") == 200
    assert await status("bob", PASSWORDS["bob"]) == 401  # removed

    caplog.set_level(logging.ERROR, logger="registry_trio.auth")
    rewrite(path, "alice:$apr1$not-bcrypt$xyz\n")  # a broken edit keeps the users that were

    async def refused_logged() -> list[str]:
        await status("dave", "dave-pw")  # a request is what makes it look at the file
        return [r.getMessage() for r in caplog.records if "previous htpasswd" in r.getMessage()]

    (logged, *_) = await eventually(refused_logged, bool)
    assert "bcrypt" in logged
    assert await status("dave", "dave-pw") == 200
    assert await status("alice", "alice-new-pw") == 200


async def test_policies_groups_and_actor_in_events(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery,
        config_with_sink(tmp_path, sink, **auth_overrides(tmp_path)),
    )
    # alice: full rights on team/** -> 201, and the event names her.
    response = await push_as(registry, "team/app", auth=("alice", PASSWORDS["alice"]))
    assert response.status_code == 201
    events = await sink.wait_for(lambda evs: any(e["type"].endswith("image.updated") for e in evs))
    pushed = next(e for e in events if e["type"].endswith("image.updated"))
    assert pushed["data"]["actor"] == {"name": "alice", "authType": "basic"}

    # bob (group devs): create on team/** but not update -> a new tag works, moving one not.
    bob = ("bob", PASSWORDS["bob"])
    assert (await push_as(registry, "team/app", "bob-tag", auth=bob)).status_code == 201
    with pytest.raises(httpx.HTTPStatusError) as denied:
        await push_as(registry, "team/app", "v1", auth=bob)
    assert denied.value.response.status_code == 403
    assert denied.value.response.json()["errors"][0]["code"] == "DENIED"

    # A user with only defaultPolicy read on other repos -> 403 DENIED on push.
    with pytest.raises(httpx.HTTPStatusError) as denied:
        await push_as(registry, "other/app", auth=bob)
    assert denied.value.response.status_code == 403
    assert denied.value.response.json()["errors"][0]["code"] == "DENIED"

    # carol (adminPolicy): anything anywhere; alice may also delete in team/**.
    assert (
        await push_as(registry, "other/app", auth=("carol", PASSWORDS["carol"]))
    ).status_code == 201
    async with httpx.AsyncClient(base_url=registry.url, auth=bob) as http:
        assert (await http.delete("/v2/team/app/manifests/bob-tag")).status_code == 403
        catalog = await http.get("/v2/_catalog")
        assert catalog.json()["repositories"] == ["other/app", "team/app"]
    async with httpx.AsyncClient(base_url=registry.url) as http:
        # anonymousPolicy lets anyone read public/*: an unknown repository there is a 404.
        assert (await http.get("/v2/public/x/tags/list")).status_code == 404
        # ...and nothing else, so the anonymous catalog is empty.
        assert (await http.get("/v2/_catalog")).json()["repositories"] == []
    async with httpx.AsyncClient(base_url=registry.url, auth=("alice", PASSWORDS["alice"])) as http:
        assert (await http.delete("/v2/team/app/manifests/bob-tag")).status_code == 202


def test_policy_resolution_is_most_specific_pattern_first():
    config = parse_config({"http": {"accessControl": ACCESS_CONTROL}}).http.access_control
    policy = AccessPolicy(config, authentication=True)
    alice, bob, dave = Identity("alice", "basic"), Identity("bob", "basic"), Identity("dave")
    anonymous = Identity(None)
    assert policy.allowed(alice, "team/a/b") == {"read", "create", "update", "delete"}
    assert policy.allowed(bob, "team/a") == {"read", "create"}  # via group devs
    assert policy.allowed(dave, "team/a") == {"read"}  # defaultPolicy of team/**
    assert policy.allowed(dave, "public/x") == {"read", "create"}
    assert policy.allowed(dave, "public/x/y") == {"read"}  # '*' stays in one component
    assert policy.allowed(anonymous, "public/x") == {"read"}
    assert policy.allowed(anonymous, "team/a") == set()
    assert policy.allowed(Identity("carol"), "anything") == {"read", "create", "update", "delete"}


async def test_bearer_tokens(nursery, tmp_path, signing_key):
    key, _ = signing_key
    registry = await start_registry(
        nursery, make_config(tmp_path, **auth_overrides(tmp_path, signing_key))
    )
    async with httpx.AsyncClient(base_url=registry.url) as http:
        challenge = (await http.post("/v2/team/app/blobs/uploads/")).headers["WWW-Authenticate"]
    assert challenge == (
        'Bearer realm="https://auth.example/token",service="registry-trio",'
        'scope="repository:team/app:pull,push"'
    )

    grant = [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    good = make_token(key, access=grant)
    response = await push_as(registry, "team/app", headers={"Authorization": f"Bearer {good}"})
    assert response.status_code == 201

    other_key = ec.generate_private_key(ec.SECP256R1())
    bad_tokens = {
        "expired": make_token(key, access=grant, exp_in=-60),
        "wrongly signed": make_token(other_key, access=grant),
        "wrong audience": make_token(key, access=grant, aud="someone-else"),
        "wrong issuer": make_token(key, access=grant, iss="mallory"),
    }
    async with httpx.AsyncClient(base_url=registry.url) as http:
        for why, token in bad_tokens.items():
            response = await http.get(
                "/v2/team/app/tags/list", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401, why
            assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        # A valid token without push for this repository: authenticated, so 403.
        pull_only = make_token(
            key, access=[{"type": "repository", "name": "team/app", "actions": ["pull"]}]
        )
        response = await http.post(
            "/v2/team/app/blobs/uploads/", headers={"Authorization": f"Bearer {pull_only}"}
        )
        assert response.status_code == 403


# The token service's key types, each made on first use; 0 signs, 1 is another key of the type.
KEY_TYPES = {
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
}


@functools.cache
def token_service_key(key_type: str, n: int = 0):
    return KEY_TYPES[key_type]()


def public_key_pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed_certificate_pem(key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token service")])
    now = datetime.datetime.now(datetime.UTC)
    ed = isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None if ed else hashes.SHA256())  # EdDSA signs without a separate hash
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


# docs/security.md: "a PEM certificate or public key; RS/ES/PS/EdDSA".
TOKEN_ALGORITHMS = [
    ("RS256", "rsa"),
    ("RS384", "rsa"),
    ("RS512", "rsa"),
    ("PS256", "rsa"),
    ("PS384", "rsa"),
    ("PS512", "rsa"),
    ("ES256", "p256"),
    ("ES384", "p384"),
    ("ES512", "p521"),
    ("EdDSA", "ed25519"),
    ("EdDSA", "ed448"),
]


# For each token service key type: a token signed for another type of key, which the
# registry must refuse as such (PyJWT, handed both, raised a TypeError: a 500).
MISMATCHED = {
    "rsa": ("ES256", "p256"),
    "p256": ("RS256", "rsa"),
    "p384": ("PS384", "rsa"),
    "p521": ("RS512", "rsa"),
    "ed25519": ("ES256", "p256"),
    "ed448": ("RS256", "rsa"),
}


@pytest.mark.parametrize("pem", ["public-key", "certificate"])
@pytest.mark.parametrize(
    ("algorithm", "key_type"),
    TOKEN_ALGORITHMS,
    ids=[a if a != "EdDSA" else f"{a}-{k}" for a, k in TOKEN_ALGORITHMS],
)
async def test_bearer_token_algorithms_and_key_forms(nursery, tmp_path, algorithm, key_type, pem):
    key = token_service_key(key_type)
    cert = tmp_path / "token-service.pem"
    cert.write_bytes(
        public_key_pem(key) if pem == "public-key" else self_signed_certificate_pem(key)
    )
    registry = await start_registry(
        nursery, make_config(tmp_path, **auth_overrides(tmp_path, (key, cert)))
    )
    grant = [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]

    good = make_token(key, access=grant, algorithm=algorithm)
    assert jwt.get_unverified_header(good)["alg"] == algorithm
    response = await push_as(registry, "team/app", headers={"Authorization": f"Bearer {good}"})
    assert response.status_code == 201

    forged = make_token(token_service_key(key_type, 1), access=grant, algorithm=algorithm)
    other_algorithm, other_type = MISMATCHED[key_type]
    mismatched = make_token(token_service_key(other_type), access=grant, algorithm=other_algorithm)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        response = await http.post(
            "/v2/team/app/blobs/uploads/", headers={"Authorization": f"Bearer {forged}"}
        )
        assert response.status_code == 401
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        response = await http.post(
            "/v2/team/app/blobs/uploads/", headers={"Authorization": f"Bearer {mismatched}"}
        )
    assert response.status_code == 401, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNAUTHORIZED"
    assert "not signed with an algorithm the token service's key verifies" in error["message"]


@pytest.mark.parametrize(("trusted", "expected"), [([], "peer"), (["127.0.0.0/8"], "1.2.3.4")])
async def test_forwarded_address_only_from_trusted_proxies(
    nursery, tmp_path, sink, trusted, expected
):
    registry = await start_registry(
        nursery,
        config_with_sink(tmp_path, sink, http={"trustedProxies": trusted}),
    )
    addr = await pushed_from(registry, sink, {"X-Forwarded-For": "9.9.9.9, 1.2.3.4"})
    if expected == "peer":
        assert addr.startswith("127.0.0.1:")
    else:
        assert addr == expected  # the rightmost untrusted hop, not the client-chosen first


async def test_no_secret_in_logs(nursery, tmp_path, signing_key, caplog):
    caplog.set_level(logging.DEBUG)
    key, _ = signing_key
    registry = await start_registry(
        nursery, make_config(tmp_path, **auth_overrides(tmp_path, signing_key))
    )
    token = make_token(
        key, access=[{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    )
    expired = make_token(key, exp_in=-10)
    await push_as(registry, "team/app", auth=("alice", PASSWORDS["alice"]))
    await push_as(registry, "team/app", "t2", headers={"Authorization": f"Bearer {token}"})
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await http.get("/v2/", auth=("alice", "a-wrong-password-123"))
        await http.get("/v2/", headers={"Authorization": f"Bearer {expired}"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "authentication failed" in text  # failed logins are logged...
    for secret in (
        PASSWORDS["alice"],
        "a-wrong-password-123",
        token,
        expired,
        token.split(".")[2],
        expired.split(".")[2],
    ):
        assert secret not in text  # ...but never with what was presented


def test_non_bcrypt_htpasswd_refused_at_start(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    config = parse_config({"http": {"auth": {"htpasswd": {"path": str(path)}}}})
    with pytest.raises(ConfigError, match=r"http\.auth\.htpasswd\.path.*bcrypt"):
        check_files(config)


def test_malformed_bcrypt_hash_refused_at_start(tmp_path):
    # bcrypt itself would raise on it at the first login: a 500 instead of a start-up error.
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{hashed('pw')}\nbob:$2b$12$cut-short\n")
    config = parse_config({"http": {"auth": {"htpasswd": {"path": str(path)}}}})
    with pytest.raises(
        ConfigError, match=r"http\.auth\.htpasswd\.path: .*:2: user 'bob'.*malformed"
    ):
        check_files(config)


async def test_skopeo_push_with_and_without_credentials(nursery, tmp_path):
    registry = await start_registry(nursery, make_config(tmp_path, **auth_overrides(tmp_path)))
    # Fresh bytes: skopeo's blob-info cache outlives test runs.
    source = write_layout(tmp_path / "src", [{"data.bin": os.urandom(2048)}], tag="v1")
    remote = f"docker://{_host(registry.url)}/team/app:v1"

    refused = await trio.run_process(
        [
            shutil.which("skopeo") or "skopeo",
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{source.path}:v1",
            remote,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert refused.returncode != 0
    message = refused.stderr.decode()
    # skopeo passes on our reason: the person reading it learns that a login is needed.
    assert "authentication required" in message, message

    await skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"alice:{PASSWORDS['alice']}",
        f"oci:{source.path}:v1",
        remote,
    )
    async with httpx.AsyncClient(base_url=registry.url, auth=("alice", PASSWORDS["alice"])) as http:
        manifest = await http.get(
            "/v2/team/app/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    assert manifest.status_code == 200
    assert manifest.headers["Docker-Content-Digest"] == source.manifest_digest


async def test_empty_basic_credentials_are_anonymous_not_a_failed_login(nursery, tmp_path):
    """skopeo, podman and buildah answer a Basic challenge with an empty user and password
    when they have none (``--no-creds`` too): that is an anonymous request, as without a
    header, so a public repository is readable to them and the client's login limit stays."""
    overrides = auth_overrides(tmp_path)
    overrides["http"]["auth"]["failedLogins"] = {"limit": 2, "window": "1m"}
    registry = await start_registry(nursery, make_config(tmp_path, **overrides))
    # alice pushes to public/* (defaultPolicy create); anonymousPolicy reads it.
    source = write_layout(tmp_path / "src", [{"data.bin": os.urandom(2048)}], tag="v1")
    await skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"alice:{PASSWORDS['alice']}",
        f"oci:{source.path}:v1",
        f"docker://{_host(registry.url)}/public/app:v1",
    )
    # What skopeo sends with no credentials: Basic base64(":").
    empty = {"Authorization": "Basic " + base64.b64encode(b":").decode()}
    async with httpx.AsyncClient(base_url=registry.url, headers=empty) as http:
        for _ in range(3):  # over the limit of 2, were these failed logins
            tags = await http.get("/v2/public/app/tags/list")
            assert tags.status_code == 200, tags.text
        # Anonymous may not push to team/: asked to log in, as without the header.
        refused = await http.post("/v2/team/app/blobs/uploads/")
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="registry-trio"'
    manifest = await skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--no-creds",
        f"docker://{_host(registry.url)}/public/app:v1",
    )
    assert json.loads(manifest)["layers"][0]["digest"] == source.layer_digests[0]


async def test_token_access_claims_grant_exactly_their_actions(nursery, tmp_path, signing_key):
    """``pull`` → read, ``push`` → create + update, ``delete``, ``*``; per repository."""
    key, _ = signing_key
    registry = await start_registry(
        nursery, make_config(tmp_path, **auth_overrides(tmp_path, signing_key))
    )

    def bearer(*actions: str, name: str = "team/app") -> dict[str, str]:
        grant = [{"type": "repository", "name": name, "actions": list(actions)}]
        return {"Authorization": f"Bearer {make_token(key, access=grant)}"}

    everything, pull, delete = bearer("*"), bearer("pull"), bearer("delete")
    elsewhere = bearer("*", name="team/other")
    image = make_image((512,))
    async with httpx.AsyncClient(base_url=registry.url, headers=everything) as http:
        client = RegistryClient(registry.url, client=http)
        await client.push_image("team/app", "v1", image)
        await client.push_image("team/app", "v2", image)
        assert (await http.get("/v2/team/app/manifests/v1")).status_code == 200

    async with httpx.AsyncClient(base_url=registry.url) as http:
        manifest = "/v2/team/app/manifests/v1"
        # pull: read only.
        assert (await http.get(manifest, headers=pull)).status_code == 200
        for method in ("DELETE", "POST"):
            path = manifest if method == "DELETE" else "/v2/team/app/blobs/uploads/"
            refused = await http.request(method, path, headers=pull)
            assert refused.status_code == 403, method
            assert refused.json()["errors"][0]["code"] == "DENIED"
        # delete: no read, but the deletion itself.
        assert (await http.get(manifest, headers=delete)).status_code == 403
        assert (await http.delete(manifest, headers=delete)).status_code == 202
        # A grant names its repository: everything on team/other is nothing on team/app.
        assert (await http.get("/v2/team/app/manifests/v2", headers=elsewhere)).status_code == 403
        # '*' includes delete; and the challenge asks for the scope a deletion needs.
        assert (
            await http.delete("/v2/team/app/manifests/v2", headers=everything)
        ).status_code == 202
        challenge = (await http.delete("/v2/team/app/manifests/v2")).headers["WWW-Authenticate"]
        # nbf is checked too: a token not yet valid proves nothing, whatever it grants.
        now = int(time.time())
        early = jwt.encode(
            {
                "sub": "robot",
                "aud": "registry-trio",
                "iss": "tokens",
                "iat": now,
                "nbf": now + 300,
                "exp": now + 600,
                "access": [{"type": "repository", "name": "team/app", "actions": ["*"]}],
            },
            key,
            algorithm="ES256",
        )
        not_yet = await http.get(
            "/v2/team/app/tags/list", headers={"Authorization": f"Bearer {early}"}
        )
        assert not_yet.status_code == 401
        assert not_yet.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert challenge.endswith('scope="repository:team/app:delete"')


CATALOG_ACCESS = {
    "repositories": {
        "**": {"defaultPolicy": [], "anonymousPolicy": []},
        "team/**": {"policies": [{"users": ["bob"], "actions": ["read"]}]},
        "public/*": {"anonymousPolicy": ["read"], "defaultPolicy": ["read"]},
    },
    "adminPolicy": {"users": ["carol"], "actions": ["read", "create", "update", "delete"]},
}


async def catalog_pages(registry, auth=None) -> tuple[list[list[str]], list[str | None]]:
    """Walk ``_catalog?n=2`` by its ``Link`` headers: the pages and the links."""
    pages, links, url = [], [], "/v2/_catalog?n=2"
    async with httpx.AsyncClient(base_url=registry.url, auth=auth) as http:
        while url is not None and len(pages) < 10:
            response = await http.get(url)
            assert response.status_code == 200, response.text
            pages.append(response.json()["repositories"])
            link = response.headers.get("Link")
            links.append(link)
            url = link[1 : link.index(">")] if link else None
    return pages, links


async def test_catalog_lists_only_readable_repositories_page_by_page(nursery, tmp_path):
    overrides = auth_overrides(tmp_path)
    overrides["http"]["accessControl"] = CATALOG_ACCESS
    registry = await start_registry(nursery, make_config(tmp_path, **overrides))
    names = ["other/a", "public/a", "public/b", "team/a", "team/b/c", "zzz/x"]
    for name in names:
        await push_as(registry, name, auth=("carol", PASSWORDS["carol"]))

    assert (await catalog_pages(registry, ("carol", PASSWORDS["carol"])))[0] == [
        ["other/a", "public/a"],
        ["public/b", "team/a"],
        ["team/b/c", "zzz/x"],
    ]
    # bob reads team/** and public/*: pages of those only, and no link past his last one
    # (zzz/x follows it, unreadable).
    pages, links = await catalog_pages(registry, ("bob", PASSWORDS["bob"]))
    assert pages == [["public/a", "public/b"], ["team/a", "team/b/c"]]
    assert links == ['</v2/_catalog?n=2&last=public%2Fb>; rel="next"', None]
    # alice is named nowhere: defaultPolicy [] except public/*.
    assert (await catalog_pages(registry, ("alice", PASSWORDS["alice"])))[0] == [
        ["public/a", "public/b"]
    ]
    # Anonymous: public/* only, by anonymousPolicy.
    assert (await catalog_pages(registry))[0] == [["public/a", "public/b"]]


@pytest.mark.parametrize(
    ("trusted", "forwarded", "expected"),
    [
        ([], "for=9.9.9.9", "peer"),  # not from a trusted proxy: the header is ignored
        (["127.0.0.0/8"], "for=9.9.9.9, for=1.2.3.4", "1.2.3.4"),
        (["127.0.0.0/8"], 'for="[2001:db8::7]:4711";proto=https', "2001:db8::7"),
        # Trusted hops are skipped from the right: the client is the first untrusted one.
        (["127.0.0.0/8", "10.0.0.0/8"], "for=1.2.3.4;proto=http, for=10.1.2.3", "1.2.3.4"),
        (["127.0.0.0/8"], 'for="1.2.3.4:4711"', "1.2.3.4"),
        # A trusted hop with a port is still recognised as trusted, and skipped.
        (["127.0.0.0/8", "10.0.0.0/8"], 'for=1.2.3.4, for="10.1.2.3:8080"', "1.2.3.4"),
    ],
    ids=[
        "untrusted",
        "chain",
        "ipv6-with-port",
        "skips-trusted-hops",
        "ipv4-with-port",
        "skips-trusted-hop-with-port",
    ],
)
async def test_forwarded_header_only_from_trusted_proxies(
    nursery, tmp_path, sink, trusted, forwarded, expected
):
    registry = await start_registry(
        nursery,
        config_with_sink(tmp_path, sink, http={"trustedProxies": trusted}),
    )
    addr = await pushed_from(registry, sink, {"Forwarded": forwarded})
    if expected == "peer":
        assert addr.startswith("127.0.0.1:")
    else:
        assert addr == expected


async def test_without_access_control_users_may_do_everything_and_anonymous_nothing(
    nursery, tmp_path
):
    overrides = auth_overrides(tmp_path)
    del overrides["http"]["accessControl"]
    registry = await start_registry(nursery, make_config(tmp_path, **overrides))
    alice = ("alice", PASSWORDS["alice"])
    assert (await push_as(registry, "any/where", auth=alice)).status_code == 201
    assert (await push_as(registry, "any/where", auth=alice)).status_code == 201  # moves v1
    async with httpx.AsyncClient(base_url=registry.url, auth=alice) as http:
        assert (await http.get("/v2/_catalog")).json()["repositories"] == ["any/where"]
        assert (await http.delete("/v2/any/where/manifests/v1")).status_code == 202
    async with httpx.AsyncClient(base_url=registry.url) as http:
        for method, path in [
            ("GET", "/v2/any/where/tags/list"),
            ("POST", "/v2/any/where/blobs/uploads/"),
            ("DELETE", "/v2/any/where/manifests/v1"),
        ]:
            response = await http.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert (await http.get("/v2/_catalog")).json()["repositories"] == []
