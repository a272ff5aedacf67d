"""The node's Ed25519 key, and offline verification of frames and chains.

``verify_frame`` and ``verify_chain`` need only a frame's exported form (``Frame.to_dict``)
and the node's public key; they never talk to a node. Each failure raises
:class:`~mux.errors.VerificationError` whose ``reason`` names what is wrong.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import nacl.bindings
import nacl.exceptions
import nacl.signing

from .errors import BadRequest, MuxError, VerificationError
from .frames import GENESIS, KINDS, AgentSignature, Frame, agent_signed_bytes, payload_bytes

__all__ = [
    "ChainReport",
    "NodeKey",
    "check_agent_signature",
    "load_public_key",
    "sign_as_agent",
    "verify_agent_frame",
    "verify_chain",
    "verify_frame",
]

KEY_FILE = "node.key"
_crypto_sign = nacl.bindings.crypto_sign


@attrs.frozen
class NodeKey:
    """A node's Ed25519 signing key (PyNaCl)."""

    signing_key: nacl.signing.SigningKey
    _secret: bytes = attrs.field(init=False, repr=False, eq=False)
    """libsodium's 64-byte secret key for ``signing_key`` (signing through the binding skips
    PyNaCl's ``SignedMessage`` and encoders: about 3 to 5 us of each frame's 30 to 40 us)."""

    @_secret.default
    def _secret_key(self) -> bytes:
        return nacl.bindings.crypto_sign_seed_keypair(bytes(self.signing_key))[1]

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random key (in-memory mode)."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> NodeKey:
        """Load ``DATA_DIR/node.key`` (hex seed), creating it with mode 0600 if absent."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            seed = bytes.fromhex(path.read_text().strip())
            return cls(nacl.signing.SigningKey(seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        key = nacl.signing.SigningKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(bytes(key).hex() + "\n")
        return cls(key)

    @property
    def public_hex(self) -> str:
        """The public (verify) key, hex encoded: what verifiers need."""
        return bytes(self.signing_key.verify_key).hex()

    def sign(self, digest: bytes) -> str:
        """Hex Ed25519 signature over ``digest`` (a frame's 32-byte ``tbz_hash``)."""
        return _crypto_sign(digest, self._secret)[:64].hex()


def load_public_key(key: str | bytes | nacl.signing.VerifyKey) -> nacl.signing.VerifyKey:
    """Accept a public key as hex, raw 32 bytes or a VerifyKey."""
    if isinstance(key, nacl.signing.VerifyKey):
        return key
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
        return nacl.signing.VerifyKey(raw)
    except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
        raise BadRequest(f"not an Ed25519 public key: {exc}", code="bad_key") from exc


def _as_frame(frame: Frame | dict[str, Any], index: int | None) -> Frame:
    if isinstance(frame, Frame):
        return frame
    try:
        return Frame.from_dict(frame)
    except BadRequest as exc:
        raise VerificationError("malformed", exc.detail, index=index) from exc


def verify_frame(
    frame: Frame | dict[str, Any],
    public_key: str | bytes | nacl.signing.VerifyKey,
    *,
    index: int | None = None,
    unsigned_ok: bool = False,
) -> Frame:
    """Check one frame's hash and signature offline; return it as a :class:`Frame`.

    Raises VerificationError with reason ``malformed``, ``bad_hash`` (a field or the payload
    was changed), ``bad_signature`` (not signed by this key) or ``unsigned`` (a node that
    signs chain heads left this frame to a later frame's signature: verify the chain, or the
    frames up to the next signed one, with ``verify_chain``).
    """
    f = _as_frame(frame, index)
    if f.kind not in KINDS:
        raise VerificationError("malformed", f"unknown kind {f.kind!r}", index=index, seq=f.seq)
    if f.computed_hash() != f.tbz_hash:
        raise VerificationError(
            "bad_hash", f"seq {f.seq}: content does not match tbz_hash (frame was altered)", index=index, seq=f.seq
        )
    vk = load_public_key(public_key)
    if not f.sig and not unsigned_ok:
        raise VerificationError(
            "unsigned",
            f"seq {f.seq} is covered by the signature of a later frame of its chain: verify the chain",
            index=index,
            seq=f.seq,
        )
    if not f.sig:
        return f
    try:
        vk.verify(bytes.fromhex(f.tbz_hash), bytes.fromhex(f.sig))
    except (ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise VerificationError(
            "bad_signature", f"seq {f.seq}: signature is not by key {bytes(vk).hex()[:16]}...", index=index, seq=f.seq
        ) from exc
    return f


def check_agent_signature(channel_id: str, sender: str, payload: bytes, agent: AgentSignature) -> None:
    """Raise ``bad_agent_signature`` unless ``agent.sig`` is ``agent.key``'s signature over
    the payload (``payload`` = the exact payload bytes of the frame)."""
    if not (1 <= len(agent.nonce) <= 128):
        raise MuxError("agent_nonce must be 1-128 characters", code="bad_agent_signature", channel_id=channel_id)
    message = agent_signed_bytes(channel_id, sender, agent.nonce, hashlib.sha256(payload).hexdigest())
    try:
        load_public_key(agent.key).verify(message, bytes.fromhex(agent.sig))
    except (ValueError, BadRequest, nacl.exceptions.BadSignatureError) as exc:
        raise MuxError(
            f"the payload's agent signature does not verify with {sender}'s key",
            code="bad_agent_signature",
            channel_id=channel_id,
        ) from exc


def verify_agent_frame(frame: Frame | dict[str, Any], agent_key: str | None = None) -> Frame:
    """End-to-end check of who wrote a frame: its ``agent_sig`` must verify with the frame's
    ``agent_key`` (and that must equal ``agent_key`` when you pass the key you trust).
    Check the node's signature with :func:`verify_frame` too: it attests the key was the
    sender's. Raises VerificationError ``not_agent_signed``, ``wrong_agent_key`` or
    ``bad_agent_signature``."""
    f = _as_frame(frame, None)
    if f.agent is None:
        raise VerificationError("not_agent_signed", f"seq {f.seq} carries no agent signature", seq=f.seq)
    if agent_key is not None and agent_key.lower() != f.agent.key.lower():
        raise VerificationError("wrong_agent_key", f"seq {f.seq} was signed by another key", seq=f.seq)
    try:
        check_agent_signature(f.channel_id, f.sender, f.raw, f.agent)
    except MuxError as exc:
        raise VerificationError("bad_agent_signature", exc.detail, seq=f.seq) from exc
    return f


def sign_as_agent(key: nacl.signing.SigningKey, channel_id: str, sender: str, payload: Any, nonce: str) -> str:
    """What an agent sends as ``agent_sig``: hex Ed25519 over ``agent_signed_bytes``."""
    _, raw = payload_bytes(payload)
    message = agent_signed_bytes(channel_id, sender, nonce, hashlib.sha256(raw).hexdigest())
    return key.sign(message).signature.hex()


@attrs.frozen
class ChainReport:
    """What a verified chain holds: channel, frame count, first/last seq, head hash, closed,
    and the parent channel of a fork."""

    channel_id: str
    frames: int
    first_seq: int
    last_seq: int
    head: str
    closed: bool
    fork_of: str | None = None
    """The parent channel when this chain is a fork (its open frame continues the parent's head)."""


def verify_chain(
    frames: Iterable[Frame | dict[str, Any]],
    public_key: str | bytes | nacl.signing.VerifyKey,
    *,
    require_open: bool = True,
) -> ChainReport:
    """Verify a channel's chain offline: every frame, every link, no gap, no reorder.

    ``frames`` is the exported chain in order. With ``require_open`` (default) it must start
    with the channel's open frame (seq 0, ``prev`` = genesis). Raises VerificationError with
    reason ``bad_hash``, ``bad_signature``, ``wrong_channel``, ``bad_start``, ``gap``,
    ``reorder``, ``duplicate``, ``broken_link``, ``after_close``, ``unsigned_tail`` or
    ``empty``. Unsigned frames are accepted when a later frame is signed: every hash links
    to the next, so the later signature covers them.
    """
    vk = load_public_key(public_key)
    items = [_as_frame(f, i) for i, f in enumerate(frames)]
    if not items:
        raise VerificationError("empty", "no frames")
    first = items[0]
    seqs = {f.seq for f in items}
    prev: Frame | None = None
    for i, f in enumerate(items):
        verify_frame(f, vk, index=i, unsigned_ok=True)
        if f.channel_id != first.channel_id:
            raise VerificationError(
                "wrong_channel", f"frame {i} belongs to {f.channel_id}, chain is {first.channel_id}", index=i, seq=f.seq
            )
        if prev is None:
            if require_open and (f.seq != 0 or f.kind != "open"):
                raise VerificationError("bad_start", "chain does not start with the channel's open frame", index=i)
            if require_open and f.prev != GENESIS and _fork_head(f) != f.prev:
                raise VerificationError(
                    "bad_start", "open frame's prev is neither genesis nor the head of the channel it forks", index=i
                )
        else:
            want = prev.seq + 1
            if prev.kind == "close":
                raise VerificationError("after_close", f"seq {f.seq} follows the close frame", index=i, seq=f.seq)
            if f.seq == prev.seq:
                raise VerificationError("duplicate", f"seq {f.seq} appears twice", index=i, seq=f.seq)
            if f.seq < want:
                raise VerificationError("reorder", f"seq {f.seq} comes after seq {prev.seq}", index=i, seq=f.seq)
            if f.seq > want:
                if want in seqs:
                    raise VerificationError("reorder", f"seq {f.seq} comes before seq {want}", index=i, seq=f.seq)
                raise VerificationError("gap", f"seq {want}..{f.seq - 1} missing (frames dropped)", index=i, seq=want)
            if f.prev != prev.tbz_hash:
                raise VerificationError(
                    "broken_link", f"seq {f.seq}: prev does not match the hash of seq {prev.seq}", index=i, seq=f.seq
                )
        prev = f
    assert prev is not None
    if not prev.sig:
        raise VerificationError(
            "unsigned_tail",
            f"seq {prev.seq} and the frames before it back to the last signature are not yet covered by a "
            "signature (export again after the node's next signed frame or seal)",
            index=len(items) - 1,
            seq=prev.seq,
        )
    fork = first.payload.get("fork_of") if first.kind == "open" and isinstance(first.payload, dict) else None
    return ChainReport(
        first.channel_id,
        len(items),
        first.seq,
        prev.seq,
        prev.tbz_hash,
        prev.kind == "close",
        fork.get("channel_id") if isinstance(fork, dict) else None,
    )


def _fork_head(open_frame: Frame) -> str | None:
    fork = open_frame.payload.get("fork_of") if isinstance(open_frame.payload, dict) else None
    head = fork.get("head") if isinstance(fork, dict) else None
    return head if isinstance(head, str) else None
