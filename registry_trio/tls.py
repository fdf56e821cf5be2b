"""HTTPS as zot configures it (``http.tls``): the files checked before serving, the server's
TLS context, and the name a client certificate gives its connection.

Hypercorn terminates TLS itself, with its own context (:class:`HTTPSConfig` sets its
``certfile``, ``keyfile``, ``ca_certs`` and ``verify_mode``), which trusts ``http.tls.cacert``
alone for client certificates, never the system's CA store. It offers HTTP/1.1 only: the
registry's defences against slow and oversized bodies and its ``Connection: close`` answers
are HTTP/1.1's, and over HTTP/2 (which Hypercorn offers by default) one refused 10 MiB
``PATCH`` made Hypercorn's HTTP/2 stream handling fail with a ``KeyError`` that took the
whole server down.

Who a certificate names: Hypercorn puts nothing of TLS in the ASGI scope, so the context
makes its connections record the name at the end of the handshake, in a context variable
(:func:`peer_name`). Trio runs the handshake on the connection's own task, and Hypercorn
starts each request's task from that task, so every request of the connection, and only
those, inherits the value.
"""

from __future__ import annotations

import contextvars
import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from hypercorn.config import Config as HypercornConfig

from .config import ConfigError, HTTPTLSConfig

__all__ = ["HTTPSConfig", "certificate_name", "check_files", "peer_name"]

_peer_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "registry_trio.tls.peer_name", default=None
)


def peer_name() -> str | None:
    """The name the verified client certificate of this request's connection gives, if any."""
    return _peer_name.get()


def certificate_name(der: bytes) -> str | None:
    """Who a certificate names, as zot takes it: its subject's common name, or, when the
    subject has none (or several), the whole subject (RFC 4514); None for an empty subject.

    Characters that are not printable (a newline in a CN) are escaped: the name goes into
    log lines and access policies, where they could forge a line or pass for another name.
    """
    subject = x509.load_der_x509_certificate(der).subject
    common_names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) == 1 and common_names[0].value:
        name = str(common_names[0].value)
    else:
        name = subject.rfc4514_string()
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name) or None


class _NamingSSLObject(ssl.SSLObject):
    """An SSL connection that, once the handshake is done, records its peer's name."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is complete
        der = self.getpeercert(binary_form=True)
        if der is not None:
            _peer_name.set(certificate_name(der))


class HTTPSConfig(HypercornConfig):
    """Hypercorn's settings for serving ``http.tls``."""

    def __init__(self, tls: HTTPTLSConfig) -> None:
        self.certfile, self.keyfile = tls.cert, tls.key
        if tls.cacert is not None:
            self.ca_certs, self.verify_mode = tls.cacert, ssl.CERT_REQUIRED
        self.alpn_protocols = ["http/1.1"]

    def create_ssl_context(self) -> ssl.SSLContext:
        """Hypercorn's context, whose connections name their peer (see the module doc)."""
        context = super().create_ssl_context()
        assert context is not None  # certfile and keyfile are set
        context.sslobject_class = _NamingSSLObject
        return context


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _certificates(key: str, path: str) -> list[x509.Certificate]:
    data = _read(key, path)  # outside the try: a ConfigError is a ValueError too
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificate") from None


def _private_key(path: str) -> PrivateKeyTypes:
    data = _read("http.tls.key", path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise ConfigError(
            "http.tls.key", f"{path} is encrypted; the server needs the key unencrypted"
        ) from None
    except ValueError:
        raise ConfigError("http.tls.key", f"{path} holds no PEM private key") from None
    except UnsupportedAlgorithm as exc:
        raise ConfigError("http.tls.key", f"cannot load the key in {path}: {exc}") from None


def _public_bytes(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _utc(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def check_files(tls: HTTPTLSConfig) -> None:
    """Read what ``http.tls`` points at and raise :class:`ConfigError` naming the key of the
    first problem: an unreadable file, no PEM in it, a key that is not the certificate's, a
    certificate outside its validity period, a CA file without a certificate.

    Run before serving, so that a bad file stops start-up with one line rather than failing
    every handshake later.
    """
    certificate = _certificates("http.tls.cert", tls.cert)[0]  # the server's, then its chain
    key = _private_key(tls.key)
    if _public_bytes(key) != _public_bytes(certificate):
        raise ConfigError(
            "http.tls.key", f"{tls.key} is not the key of the certificate in {tls.cert}"
        )
    now = datetime.datetime.now(datetime.UTC)
    if now > certificate.not_valid_after_utc:
        raise ConfigError(
            "http.tls.cert",
            f"the certificate in {tls.cert} expired at {_utc(certificate.not_valid_after_utc)}",
        )
    if now < certificate.not_valid_before_utc:
        raise ConfigError(
            "http.tls.cert",
            f"the certificate in {tls.cert} is not valid before "
            f"{_utc(certificate.not_valid_before_utc)}",
        )
    if tls.cacert is not None:
        _certificates("http.tls.cacert", tls.cacert)
    try:
        HTTPSConfig(tls).create_ssl_context()  # what serving will make of the files
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            "http.tls.cert", f"the TLS library refuses it or its key: {exc}"
        ) from None
