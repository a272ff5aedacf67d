"""A closed chain's frames packed into one ``bytes``, for the in-memory ledger to keep.

How this works: a :class:`~mux.frames.Frame` kept as objects costs about 560 bytes beside its
payload, in a dozen small objects (its strings, its ints, the frame itself). The in-memory
ledger keeps up to thousands of closed channels' chains that nobody appends to any more;
:func:`pack` turns such a chain into one ``bytes`` and :func:`unpack` gives back equal frames
(``==``, same hashes, same signatures, same payload bytes).

The packed chain starts with its number of frames (4 bytes). Each frame is a fixed head
(``seq``, ``ts``, flags), then its hash fields as raw bytes where they are canonical
lowercase hex (``prev`` and ``tbz_hash`` 32 bytes, ``sig`` 64; anything else, such as an
unsigned frame's ``""``, is kept as text), then its text fields and its payload bytes, each
with a 4-byte length. The channel id is left out: the ledger keeps it as
the chain's key and hands it back to :func:`unpack`. The format lives only in memory; it is
never sent or written, so it may change between versions.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .frames import AgentSignature, Frame

__all__ = ["count", "pack", "unpack"]

_HEAD = struct.Struct("<qqB")
"""``seq``, ``ts``, flags."""
_LEN = struct.Struct("<I")

_BINARY = 1
_AGENT = 2
_PREV_RAW = 4
_HASH_RAW = 8
_SIG_RAW = 16


def _raw_hex(text: str, size: int) -> bytes | None:
    """``text`` as ``size`` raw bytes when it is exactly their lowercase hex, else None."""
    if len(text) != 2 * size:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if raw.hex() == text else None


def _text(out: bytearray, value: str) -> None:
    data = value.encode("utf-8", "surrogatepass")
    out += _LEN.pack(len(data))
    out += data


def count(data: bytes) -> int:
    """How many frames ``data`` (from :func:`pack`) holds."""
    found: int = _LEN.unpack_from(data)[0]
    return found


def pack(frames: Sequence[Frame]) -> bytes:
    """The frames of one chain as one ``bytes`` (:func:`unpack` reverses it)."""
    out = bytearray(_LEN.pack(len(frames)))
    for frame in frames:
        prev, digest, sig = _raw_hex(frame.prev, 32), _raw_hex(frame.tbz_hash, 32), _raw_hex(frame.sig, 64)
        flags = (
            (_BINARY if frame.binary else 0)
            | (_AGENT if frame.agent is not None else 0)
            | (_PREV_RAW if prev is not None else 0)
            | (_HASH_RAW if digest is not None else 0)
            | (_SIG_RAW if sig is not None else 0)
        )
        out += _HEAD.pack(frame.seq, frame.ts, flags)
        for raw, text in ((prev, frame.prev), (digest, frame.tbz_hash), (sig, frame.sig)):
            if raw is not None:
                out += raw
            else:
                _text(out, text)
        for text in (frame.kind, frame.sender, frame.target, frame.intent):
            _text(out, text)
        if frame.agent is not None:
            for text in (frame.agent.key, frame.agent.nonce, frame.agent.sig):
                _text(out, text)
        out += _LEN.pack(len(frame.raw))
        out += frame.raw
    return bytes(out)


def unpack(data: bytes, channel_id: str) -> list[Frame]:
    """The frames :func:`pack` packed, of the chain ``channel_id``."""
    frames: list[Frame] = []
    view = memoryview(data)
    at = _LEN.size

    def text() -> str:
        nonlocal at
        (size,) = _LEN.unpack_from(view, at)
        at += 4 + size
        return str(view[at - size : at], "utf-8", "surrogatepass")

    def hexed(flag: int, size: int) -> str:
        nonlocal at
        if not flags & flag:
            return text()
        at += size
        return view[at - size : at].hex()

    while at < len(view):
        seq, ts, flags = _HEAD.unpack_from(view, at)
        at += _HEAD.size
        prev, digest, sig = hexed(_PREV_RAW, 32), hexed(_HASH_RAW, 32), hexed(_SIG_RAW, 64)
        kind, sender, target, intent = text(), text(), text(), text()
        agent = AgentSignature(text(), text(), text()) if flags & _AGENT else None
        (size,) = _LEN.unpack_from(view, at)
        at += 4 + size
        raw = bytes(view[at - size : at])
        frames.append(
            Frame(
                channel_id=channel_id,
                seq=seq,
                kind=kind,
                sender=sender,
                target=target,
                intent=intent,
                ts=ts,
                prev=prev,
                payload=raw if flags & _BINARY else None,
                tbz_hash=digest,
                sig=sig,
                raw=raw,
                agent=agent,
            )
        )
    return frames
