"""WebSocket frames a server sends, built directly, and those a client sends, parsed
directly (RFC 6455, section 5.2).

How this works: a server's data frame is a header and the payload as it is: FIN set, no RSV
bits, opcode 1 (text, UTF-8) or 2 (binary), the payload length in 7 bits, or 126 and 16
bits, or 127 and 64 bits; never masked (only clients mask). That is all wsproto's
``FrameProtocol.send_data`` produces for a whole message when no extension (such as
permessage-deflate) was negotiated, at about a twentieth of its cost; ``mux.sockets`` uses
it only in that case and goes through wsproto otherwise.

A client's data frame is the same with the payload masked (XOR with a 4-byte key sent in
the header; undone by the websockets package's compiled loop where it is built, as it is
where mux installs from wheels, else as one big integer, as wsproto does).
:class:`ClientFrames` takes whole unfragmented text and binary messages out of a client's
byte stream, at a fraction of wsproto's cost, and hands wsproto everything else (pings and
pongs one by one; from any other frame on, all of it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import attrs

__all__ = ["COMPILED_MASK", "ClientFrames", "Passed", "server_frames"]

_TEXT = 0x81  # FIN + opcode 1
_BINARY = 0x82  # FIN + opcode 2
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def server_frames(messages: Iterable[str | bytes]) -> bytes:
    """``messages`` as unmasked, unfragmented WebSocket frames (text for ``str``, binary for
    ``bytes``), joined in order."""
    parts: list[bytes] = []
    for message in messages:
        if isinstance(message, str):
            payload, head = message.encode(), _TEXT
        else:
            payload, head = message, _BINARY
        n = len(payload)
        if n < 126:
            parts.append(_SHORT.pack(head, n))
        elif n < 65536:
            parts.append(_MEDIUM.pack(head, 126, n))
        else:
            parts.append(_LONG.pack(head, 127, n))
        parts.append(payload)
    return b"".join(parts)


@attrs.frozen
class Passed:
    """Bytes of the stream that wsproto must handle: a whole ping or pong frame (after which
    parsing goes on), or everything from an unusual frame on (after which the parser is off:
    see :class:`ClientFrames`)."""

    raw: bytes


@attrs.define
class ClientFrames:
    """Whole messages out of the bytes a WebSocket client sends (sans-I/O).

    :meth:`feed` bytes as they arrive, then take items with :meth:`next` until it returns
    None (a frame not yet whole waits for more bytes). An item is a message, ``str`` for a
    text frame and ``bytes`` for a binary one, or a :class:`Passed` for wsproto.

    Only the frames clients send all the time are parsed here: FIN set, no RSV bit, masked,
    the length in its shortest form, text (valid UTF-8) or binary, at most ``max_size``
    bytes. A ping or a pong is handed on whole and parsing goes on. Anything else (a close,
    a fragment, an unmasked, oversized or overlong frame, invalid UTF-8, an unknown opcode
    or RSV bit) is handed on together with every byte after it, and the parser is off from
    then on (:attr:`off`): wsproto, which saw nothing of the stream before, takes it up at
    a frame boundary and answers as it would have (a close, a protocol error, a message too
    big). A frame is judged by its header as
    soon as that arrives, and its payload (UTF-8) once whole; at most one frame that is not
    yet whole is held. tests/test_wsframes.py checks all this against wsproto alone on
    random streams of valid, odd and garbage frames cut anywhere.
    """

    max_size: int
    _buf: bytes | bytearray = b""
    """What was received and not yet taken out, from ``_pos`` on: the bytes of the last read
    themselves, a bytearray only while a frame spans reads, and the empty bytes (shared,
    nothing of the parser's own) once all is taken: a buffer the parser kept between reads
    would have been made at a connection's last read, mid-burst too, and outlive the burst."""
    _pos: int = 0
    _off: bool = False

    @property
    def off(self) -> bool:
        """True once everything goes to wsproto."""
        return self._off

    @property
    def held(self) -> int:
        """Bytes held of a frame not yet whole (after :meth:`next` returned None)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add bytes received from the client (RuntimeError once off: they are wsproto's)."""
        if self._off:
            raise RuntimeError("the parser is off: hand the bytes to wsproto")
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            self._buf, self._pos = data, 0
            return
        rest = bytearray(memoryview(buf)[pos:]) if pos or isinstance(buf, bytes) else buf
        rest += data
        self._buf, self._pos = rest, 0

    def next(self) -> str | bytes | Passed | None:
        """The next whole item, or None until more bytes arrive (always None once off)."""
        if self._off:
            return None
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        opcode, n = b0 & 0x0F, b1 & 0x7F
        # FIN, no RSV bit, masked; text or binary, or a ping or pong of at most 125 bytes:
        # decided from the first two bytes, as wsproto does
        if b0 & 0xF0 != 0x80 or not b1 & 0x80 or (opcode not in (1, 2) and not (opcode in (9, 10) and n <= 125)):
            return self._hand_off()
        start = pos + 6
        if n == 126:
            if avail < 4:
                return None
            n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            start, shortest = pos + 8, n > 125
        elif n == 127:
            if avail < 10:
                return None
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            start, shortest = pos + 14, n > 65535
        else:
            shortest = True
        if not shortest or n > self.max_size:  # the length in more bytes than it needs, or too big
            return self._hand_off()
        end = start + n
        if len(buf) < end:
            return None
        if opcode >= 9:
            self._taken(end)
            return Passed(bytes(buf[pos:end]))
        payload = _unmask(bytes(buf[start - 4 : start]), buf[start:end])
        if opcode == 2:
            self._taken(end)
            return payload
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return self._hand_off()  # from this frame on
        self._taken(end)
        return text

    def _taken(self, end: int) -> None:
        """Everything up to ``end`` is taken out; hold nothing once that is all."""
        if end == len(self._buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = end

    def stop(self) -> bytes:
        """Turn the parser off; return the bytes it held (for wsproto)."""
        rest = bytes(self._buf[self._pos :])
        self._buf = b""
        self._pos = 0
        self._off = True
        return rest

    def _hand_off(self) -> Passed:
        return Passed(self.stop())


def _unmask_int(mask: bytes, payload: bytes | bytearray) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated, as one big integer (RFC 6455, 5.3)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _compiled_mask() -> Callable[[bytes | bytearray, bytes], bytes] | None:
    """The websockets package's C loop (``apply_mask(data, mask)``), if it is built here: it
    unmasks 16 KiB in about 1.2 us where the integer takes 36 to 62."""
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # a platform without its compiled extension
        return None
    return apply_mask


COMPILED_MASK = _compiled_mask()
"""The compiled unmasking loop in use, or None (then :func:`_unmask_int`)."""


def _unmask_by(apply_mask: Callable[[bytes | bytearray, bytes], bytes]) -> Callable[[bytes, bytes | bytearray], bytes]:
    def unmask(mask: bytes, payload: bytes | bytearray) -> bytes:
        return apply_mask(payload, mask)

    return unmask


_unmask = _unmask_int if COMPILED_MASK is None else _unmask_by(COMPILED_MASK)
"""``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455, section 5.3): the compiled loop
when there is one (chosen once, at import), else :func:`_unmask_int`."""
