"""Frames: the signed, hash-chained records of a channel's history.

How this works: every event of a channel (its open, each payload, its close) is a
:class:`Frame`. A frame's ``tbz_hash`` is SHA-256 over a canonical header (see
``docs/frames.md``) that names the channel, the frame's place in it (``seq``, ``prev``), who
sent it to whom, when, and the SHA-256 of its payload. ``prev`` is the ``tbz_hash`` of the
channel's previous frame, so the frames of a channel form a hash chain from open to close.
``sig`` is the node's Ed25519 signature over the 32 raw bytes of ``tbz_hash``.

This module is pure: no I/O, no clock (``ts`` is passed in).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import attrs
import orjson

from .errors import BadRequest

__all__ = [
    "AGENT_CONTEXT",
    "AGENT_SIGNATURE_HELD_BYTES",
    "FRAME_HELD_BYTES",
    "FRAME_VERSION",
    "AgentSignature",
    "agent_signed_bytes",
    "GENESIS",
    "KINDS",
    "ChainHead",
    "Frame",
    "canonical_json",
    "exact",
    "frame_hash",
    "held_bytes",
    "payload_bytes",
]

FRAME_VERSION = 1
GENESIS = "0" * 64
"""``prev`` of a channel's first (open) frame."""
KINDS = ("open", "data", "close", "seal")

_sha256 = hashlib.sha256
_SORT = orjson.OPT_SORT_KEYS


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: UTF-8, keys sorted, no whitespace (see ``docs/frames.md``)."""
    try:
        return orjson.dumps(value, option=_SORT)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise BadRequest(f"payload is not JSON-serializable: {exc}", code="bad_payload") from exc


def exact(data: bytes) -> bytes:
    """An exact-size copy of ``orjson.dumps`` output, for bytes that are kept or piled up.

    orjson hands back its whole working buffer: 1 KiB for ``{}`` with orjson 3.10, 4 KiB
    with 3.13, and 8 KiB for a 600-byte frame (measured with ``tracemalloc``).
    """
    return bytes(memoryview(data))


def payload_bytes(payload: Any) -> tuple[str, bytes]:
    """The payload's encoding name and the exact bytes its hash covers."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return "bytes", bytes(payload)
    return "json", exact(canonical_json(payload))  # frames keep these (ledger, mailboxes)


def frame_hash(
    *,
    channel_id: str,
    seq: int,
    kind: str,
    sender: str,
    target: str,
    intent: str,
    ts: int,
    prev: str,
    enc: str,
    payload_sha256: str,
    agent: AgentSignature | None = None,
) -> str:
    """The ``tbz_hash`` (hex SHA-256) of a frame header, as specified in ``docs/frames.md``."""
    header: dict[str, Any] = {  # in sorted order: the canonical form without sorting again
        "channel_id": channel_id,
        "enc": enc,
        "intent": intent,
        "kind": kind,
        "payload_sha256": payload_sha256,
        "prev": prev,
        "sender": sender,
        "seq": seq,
        "target": target,
        "ts": ts,
        "v": FRAME_VERSION,
    }
    if agent is None:
        return _sha256(orjson.dumps(header)).hexdigest()
    header.update(agent_key=agent.key, agent_nonce=agent.nonce, agent_sig=agent.sig)
    return _sha256(orjson.dumps(header, option=_SORT)).hexdigest()


@attrs.frozen
class AgentSignature:
    """An agent's own Ed25519 signature over a payload it sent (see ``docs/frames.md``):
    ``key`` its public key (hex), ``nonce`` its own unique string, ``sig`` hex."""

    key: str
    nonce: str
    sig: str


AGENT_CONTEXT = b"mux-agent-v1."


def agent_signed_bytes(channel_id: str, sender: str, nonce: str, payload_sha256: str) -> bytes:
    """The bytes an agent signs: ``b"mux-agent-v1." + canonical_json({channel_id, nonce,
    payload_sha256, sender})``."""
    return AGENT_CONTEXT + orjson.dumps(
        {"channel_id": channel_id, "nonce": nonce, "payload_sha256": payload_sha256, "sender": sender},
        option=_SORT,
    )


FRAME_HELD_BYTES = 560
"""Memory a kept frame (in the in-memory ledger, a mailbox) holds beside its payload bytes:
the frame object, its hash and signature (hex), seq and timestamp, the payload's bytes
object (CPython 3.11, 64-bit; ``tests/test_memory_ledger.py`` measures it)."""
AGENT_SIGNATURE_HELD_BYTES = 320
"""What a frame the sender signed itself holds more, beside its nonce's characters."""

_JSON = object()
"""``Frame._payload`` of a JSON frame: the value lives in ``raw``."""


@attrs.frozen
class Frame:
    """One signed record of a channel: open, data or close.

    ``payload`` is a JSON value, or ``bytes`` for binary (media) frames. ``raw`` holds the
    exact payload bytes the hash covers (canonical JSON, or the binary itself), so relaying a
    frame never serializes its payload again.
    """

    channel_id: str
    seq: int
    kind: str
    sender: str
    target: str
    intent: str
    ts: int
    prev: str
    _payload: Any = attrs.field(alias="payload")
    tbz_hash: str
    sig: str
    raw: bytes = attrs.field(repr=False, eq=False)
    agent: AgentSignature | None = None
    """The sender's own signature, when it signed the payload."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self._payload, bytes):
            # ``raw`` is the payload's canonical JSON: keep that one copy, not the objects too
            # (the ledger holds many frames); ``payload`` decodes it when asked
            object.__setattr__(self, "_payload", _JSON)

    @property
    def payload(self) -> Any:
        """The payload: ``bytes`` for a binary frame, else its JSON value (decoded from ``raw``)."""
        value = self._payload
        return orjson.loads(self.raw) if value is _JSON else value

    @property
    def enc(self) -> str:
        """``"bytes"`` for a binary payload, else ``"json"``."""
        return "bytes" if isinstance(self._payload, bytes) else "json"

    @property
    def binary(self) -> bool:
        """True for a binary payload (``enc`` ``"bytes"``)."""
        return isinstance(self._payload, bytes)

    @property
    def size(self) -> int:
        """Payload size in bytes, as counted by bandwidth policies."""
        return len(self.raw)

    def to_dict(self) -> dict[str, Any]:
        """The exported form (one line of an exported chain); binary payloads as base64."""
        return self._with_payload(self.payload)

    def _with_payload(self, json_payload: Any) -> dict[str, Any]:
        d = self.header()
        payload = self._payload
        d["payload"] = base64.b64encode(payload).decode() if isinstance(payload, bytes) else json_payload
        return d

    def header(self) -> dict[str, Any]:
        """``to_dict`` without ``payload`` (for messages that carry the payload apart)."""
        binary = isinstance(self._payload, bytes)
        return {
            "v": FRAME_VERSION,
            "channel_id": self.channel_id,
            "seq": self.seq,
            "kind": self.kind,
            "sender": self.sender,
            "target": self.target,
            "intent": self.intent,
            "ts": self.ts,
            "prev": self.prev,
            "enc": "bytes" if binary else "json",
            "tbz_hash": self.tbz_hash,
            "sig": self.sig,
            **(
                {"agent_key": self.agent.key, "agent_nonce": self.agent.nonce, "agent_sig": self.agent.sig}
                if self.agent is not None
                else {}
            ),
        }

    def to_json(self) -> bytes:
        """``to_dict`` as JSON bytes, reusing the canonical payload bytes (never decoded)."""
        return exact(orjson.dumps(self._with_payload(orjson.Fragment(self.raw))))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Frame:
        """Rebuild a frame from its exported form (no verification; see ``verify_frame``)."""
        try:
            enc = d.get("enc", "json")
            payload = base64.b64decode(d["payload"], validate=True) if enc == "bytes" else d["payload"]
            _, raw = payload_bytes(payload)
            return cls(
                channel_id=str(d["channel_id"]),
                seq=int(d["seq"]),
                kind=str(d["kind"]),
                sender=str(d["sender"]),
                target=str(d["target"]),
                intent=str(d["intent"]),
                ts=int(d["ts"]),
                prev=str(d["prev"]),
                payload=payload,
                tbz_hash=str(d["tbz_hash"]),
                sig=str(d.get("sig", "")),
                raw=raw,
                agent=AgentSignature(str(d["agent_key"]), str(d["agent_nonce"]), str(d["agent_sig"]))
                if "agent_sig" in d
                else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed frame: {exc!r}", code="malformed_frame") from exc

    def computed_hash(self) -> str:
        """Recompute ``tbz_hash`` from the frame's fields."""
        return frame_hash(
            channel_id=self.channel_id,
            seq=self.seq,
            kind=self.kind,
            sender=self.sender,
            target=self.target,
            intent=self.intent,
            ts=self.ts,
            prev=self.prev,
            enc=self.enc,
            payload_sha256=_sha256(self.raw).hexdigest(),
            agent=self.agent,
        )


@attrs.define
class ChainHead:
    """The growing end of one channel's chain: the next ``seq`` and the last hash.

    ``append`` builds, hashes and signs the next frame; it never awaits, so frames of one
    channel are chained in exactly the order ``append`` is called. With ``sign_every`` N > 1
    only every N-th data frame is signed (open, close and seal frames always are), and a
    data frame is also signed when the oldest unsigned one is ``sign_within_ms`` old: each
    frame is covered by a signature on a later frame of its chain (see docs/frames.md).
    """

    channel_id: str
    intent: str
    sign: Callable[[bytes], str]
    next_seq: int = 0
    head: str = GENESIS
    sign_every: int = 1
    sign_within_ms: int = 0
    unsigned: int = 0
    """Data frames since the last signed frame."""
    unsigned_since: int = 0
    """``ts`` of the oldest of them."""

    def append(
        self,
        kind: str,
        sender: str,
        target: str,
        payload: Any,
        ts: int,
        encoded: tuple[str, bytes] | None = None,
        agent: AgentSignature | None = None,
        defer: bool = False,
    ) -> Frame:
        """Chain a new frame after the head and return it, signed.

        ``encoded`` is ``payload_bytes(payload)`` when the caller already computed it. With
        ``defer`` a data frame is left to the signature of a frame the caller chains next
        (the last frame of a ``batch``; see docs/frames.md).
        """
        enc, raw = encoded or payload_bytes(payload)
        if enc == "bytes":
            payload = raw
        digest = frame_hash(
            channel_id=self.channel_id,
            seq=self.next_seq,
            kind=kind,
            sender=sender,
            target=target,
            intent=self.intent,
            ts=ts,
            prev=self.head,
            enc=enc,
            payload_sha256=_sha256(raw).hexdigest(),
            agent=agent,
        )
        signed = kind != "data" or (
            not defer
            and (
                self.sign_every <= 1
                or self.unsigned + 1 >= self.sign_every
                or (self.unsigned > 0 and ts - self.unsigned_since >= self.sign_within_ms)
            )
        )
        if signed:
            self.unsigned = 0
        else:
            if not self.unsigned:
                self.unsigned_since = ts
            self.unsigned += 1
        frame = Frame(
            self.channel_id,
            self.next_seq,
            kind,
            sender,
            target,
            self.intent,
            ts,
            self.head,
            payload,
            digest,
            self.sign(bytes.fromhex(digest)) if signed else "",
            raw,
            agent,
        )
        self.next_seq += 1
        self.head = digest
        return frame


def held_bytes(frame: Frame) -> int:
    """Memory ``frame`` holds while kept (in the in-memory ledger, a mailbox): its payload and
    its bookkeeping (``FRAME_HELD_BYTES``, and ``AGENT_SIGNATURE_HELD_BYTES`` plus the nonce
    when its sender signed it)."""
    agent = frame.agent
    held = FRAME_HELD_BYTES + len(frame.raw)
    return held if agent is None else held + AGENT_SIGNATURE_HELD_BYTES + len(agent.nonce)
