"""A throwaway certificate authority and a server certificate for 127.0.0.1, for TLS tests.

On request the same CA also signs a client certificate (for servers that require one).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TLSFiles", "make_tls_files"]


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path
    # Only with make_tls_files(..., client=True): a client certificate the CA signed.
    client_cert: Path | None = None
    client_key: Path | None = None
    # make_tls_files(..., clients=names): name -> (certificate, key), each the CA signed.
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_tls_files(
    directory: Path,
    *,
    client: bool = False,
    server_validity: tuple[datetime.datetime, datetime.datetime] | None = None,
    ca_name: str = "registry-trio test CA",
    clients: Sequence[str] = (),
) -> TLSFiles:
    """A CA certificate, and a certificate it signed for IP 127.0.0.1 with its key (PEM).

    With ``client`` the CA also signs a client certificate (``client.pem``, ``client-key.pem``).
    ``server_validity`` (not before, not after) replaces the server certificate's (from five
    minutes ago to tomorrow, as every other certificate's). Give a second CA another
    ``ca_name``: a verifier looks an issuer up by name, and would take one CA for the other.
    ``clients``: more client certificates, one per common name (``TLSFiles.clients``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5)}
    valid["not_valid_after"] = now + datetime.timedelta(days=1)
    server_from, server_until = server_validity or (
        valid["not_valid_before"],
        valid["not_valid_after"],
    )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(server_from)
        .not_valid_after(server_until)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(_key_pem(key))

    def sign_client(name: str, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_cert.subject)
            .public_key(client_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"])
            .not_valid_after(valid["not_valid_after"])
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(client_key))
        return cert_path, key_path

    if client:
        client_cert, client_key = sign_client(
            "registry-trio test client", directory / "client.pem", directory / "client-key.pem"
        )
        files = replace(files, client_cert=client_cert, client_key=client_key)
    for i, name in enumerate(clients):
        files.clients[name] = sign_client(
            name, directory / f"client{i}.pem", directory / f"client{i}-key.pem"
        )
    return files
