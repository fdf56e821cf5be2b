"""Bad input gets a clear OCI error, never a 500, never a write, and the server keeps serving.

One table: each row sends one bad request to a real server that already holds an image
(``setup:v1``) and an open upload session holding 100 bytes. For every row the test checks
the status and OCI code, the error body's shape, that nothing under ``blobs/`` or
``repositories/`` changed, that ``uploads/`` changed only where the row says a session is
discarded, that nothing was left in ``tmp/``, and that the same keep-alive connection still
gets answers afterwards.

Requests go out with httpx's ``target`` extension, so paths such as ``/v2/a/../b/...`` reach
the server exactly as written (httpx would otherwise normalise the dot segments away); rows
about names check the server's message quotes the name it actually received.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import bcrypt
import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import registry_trio
from tests.api_helpers import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    assert_oci_error,
    config_blob,
    digest_of,
    dumps,
    image_manifest,
    index_manifest,
    push_blob,
    push_manifest,
    random_blob,
    snapshot,
)
from tests.conftest import RunningRegistry, make_config, start_registry

REPO = "setup"
SESSION_BYTES = 100
LIMIT = 4 * 1024 * 1024  # the default manifest size limit


@dataclass
class Ctx:
    http: httpx.AsyncClient
    image: bytes  # the manifest of setup:v1
    layer: bytes  # one of its blobs
    session: str  # Location of an upload session holding SESSION_BYTES bytes

    @property
    def session_id(self) -> str:
        return self.session.rsplit("/", 1)[1]

    async def send(
        self,
        method: str,
        target: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send ``target`` verbatim as the request target (no dot-segment normalisation)."""
        if params:
            target = f"{target}?{urlencode(params)}"
        return await self.http.request(
            method,
            "/v2/",
            content=content,
            headers=headers,
            extensions={"target": target.encode()},
        )

    async def put_manifest(
        self, target: str, body: bytes, media_type: str = OCI_MANIFEST
    ) -> httpx.Response:
        return await self.send("PUT", target, content=body, headers={"Content-Type": media_type})


@dataclass(frozen=True)
class Case:
    run: Callable[[Ctx], Awaitable[httpx.Response]]
    status: int
    code: str
    # Text the error's message or detail must contain (for names: what the server received).
    says: str | None = None
    # The request legitimately ends the setup upload session (a failed final PUT).
    discards_session: bool = False


CASES: dict[str, Case] = {}


def case(status: int, code: str, *, says: str | None = None, discards_session: bool = False):
    def register(fn: Callable[[Ctx], Awaitable[httpx.Response]]):
        CASES[fn.__name__] = Case(fn, status, code, says, discards_session)
        return fn

    return register


def upper(digest: str) -> str:
    algorithm, encoded = digest.split(":")
    return f"{algorithm}:{encoded.upper()}"


# -- repository names ------------------------------------------------------------------------


@case(400, "NAME_INVALID", says="'../x'")
async def name_leading_dotdot(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", "/v2/../x/tags/list")


@case(400, "NAME_INVALID", says="'a/../b'")
async def name_dotdot_in_manifest_put(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest("/v2/a/../b/manifests/latest", ctx.image)


@case(400, "NAME_INVALID", says="'a/../b'")
async def name_dotdot_in_monolithic_upload(ctx: Ctx) -> httpx.Response:
    return await ctx.send(
        "POST",
        "/v2/a/../b/blobs/uploads/",
        params={"digest": digest_of(ctx.layer)},
        content=ctx.layer,
    )


@case(400, "NAME_INVALID", says="'a/../setup'")
async def name_percent_encoded_dotdot(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/a/%2e%2e/setup/blobs/{digest_of(ctx.layer)}")


@case(400, "NAME_INVALID", says="'Library/app'")
async def name_upper_case(ctx: Ctx) -> httpx.Response:
    return await ctx.send("POST", "/v2/Library/app/blobs/uploads/")


@case(400, "NAME_INVALID", says="'_layers'")
async def name_leading_underscore(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest("/v2/_layers/manifests/latest", ctx.image)


@case(400, "NAME_INVALID", says="'setup/_manifests'")
async def name_metadata_component(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", "/v2/setup/_manifests/tags/list")


@case(400, "NAME_INVALID", says="'a//b'")
async def name_double_slash(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest("/v2/a//b/manifests/latest", ctx.image)


@case(400, "NAME_INVALID", says="longer than 255")
async def name_300_characters(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{'a' * 300}/manifests/latest", ctx.image)


@case(400, "NAME_INVALID", says="'../setup'")
async def mount_from_bad_name(ctx: Ctx) -> httpx.Response:
    params = {"mount": digest_of(ctx.layer), "from": "../setup"}
    return await ctx.send("POST", "/v2/other/blobs/uploads/", params=params)


# -- malformed digests -----------------------------------------------------------------------


@case(400, "DIGEST_INVALID")
async def digest_too_short(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/blobs/sha256:abc")


@case(400, "DIGEST_INVALID", says="md5")
async def digest_md5_manifest_reference(ctx: Ctx) -> httpx.Response:
    md5 = "md5:" + "0" * 32
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/{md5}", ctx.image)


@case(400, "DIGEST_INVALID")
async def digest_upper_case_hex_delete(ctx: Ctx) -> httpx.Response:
    # The upper-cased name of a blob that exists must not reach (or delete) it.
    return await ctx.send("DELETE", f"/v2/{REPO}/blobs/{upper(digest_of(ctx.layer))}")


@case(400, "DIGEST_INVALID")
async def digest_upper_case_hex_manifest(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/manifests/{upper(digest_of(ctx.image))}")


@case(400, "DIGEST_INVALID")
async def digest_without_colon_on_put(ctx: Ctx) -> httpx.Response:
    params = {"digest": digest_of(ctx.layer).split(":")[1]}
    return await ctx.send("PUT", ctx.session, params=params, content=b"more")


@case(400, "DIGEST_INVALID")
async def digest_short_on_monolithic_post(ctx: Ctx) -> httpx.Response:
    params = {"digest": "sha256:abc"}
    return await ctx.send("POST", f"/v2/{REPO}/blobs/uploads/", params=params, content=b"data")


@case(400, "DIGEST_INVALID")
async def digest_bad_mount(ctx: Ctx) -> httpx.Response:
    params = {"mount": "sha256:abc", "from": REPO}
    return await ctx.send("POST", f"/v2/{REPO}/blobs/uploads/", params=params)


@case(400, "DIGEST_INVALID")
async def digest_bad_referrers_subject(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/referrers/sha256:{'g' * 64}")


# The OCI digest grammar is lower-case hex for sha256/sha512: the upper-cased name of content
# that exists is a malformed digest everywhere, never an alias of it.


@case(400, "DIGEST_INVALID")
async def digest_upper_case_hex_blob_get(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/blobs/{upper(digest_of(ctx.layer))}")


@case(400, "DIGEST_INVALID")
async def digest_upper_case_hex_closing_put(ctx: Ctx) -> httpx.Response:
    # Refused before the body is taken: the session keeps its bytes for a corrected PUT.
    params = {"digest": upper(digest_of(b"x" * SESSION_BYTES))}
    return await ctx.send("PUT", ctx.session, params=params, content=b"last chunk")


@case(400, "DIGEST_INVALID")
async def digest_upper_case_hex_manifest_put(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/{upper(digest_of(ctx.image))}", ctx.image)


@case(400, "DIGEST_INVALID")
async def digest_upper_case_hex_mount(ctx: Ctx) -> httpx.Response:
    params = {"mount": upper(digest_of(ctx.layer)), "from": REPO}
    return await ctx.send("POST", "/v2/other/blobs/uploads/", params=params)


# -- content that does not match its digest --------------------------------------------------


@case(400, "DIGEST_INVALID")
async def wrong_digest_monolithic(ctx: Ctx) -> httpx.Response:
    data = random_blob()
    params = {"digest": digest_of(data + b"!")}
    return await ctx.send("POST", f"/v2/{REPO}/blobs/uploads/", params=params, content=data)


@case(400, "DIGEST_INVALID", discards_session=True)
async def wrong_digest_closing_put(ctx: Ctx) -> httpx.Response:
    params = {"digest": digest_of(b"not what was uploaded")}
    return await ctx.send("PUT", ctx.session, params=params, content=b"last chunk")


@case(400, "DIGEST_INVALID")
async def wrong_digest_manifest_by_digest(ctx: Ctx) -> httpx.Response:
    other = image_manifest(config_blob(), [random_blob()])
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/{digest_of(other)}", ctx.image)


# -- manifests -------------------------------------------------------------------------------


def padded_manifest(ctx: Ctx, size: int) -> bytes:
    """A well-formed manifest of exactly ``size`` bytes (so only its size is wrong)."""
    doc = json.loads(ctx.image)
    doc["annotations"] = {"pad": ""}
    base = len(dumps(doc))
    doc["annotations"]["pad"] = "x" * (size - base)
    body = dumps(doc)
    assert len(body) == size
    return body


@case(413, "MANIFEST_INVALID")
async def manifest_oversize_with_content_length(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/big", padded_manifest(ctx, LIMIT + 1))


@case(413, "MANIFEST_INVALID")
async def manifest_oversize_chunked(ctx: Ctx) -> httpx.Response:
    body = padded_manifest(ctx, LIMIT + 64 * 1024)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    return await ctx.send(
        "PUT",
        f"/v2/{REPO}/manifests/big",
        content=chunks(),
        headers={"Content-Type": OCI_MANIFEST},
    )


@case(400, "MANIFEST_BLOB_UNKNOWN")
async def manifest_missing_blob(ctx: Ctx) -> httpx.Response:
    body = image_manifest(config_blob(), [ctx.layer])  # the config was never pushed
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/missing", body)


@case(400, "MANIFEST_BLOB_UNKNOWN")
async def index_missing_child(ctx: Ctx) -> httpx.Response:
    absent = image_manifest(config_blob(), [random_blob()])
    body = index_manifest([(OCI_MANIFEST, ctx.image), (OCI_MANIFEST, absent)])
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/idx", body, OCI_INDEX)


@case(400, "MANIFEST_INVALID", says="not valid JSON")
async def manifest_invalid_json(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", b'{"schemaVersion": 2,')


@case(400, "MANIFEST_INVALID")
async def manifest_not_utf8(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", b"\xff\xfe\x00{")


@case(400, "MANIFEST_INVALID")
async def manifest_not_an_object(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", b"[]")


@case(400, "MANIFEST_INVALID", says="schemaVersion")
async def manifest_schema_version_1(ctx: Ctx) -> httpx.Response:
    doc = json.loads(ctx.image)
    doc["schemaVersion"] = 1
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", dumps(doc))


@case(400, "MANIFEST_INVALID", says="layers")
async def manifest_without_layers(ctx: Ctx) -> httpx.Response:
    doc = json.loads(ctx.image)
    del doc["layers"]
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", dumps(doc))


@case(400, "MANIFEST_INVALID", says="config.digest")
async def manifest_descriptor_with_bad_digest(ctx: Ctx) -> httpx.Response:
    doc = json.loads(ctx.image)
    doc["config"]["digest"] = "sha256:abc"
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", dumps(doc))


@case(400, "MANIFEST_INVALID", says="size")
async def manifest_descriptor_with_negative_size(ctx: Ctx) -> httpx.Response:
    doc = json.loads(ctx.image)
    doc["layers"][0]["size"] = -1
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", dumps(doc))


@case(400, "MANIFEST_INVALID", says="does not match")
async def manifest_type_differs_from_content_type(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", ctx.image, DOCKER_MANIFEST)


@case(415, "UNSUPPORTED")
async def manifest_unknown_media_type(ctx: Ctx) -> httpx.Response:
    doc = json.loads(ctx.image)
    doc["mediaType"] = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    return await ctx.put_manifest(
        f"/v2/{REPO}/manifests/old",
        dumps(doc),
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    )


# Strict JSON: what a lax parser lets through is read differently by other clients, or broke
# the server (a 500 with a traceback) once parsed.


def with_raw_value(ctx: Ctx, put: Callable[[dict], None], raw: bytes) -> bytes:
    """The setup manifest with one value replaced by ``raw``, JSON that json.dumps cannot write.

    ``put`` stores a placeholder string where ``raw`` goes.
    """
    doc = json.loads(ctx.image)
    put(doc)
    body = dumps(doc)
    assert body.count(b'"@RAW@"') == 1
    return body.replace(b'"@RAW@"', raw)


def set_layer_size(doc: dict) -> None:
    doc["layers"][0]["size"] = "@RAW@"


def set_annotation(doc: dict) -> None:
    doc["annotations"] = {"org.example.note": "@RAW@"}


@case(400, "MANIFEST_INVALID", says="depth")
async def manifest_deeply_nested(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", b"[" * 100_000)


@case(400, "MANIFEST_INVALID", says="depth")
async def manifest_deeply_nested_inside_an_object(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, set_annotation, b"[" * 100_000 + b"]" * 100_000)
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="not valid JSON")
async def manifest_size_with_100000_digits(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, set_layer_size, b"1" * 100_000)
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="int64")
async def manifest_size_beyond_int64(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, set_layer_size, b"9223372036854775808")
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="infinity")
async def manifest_number_with_a_huge_exponent(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, lambda doc: doc.update(extra="@RAW@"), b"1e999999")
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="not valid JSON")
async def manifest_nan(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, lambda doc: doc.update(extra="@RAW@"), b"NaN")
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="not valid JSON")
async def manifest_infinity(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, lambda doc: doc.update(extra="@RAW@"), b"-Infinity")
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="'layers' more than once")
async def manifest_duplicate_key(ctx: Ctx) -> httpx.Response:
    # Which list counts depends on the reader: this registry would check one and a client
    # pull the other.
    body = with_raw_value(ctx, lambda doc: doc.update(extra="@RAW@"), b'0, "layers": []')
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="surrogate")
async def manifest_lone_surrogate_escape(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, set_annotation, b'"\\ud800"')
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="UTF-8")
async def manifest_surrogate_encoded_in_utf8(ctx: Ctx) -> httpx.Response:
    # CESU-8 / "surrogatepass" bytes: not UTF-8, though Python's json.loads(bytes) takes them.
    body = with_raw_value(ctx, set_annotation, b'"\xed\xa0\x80"')
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="annotations must be an object of strings")
async def manifest_annotation_not_a_string(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, set_annotation, b'{"nested": ["deep"]}')
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


@case(400, "MANIFEST_INVALID", says="schemaVersion")
async def manifest_schema_version_as_a_float(ctx: Ctx) -> httpx.Response:
    body = with_raw_value(ctx, lambda doc: doc.update(schemaVersion="@RAW@"), b"2.0")
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/bad", body)


# -- tags ------------------------------------------------------------------------------------


@case(400, "MANIFEST_INVALID", says="'-bad'")
async def tag_leading_dash(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/-bad", ctx.image)


@case(400, "MANIFEST_INVALID", says="128")
async def tag_too_long(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/{'t' * 129}", ctx.image)


@case(400, "MANIFEST_INVALID", says="'a+b'")
async def tag_bad_character_on_put(ctx: Ctx) -> httpx.Response:
    return await ctx.put_manifest(f"/v2/{REPO}/manifests/a+b", ctx.image)


# Looking up or deleting a tag no push could have created finds nothing: 404 (the spec's pull
# endpoints fail only with 404; its DELETE keeps 400 for "deletion is disabled").


@case(404, "MANIFEST_UNKNOWN", says="'a+b'")
async def tag_bad_character_on_delete(ctx: Ctx) -> httpx.Response:
    return await ctx.send("DELETE", f"/v2/{REPO}/manifests/a+b")


@case(404, "MANIFEST_UNKNOWN", says="'.INVALID_MANIFEST_NAME'")
async def tag_leading_dot_on_get(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/manifests/.INVALID_MANIFEST_NAME")


# -- upload sessions and Content-Range -------------------------------------------------------


@case(416, "BLOB_UPLOAD_INVALID")
async def content_range_with_a_gap(ctx: Ctx) -> httpx.Response:
    # A body far larger than the server's request queue, refused before it is read.
    size = 1 << 20
    headers = {"Content-Range": f"{SESSION_BYTES + 100}-{SESSION_BYTES + 99 + size}"}
    return await ctx.send("PATCH", ctx.session, content=random_blob(size), headers=headers)


@case(416, "BLOB_UPLOAD_INVALID")
async def content_range_overlapping(ctx: Ctx) -> httpx.Response:
    headers = {"Content-Range": "50-149"}
    return await ctx.send("PATCH", ctx.session, content=random_blob(100), headers=headers)


@case(416, "BLOB_UPLOAD_INVALID")
async def content_range_malformed(ctx: Ctx) -> httpx.Response:
    headers = {"Content-Range": "bytes=abc"}
    return await ctx.send("PATCH", ctx.session, content=random_blob(100), headers=headers)


@case(416, "BLOB_UPLOAD_INVALID")
async def content_range_on_closing_put(ctx: Ctx) -> httpx.Response:
    headers = {"Content-Range": "500-599"}
    params = {"digest": digest_of(b"whatever")}
    return await ctx.send(
        "PUT", ctx.session, params=params, content=random_blob(100), headers=headers
    )


@case(400, "SIZE_INVALID")
async def content_range_longer_than_the_body(ctx: Ctx) -> httpx.Response:
    # The chunk's bytes are written as they stream in, then rolled back.
    headers = {"Content-Range": f"{SESSION_BYTES}-{SESSION_BYTES + 999}"}
    return await ctx.send("PATCH", ctx.session, content=random_blob(10), headers=headers)


@case(404, "BLOB_UPLOAD_UNKNOWN")
async def upload_unknown_id(ctx: Ctx) -> httpx.Response:
    return await ctx.send("PATCH", f"/v2/{REPO}/blobs/uploads/{'0' * 32}", content=b"data")


@case(404, "BLOB_UPLOAD_UNKNOWN")
async def upload_id_not_an_id(ctx: Ctx) -> httpx.Response:
    return await ctx.send("PUT", f"/v2/{REPO}/blobs/uploads/..", params={"digest": digest_of(b"")})


@case(404, "BLOB_UPLOAD_UNKNOWN")
async def upload_of_another_repository(ctx: Ctx) -> httpx.Response:
    return await ctx.send("PATCH", f"/v2/other/blobs/uploads/{ctx.session_id}", content=b"data")


# -- the rest --------------------------------------------------------------------------------


@case(400, "UNSUPPORTED", says="'ten'")
async def pagination_n_not_a_number(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/tags/list", params={"n": "ten"})


@case(400, "UNSUPPORTED", says="'-1'")
async def pagination_n_negative(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", "/v2/_catalog", params={"n": "-1"})


@case(400, "UNSUPPORTED", says="'²'")
async def pagination_n_a_digit_int_refuses(ctx: Ctx) -> httpx.Response:
    # A digit to str.isdigit(), not to int(): it once made a 500.
    return await ctx.send("GET", "/v2/_catalog", params={"n": "²"})


@case(416, "BLOB_UPLOAD_INVALID", says="range 'bytes=1000-'")
async def range_past_the_end(ctx: Ctx) -> httpx.Response:
    headers = {"Range": f"bytes={len(ctx.layer)}-"}
    return await ctx.send("GET", f"/v2/{REPO}/blobs/{digest_of(ctx.layer)}", headers=headers)


@case(405, "UNSUPPORTED")
async def method_not_allowed_on_a_blob(ctx: Ctx) -> httpx.Response:
    target = f"/v2/{REPO}/blobs/{digest_of(ctx.layer)}"
    return await ctx.send("PATCH", target, content=random_blob(1 << 20))


@case(404, "UNSUPPORTED", says="no such endpoint")
async def unknown_endpoint(ctx: Ctx) -> httpx.Response:
    return await ctx.send("GET", f"/v2/{REPO}/nothing/here")


# -- credentials -----------------------------------------------------------------------------
# Each row is the Authorization header of a request to a server with htpasswd users and an
# RSA token service key. Every one must get 401 UNAUTHORIZED, never a 500. The last three
# were refused before too (PyJWT's own checks); they stay as guards.

TOKEN_SERVICE = "registry-trio"


@functools.cache
def signing_key(kind: str) -> Any:
    keys = {
        "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    }
    return keys[kind]()


def token(kind: str = "rsa", algorithm: str = "RS256", **claims: object) -> str:
    now = int(time.time())
    claims = {"sub": "robot", "aud": TOKEN_SERVICE, "exp": now + 300, **claims}
    return "Bearer " + jwt.encode(claims, signing_key(kind), algorithm=algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


CREDENTIAL_CASES: dict[str, Callable[[], str]] = {
    "es256_token_for_an_rsa_key": lambda: token("p256", "ES256"),
    "es512_token_for_an_rsa_key": lambda: token("p521", "ES512"),
    "token_access_claim_not_a_list": lambda: token(access=5),
    "token_actions_not_strings": lambda: token(
        access=[{"type": "repository", "name": REPO, "actions": [["pull"]]}]
    ),
    "basic_not_ascii": lambda: "Basic dXNlcjpwYXNz\u00e4",
    "basic_password_over_72_bytes": lambda: basic(b"alice:" + b"p" * 73),
    # Guards: refused before as well.
    "token_alg_none": lambda: (
        "Bearer " + jwt.encode({"sub": "robot", "aud": TOKEN_SERVICE}, None, algorithm="none")
    ),
    "token_header_not_an_object": lambda: unsigned(b"[1]"),
    "token_header_of_deep_nesting": lambda: unsigned(b'{"alg": ' + b"[" * 20_000 + b"]" * 20_000),
}


def unsigned(header: bytes) -> str:
    """A token whose header is ``header``, with an empty payload and a junk signature."""
    return f"Bearer {b64url(header)}.{b64url(b'{}')}.AA"


@pytest.fixture
async def guarded_registry(nursery, tmp_path) -> RunningRegistry:
    key = tmp_path / "token-service.pem"
    key.write_bytes(
        signing_key("rsa")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)))
    auth = {
        "htpasswd": {"path": str(htpasswd)},
        "bearer": {
            "realm": "https://auth.example/token",
            "service": TOKEN_SERVICE,
            "cert": str(key),
        },
    }
    access = {"repositories": {"**": {"anonymousPolicy": ["read"]}}}
    config = make_config(tmp_path, http={"auth": auth, "accessControl": access})
    return await start_registry(nursery, config)


@pytest.mark.parametrize("name", list(CREDENTIAL_CASES))
async def test_bad_credentials(guarded_registry, name, caplog):
    async with one_connection(guarded_registry) as http:
        response = await http.get(
            f"/v2/{REPO}/tags/list",
            headers={"Authorization": CREDENTIAL_CASES[name]().encode("latin-1")},
        )
        assert_oci_error(response, 401, "UNAUTHORIZED")
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        port = local_port(response)
        # The same keep-alive connection is still served.
        alive = await http.get("/v2/_catalog")
        assert alive.status_code == 200
        assert local_port(alive) == port
    assert_no_traceback(caplog)


# -- running the table -----------------------------------------------------------------------


async def push_setup_image(http: httpx.AsyncClient) -> tuple[bytes, bytes]:
    config, layer = config_blob(), random_blob(1000)
    await push_blob(http, REPO, config)
    await push_blob(http, REPO, layer)
    image = image_manifest(config, [layer])
    await push_manifest(http, REPO, "v1", image, OCI_MANIFEST)
    return image, layer


async def open_session(http: httpx.AsyncClient) -> str:
    response = await http.post(f"/v2/{REPO}/blobs/uploads/")
    assert response.status_code == 202
    location = response.headers["Location"]
    patch = await http.patch(location, content=random_blob(SESSION_BYTES))
    assert patch.headers["Range"] == f"0-{SESSION_BYTES - 1}"
    return httpx.URL(location).raw_path.decode()  # the cases send it as the request target


def disk(registry: RunningRegistry) -> dict[str, dict[str, bytes]]:
    return {part: snapshot(registry.root / part) for part in ("blobs", "repositories", "uploads")}


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


async def check_case(registry: RunningRegistry, ctx: Ctx, name: str) -> None:
    row = CASES[name]
    before = disk(registry)

    response = await row.run(ctx)
    port = local_port(response)
    entry = assert_oci_error(response, row.status, row.code)
    if row.says is not None:
        said = entry["message"] + " " + json.dumps(entry.get("detail"))
        assert row.says in said, said

    after = disk(registry)
    assert after["blobs"] == before["blobs"]
    assert after["repositories"] == before["repositories"]
    expected_uploads = before["uploads"]
    if row.discards_session:
        expected_uploads = {
            path: data
            for path, data in before["uploads"].items()
            if not path.startswith(ctx.session_id)
        }
    assert after["uploads"] == expected_uploads
    assert list((registry.root / "tmp").iterdir()) == []

    # The same keep-alive connection is still served (no hang, no reconnect).
    with trio.fail_after(10):
        alive = await ctx.http.get("/v2/")
    assert alive.status_code == 200
    assert local_port(alive) == port


def one_connection(registry: RunningRegistry) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=registry.url,
        timeout=10,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Bad input is the client's mistake: nothing in the server log looks like a crash."""
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "unhandled error" not in record.getMessage()
        assert record.levelno < logging.ERROR, record.getMessage()


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input(registry, name, caplog):
    async with one_connection(registry) as http:
        image, layer = await push_setup_image(http)
        ctx = Ctx(http, image, layer, await open_session(http))
        await check_case(registry, ctx, name)
        # What the server held before is still served as it was.
        assert (await http.get(f"/v2/{REPO}/manifests/v1")).content == image
        assert (await http.get(f"/v2/{REPO}/blobs/{digest_of(layer)}")).content == layer
    assert_no_traceback(caplog)


async def test_server_keeps_serving_after_the_whole_table(registry, caplog):
    async with one_connection(registry) as http:
        image, layer = await push_setup_image(http)
        for name in CASES:
            await check_case(registry, Ctx(http, image, layer, await open_session(http)), name)

        assert (await http.get("/v2/")).status_code == 200
        # Still a working registry: a fresh push and pull go through.
        data = random_blob()
        digest = await push_blob(http, "after/table", data)
        assert (await http.get(f"/v2/after/table/blobs/{digest}")).content == data
        assert (await http.get(f"/v2/{REPO}/manifests/v1")).content == image
    assert_no_traceback(caplog)


def test_the_table_covers_every_error_code():
    codes = {row.code for row in CASES.values()}
    assert codes >= {
        "NAME_INVALID",
        "DIGEST_INVALID",
        "MANIFEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "SIZE_INVALID",
        "UNSUPPORTED",
    }
    assert {row.status for row in CASES.values()} >= {400, 404, 413, 415, 416}


# The OCI spec's Error Codes: on a 4xx, "The code field MUST be one of the following".
SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}


def test_every_code_in_the_table_is_one_the_spec_lists():
    assert {row.code for row in CASES.values()} <= SPEC_CODES


def _coded_statuses(tree: ast.AST) -> Iterator[tuple[str, int, int]]:
    """(code, status, line) of each ``RegistryError("CODE", status, ...)`` and ``("CODE",
    status)`` pair (the domain-error mapping) written in the source."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RegistryError":
            pair = node.args[:2]
        elif isinstance(node, ast.Tuple):
            pair = node.elts
        else:
            continue
        if len(pair) == 2 and all(isinstance(p, ast.Constant) for p in pair):
            code, status = (p.value for p in pair)  # type: ignore[attr-defined]
            if isinstance(code, str) and code.isupper() and isinstance(status, int):
                yield code, status, node.lineno


def test_every_4xx_code_the_registry_can_send_is_one_the_spec_lists():
    """Every 4xx written anywhere in the package, not only those the table reaches. 5xx are
    outside the spec's list (it speaks of 4xx): ``UNKNOWN`` (500) and ``UNAVAILABLE`` (503)
    stay, and Docker retries them, where it would give up on ``UNSUPPORTED``."""
    package = Path(registry_trio.__file__).parent
    found = [
        (f"{path.relative_to(package)}:{line}", code, status)
        for path in sorted(package.rglob("*.py"))
        for code, status, line in _coded_statuses(ast.parse(path.read_text()))
    ]
    assert len(found) > 20  # the scan does see the registry's errors
    assert [f for f in found if f[2] < 500 and f[1] not in SPEC_CODES] == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_refused_huge_upload_is_not_read_to_its_end(registry, chunked):
    """A refused request sending 4 GiB gets its error at once, then its connection closed.

    The server reads and drops at most twice the manifest limit more (a small leftover keeps
    the connection, as the table above checks) rather than taking in gigabytes it will not
    store. Only a body of announced length can be told in advance to be too long, so only
    then does the response say ``Connection: close``.
    """
    host, port = registry.url.removeprefix("http://").rsplit(":", 1)
    size, block = 4 << 30, 1 << 20
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    chunk = f"{block:x}\r\n".encode() + bytes(block) + b"\r\n" if chunked else bytes(block)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        f"PATCH /v2/{REPO}/blobs/uploads/no-such-session HTTP/1.1\r\n"
        f"Host: {host}\r\n{framing}\r\n\r\n".encode()
    )
    sent, reply = 0, b""

    async def send_body() -> None:
        nonlocal sent
        with contextlib.suppress(trio.BrokenResourceError):  # the server hung up
            while sent < size:
                await stream.send_all(chunk)
                sent += block

    async def read_reply() -> None:
        nonlocal reply
        with contextlib.suppress(trio.BrokenResourceError):  # a reset after the FIN
            while data := await stream.receive_some(1 << 16):
                reply += data

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            nursery.start_soon(read_reply)
    await stream.aclose()

    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 404"), reply[:200]
    assert (b"connection: close" in head) is not chunked
    assert b"BLOB_UPLOAD_UNKNOWN" in reply
    # What the kernel buffers on both sides, not the 4 GiB the client meant to send.
    assert sent < 256 << 20, sent
    async with httpx.AsyncClient(base_url=registry.url, timeout=10) as http:
        assert (await http.get("/v2/")).status_code == 200
