"""Turning PEM files and JSON Web Key Sets into verification keys.

Used by the rule loader (so `strangler check` reports a bad key file with
its line) and by the JWKS fetcher. Every key is tagged with its family, so
a token can only be checked with a key of the family its algorithm needs:
an RSA public key is never used as an HMAC secret.
"""

from __future__ import annotations

from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from strangler.model import JwtKey

__all__ = [
    "ALGORITHM_FAMILY",
    "MAX_JWKS_BYTES",
    "key_from_pem",
    "keys_from_jwks",
    "secret_key",
]

ALGORITHM_FAMILY = {
    "HS256": "oct",
    "HS384": "oct",
    "HS512": "oct",
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}
MAX_JWKS_BYTES = 1024 * 1024


def _family(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def key_from_pem(data: bytes) -> JwtKey:
    """The public key in a PEM file; a private key is refused (it does not belong)."""
    if b"PRIVATE KEY" in data:
        raise ValueError("the file holds a private key; give the public key only")
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    return JwtKey(kid=None, family=_family(key), key=key)  # type: ignore[arg-type]


def keys_from_jwks(data: bytes) -> tuple[JwtKey, ...]:
    """The signing keys of a JWKS document; private parts and bad keys are refused."""
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"the key set is larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the key set is not JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('expected a JSON object with a "keys" list')

    keys = []
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, dict):
            raise ValueError(f"keys[{index}] is not an object")
        if jwk.get("use", "sig") != "sig":
            continue
        if "d" in jwk or jwk.get("kty") == "oct":
            raise ValueError(
                f"keys[{index}] holds secret material; publish public keys only"
            )
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"keys[{index}].kid must be a string")
        try:
            key = PyJWK(jwk).key
        except (PyJWKError, ValueError, TypeError) as exc:
            raise ValueError(f"keys[{index}] is not a usable key: {exc}") from exc
        keys.append(JwtKey(kid=kid, family=_family(key), key=key))  # type: ignore[arg-type]
    if not keys:
        raise ValueError("the key set has no signing keys")
    return tuple(keys)


def secret_key(secret: str) -> JwtKey:
    """An HMAC secret from the rule file (normally `${VAR}`); short ones are refused."""
    raw = secret.encode("utf-8")
    if len(raw) < 32:
        raise ValueError(f"an HMAC secret must be at least 32 bytes, got {len(raw)}")
    return JwtKey(kid=None, family="oct", key=raw)
