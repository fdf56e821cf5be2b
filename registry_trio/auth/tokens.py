"""Bearer tokens: JWTs signed by the token service, as distribution and zot accept them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config import BearerConfig
from .identity import Identity, Unauthorized

__all__ = ["TokenVerifier"]

# Asymmetric algorithms only: the registry holds a public key, never a shared secret.
ALGORITHMS = [
    *(f"{family}{bits}" for family in ("RS", "ES", "PS") for bits in (256, 384, 512)),
    "EdDSA",
]

# Token actions (distribution's vocabulary) -> our access actions.
_ACTIONS = {
    "pull": {"read"},
    "push": {"create", "update"},
    "delete": {"delete"},
    "*": {"read", "create", "update", "delete"},
}


def _load_key(path: str) -> Any:
    pem = Path(path).read_bytes()
    if b"BEGIN CERTIFICATE" in pem:
        return x509.load_pem_x509_certificate(pem).public_key()
    return load_pem_public_key(pem)


class TokenVerifier:
    def __init__(self, config: BearerConfig) -> None:
        self.config = config
        self._key = _load_key(config.cert)

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=ALGORITHMS,
                audience=self.config.service,
                issuer=self.config.issuer,
                options={"require": ["exp", "aud"]},
            )
        except jwt.PyJWTError as exc:
            # PyJWT's messages describe the failure, never the token itself.
            raise Unauthorized(f"invalid bearer token: {exc}") from None
        access: dict[str, frozenset[str]] = {}
        for entry in claims.get("access") or ():
            if not isinstance(entry, dict) or entry.get("type") != "repository":
                continue
            granted: set[str] = set()
            for action in entry.get("actions") or ():
                granted |= _ACTIONS.get(action, set())
            name = str(entry.get("name", ""))
            access[name] = access.get(name, frozenset()) | frozenset(granted)
        subject = claims.get("sub") or None
        return Identity(subject, "bearer", access)
