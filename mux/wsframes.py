"""WebSocket frames a server sends, built directly (RFC 6455, section 5.2).

How this works: a server's data frame is a header and the payload as it is: FIN set, no RSV
bits, opcode 1 (text, UTF-8) or 2 (binary), the payload length in 7 bits, or 126 and 16
bits, or 127 and 64 bits; never masked (only clients mask). That is all wsproto's
``FrameProtocol.send_data`` produces for a whole message when no extension (such as
permessage-deflate) was negotiated, at about a twentieth of its cost; ``mux.sockets`` uses
it only in that case and goes through wsproto otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

__all__ = ["server_frames"]

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
