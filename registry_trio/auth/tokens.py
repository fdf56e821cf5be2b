"""Bearer tokens: JWTs signed by the token service, as distribution and zot accept them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config import BearerConfig
from .identity import Identity, Unauthorized

__all__ = ["TokenVerifier"]

# Asymmetric algorithms only: the registry holds a public key, never a shared secret. A key
# verifies only the algorithms of its own type (an ES curve names exactly one): PyJWT
# handed an ES256 token and an RSA key fails with a TypeError rather than refusing it.
_RSA_ALGORITHMS = [f"{family}{bits}" for family in ("RS", "PS") for bits in (256, 384, 512)]
_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

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


def _algorithms(key: Any) -> list[str]:
    """The JWS algorithms ``key`` verifies; ValueError for a key that verifies none."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVE_ALGORITHMS:
        return [_CURVE_ALGORITHMS[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    raise ValueError(
        f"a {type(key).__name__} verifies no accepted algorithm; use an RSA key, an EC key "
        "on P-256, P-384 or P-521, or an Ed25519 or Ed448 key"
    )


def _granted(claim: object) -> dict[str, frozenset[str]]:
    """Repository -> actions from the ``access`` claim; Unauthorized when it is malformed."""
    if not isinstance(claim, list):
        raise Unauthorized("invalid bearer token: the access claim must be a list")
    access: dict[str, frozenset[str]] = {}
    for entry in claim:
        if not isinstance(entry, dict) or entry.get("type") != "repository":
            continue
        actions = entry.get("actions") or []
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise Unauthorized("invalid bearer token: access actions must be a list of strings")
        granted = frozenset().union(*(_ACTIONS.get(action, ()) for action in actions))
        name = str(entry.get("name", ""))
        access[name] = access.get(name, frozenset()) | granted
    return access


class TokenVerifier:
    def __init__(self, config: BearerConfig) -> None:
        self.config = config
        self._key = _load_key(config.cert)
        self._algorithms = _algorithms(self._key)

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self.config.service,
                issuer=self.config.issuer,
                options={"require": ["exp", "aud"]},
            )
        except jwt.InvalidAlgorithmError:
            raise Unauthorized(
                "invalid bearer token: not signed with an algorithm the token service's key "
                f"verifies ({', '.join(self._algorithms)})"
            ) from None
        except jwt.PyJWTError as exc:
            # PyJWT's messages describe the failure, never the token itself.
            raise Unauthorized(f"invalid bearer token: {exc}") from None
        subject = claims.get("sub") or None
        return Identity(subject, "bearer", _granted(claims.get("access") or []))
