"""TIBET provenance tokens: small JSON statements signed by a node's Ed25519 key.

How this works: a token is a JSON object ``{"v","iss","kid","sub","claim","intent","refs",
"iat","exp","jti","sig"}`` (see ``docs/backends.md``, section ``tibet``). ``sig`` is the
node's Ed25519 signature (hex) over the canonical JSON (:func:`mux.frames.canonical_json`,
the same rules as frame headers) of the object without ``sig``. :func:`issue_token` builds
and signs one; :func:`verify_token` checks one offline with nothing but the node's public
key and a clock, raising :class:`~mux.errors.VerificationError` whose ``reason`` is
``malformed``, ``bad_signature``, ``not_yet_valid`` or ``expired``. Pure functions: no I/O.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

import nacl.exceptions
import nacl.signing

from .errors import BadRequest, VerificationError
from .frames import canonical_json
from .signing import NodeKey, load_public_key

__all__ = [
    "DEFAULT_TTL_S",
    "TOKEN_FIELDS",
    "TOKEN_VERSION",
    "issue_token",
    "key_id",
    "signing_bytes",
    "verify_token",
]

TOKEN_VERSION = 1
"""The token format version (``v``)."""

DEFAULT_TTL_S = 3600.0
"""Lifetime of a token when the issuer does not say."""

TOKEN_FIELDS = ("v", "iss", "kid", "sub", "claim", "intent", "refs", "iat", "exp", "jti", "sig")
"""Every field of a token; no other field is allowed."""

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_KID_RE = re.compile(r"^[0-9a-f]{16}$")
_JTI_RE = re.compile(r"^[0-9a-f]{16,64}$")
_SIG_RE = re.compile(r"^[0-9a-f]{128}$")
_MAX_INT = (1 << 53) - 1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def key_id(public_key: str | bytes | nacl.signing.VerifyKey) -> str:
    """The ``kid`` of a key: the first 16 hex digits of its 32-byte public key."""
    return bytes(load_public_key(public_key)).hex()[:16]


def signing_bytes(token: dict[str, Any]) -> bytes:
    """The exact bytes ``sig`` covers: canonical JSON of ``token`` without ``sig``."""
    return canonical_json({k: v for k, v in token.items() if k != "sig"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT


def issue_token(
    key: NodeKey,
    *,
    issuer: str,
    subject: str,
    claim: Any = None,
    intent: str = "tibet:token",
    refs: Sequence[str] = (),
    ttl_s: float = DEFAULT_TTL_S,
    now_ms: int | None = None,
    jti: str | None = None,
) -> dict[str, Any]:
    """Build and sign a token: ``issuer`` (the node agent) vouches ``claim`` for ``subject``.

    ``refs`` are frame ``tbz_hash`` values (64 lowercase hex) the claim is about; the token
    is valid from ``now_ms`` (default: now) for ``ttl_s`` seconds. Raises BadRequest when an
    argument is unusable (``claim`` not JSON, a malformed ref, a non-positive ttl).
    """
    if not isinstance(issuer, str) or not issuer or not isinstance(subject, str) or not subject:
        raise BadRequest("issuer and subject must be non-empty strings")
    if not isinstance(intent, str) or not intent:
        raise BadRequest("intent must be a non-empty string")
    ref_list = list(refs)
    for ref in ref_list:
        if not isinstance(ref, str) or not _HASH_RE.match(ref):
            raise BadRequest(f"refs: {ref!r:.80} is not a frame tbz_hash (64 lowercase hex digits)")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= _MAX_INT / 1000:
        raise BadRequest("ttl_s must be a positive number of seconds")
    iat = _now_ms() if now_ms is None else now_ms
    if not _is_int(iat):
        raise BadRequest("now_ms must be a non-negative integer")
    token: dict[str, Any] = {
        "v": TOKEN_VERSION,
        "iss": issuer,
        "kid": key.public_hex[:16],
        "sub": subject,
        "claim": claim,
        "intent": intent,
        "refs": ref_list,
        "iat": iat,
        "exp": iat + max(1, round(ttl_s * 1000)),
        "jti": jti if jti is not None else secrets.token_hex(16),
    }
    if not isinstance(token["jti"], str) or not _JTI_RE.match(token["jti"]):
        raise BadRequest("jti must be 16 to 64 lowercase hex digits")
    token["sig"] = key.sign(signing_bytes(token))  # canonical_json raises BadRequest for a non-JSON claim
    return token


def _check_shape(token: Any) -> dict[str, Any]:
    """Raise VerificationError("malformed") unless ``token`` has exactly the token's fields."""

    def bad(detail: str) -> VerificationError:
        return VerificationError("malformed", detail)

    if not isinstance(token, dict):
        raise bad("a token is a JSON object")
    missing = [f for f in TOKEN_FIELDS if f not in token]
    if missing:
        raise bad(f"missing field(s): {', '.join(missing)}")
    extra = sorted(set(token) - set(TOKEN_FIELDS))
    if extra:
        raise bad(f"unknown field(s): {', '.join(map(str, extra))}")
    if token["v"] != TOKEN_VERSION or isinstance(token["v"], bool):
        raise bad(f"unsupported version {token['v']!r:.40}")
    for name in ("iss", "sub", "intent"):
        if not isinstance(token[name], str) or not token[name]:
            raise bad(f"{name} must be a non-empty string")
    if not isinstance(token["kid"], str) or not _KID_RE.match(token["kid"]):
        raise bad("kid must be 16 lowercase hex digits")
    refs = token["refs"]
    if not isinstance(refs, list) or not all(isinstance(r, str) and _HASH_RE.match(r) for r in refs):
        raise bad("refs must be a list of frame tbz_hash values (64 lowercase hex digits)")
    if not _is_int(token["iat"]) or not _is_int(token["exp"]):
        raise bad("iat and exp must be integers (milliseconds since the Unix epoch)")
    if token["exp"] <= token["iat"]:
        raise bad("exp must be after iat")
    if not isinstance(token["jti"], str) or not _JTI_RE.match(token["jti"]):
        raise bad("jti must be 16 to 64 lowercase hex digits")
    if not isinstance(token["sig"], str) or not _SIG_RE.match(token["sig"]):
        raise bad("sig must be 128 lowercase hex digits")
    return token


def verify_token(
    token: dict[str, Any],
    public_key: str | bytes | nacl.signing.VerifyKey,
    *,
    now_ms: int | None = None,
    leeway_ms: int = 0,
) -> dict[str, Any]:
    """Check ``token`` offline against the issuing node's ``public_key``; return its claims.

    The checks run in this order, the first failure raising VerificationError with
    ``reason``: ``malformed`` (shape, types, unknown fields, ``exp <= iat``),
    ``bad_signature`` (``kid`` is not this key's, or ``sig`` does not verify: any edited
    field, or signed by another key), ``not_yet_valid`` (``now < iat - leeway``),
    ``expired`` (``now >= exp + leeway``). ``now_ms`` defaults to the wall clock. The
    returned claims are the token without ``sig``.
    """
    checked = _check_shape(token)
    vk = load_public_key(public_key)
    kid = bytes(vk).hex()[:16]
    if checked["kid"] != kid:
        raise VerificationError("bad_signature", f"token kid {checked['kid']} is not key {kid}")
    try:
        payload = signing_bytes(checked)
    except BadRequest as exc:
        raise VerificationError("malformed", f"claim is not canonical JSON: {exc.detail}") from exc
    try:
        vk.verify(payload, bytes.fromhex(checked["sig"]))
    except (ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise VerificationError("bad_signature", f"signature is not by key {kid} over this token") from exc
    now = _now_ms() if now_ms is None else now_ms
    if now < checked["iat"] - leeway_ms:
        raise VerificationError("not_yet_valid", f"issued for {checked['iat']}, now is {now}")
    if now >= checked["exp"] + leeway_ms:
        raise VerificationError("expired", f"expired at {checked['exp']}, now is {now}")
    return {k: v for k, v in checked.items() if k != "sig"}
