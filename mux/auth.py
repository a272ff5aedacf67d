"""Who is calling: node-signed bearer tokens, revocation, per-agent intent permissions.

How this works: the node issues tokens with its own Ed25519 key, so it can check them
without any third service. A token is ``mux1.<claims>.<sig>``: ``claims`` is base64url of
the canonical JSON ``{"v":1, "agent", "iat", "exp", "jti", "intents"?, "agent_key"?}``
(times in Unix milliseconds), ``sig`` is base64url of the Ed25519 signature over
``b"mux-token-v1." + claims_bytes``. ``intents`` (optional) lists the intents the agent may
open (``"iot:*"`` = ``iot`` and everything under it, ``"*"`` = all). ``agent_key``
(optional) registers the agent's own Ed25519 public key, which lets it sign its payloads.
Revoked token ids (``jti``) are listed one per line in ``DATA_DIR/revoked``; the node re-reads
that file when it changes. In open mode (``serve --open``) callers name themselves, as in
the seed, and nothing is checked.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import time
from pathlib import Path

import attrs
import nacl.exceptions
import orjson

from .agents import normalize_agent
from .errors import MuxError
from .frames import canonical_json
from .intents import check_intent_name
from .signing import NodeKey, load_public_key

__all__ = [
    "REVOKED_FILE",
    "AuthError",
    "Authenticator",
    "Grant",
    "Revocations",
    "bearer_token",
    "intent_allowed",
    "issue_token",
    "read_token",
]

TOKEN_PREFIX = "mux1"
REVOKED_FILE = "revoked"
_CONTEXT = b"mux-token-v1."
MAX_TOKEN_CHARS = 4096


class AuthError(MuxError):
    """Authentication or authorization failed (codes ``unauthenticated``, ``bad_token``,
    ``token_expired``, ``token_revoked``, ``agent_mismatch``, ``intent_forbidden``)."""

    code = "unauthenticated"


@attrs.frozen
class Grant:
    """What an authenticated caller may do: be ``agent``, open ``intents`` (None = any),
    until ``exp`` (Unix ms; 0 = never); ``agent_key`` is its registered public key."""

    agent: str
    exp: int = 0
    jti: str = ""
    intents: tuple[str, ...] | None = None
    agent_key: str | None = None

    def allows(self, intent: str) -> bool:
        """True when this grant may open ``intent``."""
        return self.intents is None or intent_allowed(intent, self.intents)

    def check_intent(self, intent: str) -> None:
        """Raise ``intent_forbidden`` unless this grant may open ``intent``."""
        name = check_intent_name(intent)
        if not self.allows(name):
            raise AuthError(
                f"{self.agent} may not open {name!r} (allowed: {', '.join(self.intents or ())})",
                code="intent_forbidden",
            )


def intent_allowed(intent: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """``iot:sensor`` matches ``iot:sensor``, ``iot:*`` and ``*``; ``iot:*`` also matches ``iot``."""
    for pattern in patterns:
        if pattern == "*" or pattern == intent:
            return True
        if pattern.endswith(":*"):
            stem = pattern[:-2]
            if intent == stem or intent.startswith(stem + ":"):
                return True
    return False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(
    key: NodeKey,
    agent: str,
    *,
    ttl_s: float,
    intents: list[str] | None = None,
    agent_key: str | None = None,
    now_ms: int | None = None,
) -> tuple[str, dict[str, object]]:
    """A signed bearer token for ``agent`` valid ``ttl_s`` seconds; returns (token, claims)."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    claims: dict[str, object] = {
        "v": 1,
        "agent": normalize_agent(agent),
        "iat": now,
        "exp": now + int(ttl_s * 1000),
        "jti": secrets.token_hex(16),
    }
    if intents is not None:
        claims["intents"] = [p if p == "*" or p.endswith(":*") else check_intent_name(p) for p in intents]
    if agent_key is not None:
        load_public_key(agent_key)  # must be a valid Ed25519 public key
        claims["agent_key"] = agent_key.lower()
    body = canonical_json(claims)
    sig = key.signing_key.sign(_CONTEXT + body).signature
    return f"{TOKEN_PREFIX}.{_b64(body)}.{_b64(sig)}", claims


def read_token(token: str, key: NodeKey, *, now_ms: int | None = None) -> tuple[Grant, dict[str, object]]:
    """Check a token's form, signature and lifetime (not revocation); return its grant."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise AuthError("malformed token", code="bad_token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthError("malformed token (expected mux1.<claims>.<sig>)", code="bad_token")
    try:
        body, sig = _unb64(parts[1]), _unb64(parts[2])
        key.signing_key.verify_key.verify(_CONTEXT + body, sig)
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError):
        raise AuthError("token signature does not verify with this node's key", code="bad_token") from None
    try:
        claims = orjson.loads(body)
        agent = normalize_agent(claims["agent"])
        exp = int(claims["exp"])
        jti = str(claims["jti"])
        intents = claims.get("intents")
        agent_key = claims.get("agent_key")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, MuxError):
        raise AuthError("token claims are malformed", code="bad_token") from None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if exp <= now:
        raise AuthError(f"token expired {(now - exp) // 1000} s ago", code="token_expired")
    grant = Grant(agent, exp, jti, tuple(intents) if isinstance(intents, list) else None, agent_key)
    return grant, claims


@attrs.define
class Revocations:
    """Revoked token ids in a text file (one ``jti`` per line), re-read when it changes."""

    path: Path | None
    _ids: frozenset[str] = frozenset()
    _stamp: float = -1.0

    def revoke(self, jti: str) -> None:
        """Add ``jti`` to the file."""
        if self.path is None:
            raise MuxError("revocation needs a data directory", code="bad_request")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(jti.strip() + "\n")
        self._stamp = -1.0

    def is_revoked(self, jti: str) -> bool:
        """True if ``jti`` is listed (the file is re-read when its mtime changes)."""
        if self.path is None:
            return False
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return False
        if stamp != self._stamp:
            self._ids = frozenset(line.strip() for line in self.path.read_text().splitlines() if line.strip())
            self._stamp = stamp
        return jti in self._ids


@attrs.define
class Authenticator:
    """Decides who a request is: token mode (default) or open mode."""

    key: NodeKey
    revocations: Revocations
    open_mode: bool = False

    def authenticate(self, token: str | None, claimed: str | None) -> Grant:
        """The caller's grant. Token mode: a valid, unexpired, unrevoked token, and a claimed
        agent (if any) equal to the token's. Open mode: the claimed name, unchecked."""
        if self.open_mode:
            if claimed is None:
                raise AuthError("name the calling agent (?agent=, body agent or X-Mux-Agent)", code="bad_request")
            return Grant(normalize_agent(claimed))
        if not token:
            raise AuthError("a bearer token is required (Authorization: Bearer, ?token= or subprotocol)")
        grant, _ = read_token(token, self.key)
        if self.revocations.is_revoked(grant.jti):
            raise AuthError("token has been revoked", code="token_revoked")
        if claimed is not None and normalize_agent(claimed) != grant.agent:
            raise AuthError(f"the token is for {grant.agent}, not {claimed}", code="agent_mismatch")
        return grant


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (any case of ``Bearer``), else None."""
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
