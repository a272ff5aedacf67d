"""What mux knows of the Hypercorn connection under a WebSocket stream.

The node's own reads (``mux.lean_read``) and writes (``mux.direct_writes``) go past
Hypercorn's and trio's layers only on connections built as these functions recognise them:
HTTP/1.1 (Hypercorn's ``H11Protocol`` and ``TCPServer``) over a plain trio socket, or over
trio's ``SSLStream`` with the private parts named in :func:`tls_known`. Anything else (HTTP/2,
another server, a trio that changed) is left to Hypercorn entirely.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer

__all__ = ["h11_under", "tls_known"]


def h11_under(stream: WSStream) -> tuple[H11Protocol, TCPServer] | None:
    """Hypercorn's HTTP/1.1 protocol and TCP server under ``stream``, else None (HTTP/2)."""
    proto = getattr(stream.send, "__self__", None)
    if not isinstance(proto, H11Protocol):
        return None
    tcp = getattr(proto.send, "__self__", None)
    return (proto, tcp) if isinstance(tcp, TCPServer) else None


def tls_known(tls: Any) -> bool:
    """True when ``tls`` is trio's ``SSLStream`` over a plain socket, as this module knows it:
    its SSLObject, memory BIOs, inner send lock, state and delayed handshake bytes."""
    return (
        isinstance(tls, trio.SSLStream)
        and isinstance(tls.transport_stream, trio.SocketStream)
        and isinstance(getattr(tls, "_ssl_object", None), ssl.SSLObject)
        and isinstance(getattr(tls, "_incoming", None), ssl.MemoryBIO)
        and isinstance(getattr(tls, "_outgoing", None), ssl.MemoryBIO)
        and isinstance(getattr(tls, "_inner_send_lock", None), trio.StrictFIFOLock)
        and hasattr(getattr(tls, "_state", None), "name")
        and hasattr(tls, "_delayed_outgoing")
    )
